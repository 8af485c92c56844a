"""FID/KID during training (the paper's Fig. 4): logged at eval steps from the EMA weights, resume-safe."""

import os
import shutil
import warnings

import pytest
import torch


from guided_diffusion import inception
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.train_eval import TrainingEvaluator, evaluation_respacing, sampling_options
from helpers import save_standin_inception
from test_zip_bombs import huge_png_header
from train_fixtures import (
    TINY_TRAIN_FLAGS,
    checkpoint_digests,
    read_progress,
    train,
)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    torch.manual_seed(0)
    return save_standin_inception(tmp_path_factory.mktemp("net") / "standin.pt")


def eval_flags(standin, cache_dir):
    return dict(
        eval_interval=2,
        eval_samples=6,
        eval_batch_size=4,
        eval_timestep_respacing="ddim5",
        inception_path=standin,
        eval_cache_dir=str(cache_dir),
    )


def test_scores_logged_at_eval_steps_come_from_the_ema_weights(images, standin, tmp_path):
    flags = eval_flags(standin, tmp_path / "cache")
    train(images, tmp_path / "run", max_steps=4, **flags)
    rows = [row for row in read_progress(tmp_path / "run") if "fid" in row]
    assert [row["step"] for row in rows] == [2, 4]
    for row in rows:
        assert row["fid"] > 0 and row["kid_x1e3"] == pytest.approx(row["kid"] * 1e3) and row["eval_samples"] == 6

    # The same evaluation, rebuilt by hand on the saved EMA weights of step 4, gives the logged numbers.
    config = {**model_and_diffusion_defaults(), **TINY_TRAIN_FLAGS, "timestep_respacing": "ddim5"}
    model, diffusion = create_model_and_diffusion(**{k: config[k] for k in model_and_diffusion_defaults()})
    ema = torch.load(tmp_path / "run" / "ema_0.9_000004.pt", weights_only=True)
    model.load_state_dict(ema)
    evaluator = TrainingEvaluator(
        diffusion=diffusion,
        options=sampling_options(config["image_size"], False, True, "fp32"),
        num_samples=6,
        batch_size=4,
        reference=images,
        inception_path=standin,
        cache_dir=str(tmp_path / "cache"),
    )
    scores = evaluator(model.eval())
    assert scores["fid"] == pytest.approx(rows[-1]["fid"], rel=1e-6)
    assert scores["kid"] == pytest.approx(rows[-1]["kid"], rel=1e-5, abs=1e-9)


def test_eval_sampler_scores_with_a_few_step_sampler_on_the_full_schedule(images, standin, tmp_path):
    """--eval_sampler heun --eval_steps 2: three network evaluations per image on the 100-step schedule (the default
    --eval_timestep_respacing ddim50 and --eval_use_ddim True are not used)."""
    flags = {**eval_flags(standin, tmp_path / "cache"), "eval_sampler": "heun", "eval_steps": 2}
    train(images, tmp_path / "run", max_steps=2, **flags)
    logged = [row for row in read_progress(tmp_path / "run") if "fid" in row][-1]

    config = {**model_and_diffusion_defaults(), **TINY_TRAIN_FLAGS}
    model, diffusion = create_model_and_diffusion(**{k: config[k] for k in model_and_diffusion_defaults()})
    model.load_state_dict(torch.load(tmp_path / "run" / "ema_0.9_000002.pt", weights_only=True))
    options = sampling_options(config["image_size"], False, True, "fp32", "heun", 2)
    assert (options.sampler, options.steps, options.step_schedule, options.use_ddim) == ("heun", 2, "karras", False)
    assert evaluation_respacing(options, "ddim5") == "" and diffusion.num_timesteps == 100
    evaluator = TrainingEvaluator(diffusion=diffusion, options=options, num_samples=6, batch_size=4,
                                  reference=images, inception_path=standin, cache_dir=str(tmp_path / "cache"))
    assert evaluator(model.eval())["fid"] == pytest.approx(logged["fid"], rel=1e-6)


def test_eval_sampler_flags_are_checked_by_name():
    assert sampling_options(16, False, True, "fp32").use_ddim  # no --eval_sampler: --eval_use_ddim decides
    assert not sampling_options(16, False, True, "fp32", "ancestral").use_ddim  # a named sampler wins
    with pytest.raises(ValueError, match="--eval_sampler ancestral and --eval_steps 3 do not go together"):
        sampling_options(16, False, True, "fp32", "ancestral", 3)
    with pytest.raises(ValueError, match="--eval_step_schedule 'cosine' is not one of"):
        sampling_options(16, False, True, "fp32", "dpm++2m", 0, "cosine")


def test_evaluation_does_not_disturb_exact_resume(images, standin, tmp_path):
    flags = eval_flags(standin, tmp_path / "cache")
    train(images, tmp_path / "straight", max_steps=4, **flags)
    train(images, tmp_path / "first", max_steps=2, **flags)
    train(images, tmp_path / "first", max_steps=4, resume_checkpoint=str(tmp_path / "first"), **flags)
    assert checkpoint_digests(tmp_path / "straight", 4) == checkpoint_digests(tmp_path / "first", 4)


def test_missing_inception_weights_stop_before_training(images, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(inception, "CLEANFID_INCEPTION_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(inception, "fid_helper_model_file", lambda: None)

    def refuse_download(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(inception, "check_download_inception", refuse_download)
    with pytest.raises(SystemExit) as exit_info:
        train(images, tmp_path / "run", max_steps=2, eval_interval=1)
    assert "inception" in str(exit_info.value).lower()
    assert not os.path.exists(tmp_path / "run" / "model000001.pt")


def test_a_corrupt_and_an_oversized_image_in_the_data_are_skipped_by_training_and_by_its_fid(images, standin,
                                                                                             tmp_path):
    """The loader and the FID reference list and decode --data_dir the same way: both skip the two bad files (with
    warnings that count them) and training goes through two evaluations."""
    data = tmp_path / "data"
    shutil.copytree(images, data)
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (data / "oversized.png").write_bytes(huge_png_header())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(str(data), tmp_path / "run", max_steps=4, **eval_flags(standin, tmp_path / "cache"))
    rows = [row for row in read_progress(tmp_path / "run") if "fid" in row]
    assert [row["step"] for row in rows] == [2, 4] and all(row["fid"] > 0 for row in rows)
    messages = [str(w.message) for w in caught]
    for name in ("corrupt.png", "oversized.png"):
        assert any(m.startswith(f"skipping unreadable image {data / name}") for m in messages), messages
    assert any(m.startswith(f"{data}: skipped 2 unreadable image(s)") for m in messages), messages
