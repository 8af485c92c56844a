"""scripts/image_sample.py end to end with a tiny random U-Net: outputs, seeds, ranks, resume, spacings, errors."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import image_sample
from guided_diffusion.checkpoint import training_state
from guided_diffusion.sampling import read_png
from guided_diffusion.script_util import create_model
from launchers import clean_env, launcher_command, requires_mpiexec
from sample_tiny_model import (
    TINY_MODEL_FLAGS,
    perturb_,
    save_tiny_checkpoint,
    tiny_flags,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST_SCRIPTS = os.path.join(ROOT, "tests", "dist_scripts")
SUBPROCESS_TIMEOUT_S = 300
# One thread per process: two processes share two cores, and tiny models gain nothing from threads.
SUBPROCESS_ENV = clean_env()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("run") / "ema_0.9999_000010.pt"))


def sample(checkpoint, *flags, **model_flags):
    """Run image_sample in this process with the tiny model's flags (10 of T = 50 steps unless overridden)."""
    model_flags.setdefault("timestep_respacing", "10")
    return image_sample.main(tiny_flags(**model_flags) + ["--model_path", checkpoint, *flags])


def load_npz(path):
    with np.load(path) as npz:
        return {key: npz[key] for key in npz.files}


def run_script(args):
    return subprocess.run(
        args, cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S
    )


def test_npz_pngs_and_grid_with_n_not_a_multiple_of_the_batch(checkpoint, capsys):
    result = sample(checkpoint, "--num_samples", "7", "--batch_size", "3")
    # Default folder: beside the checkpoint, named after it and the schedule.
    assert result.npz_path == os.path.join(
        os.path.dirname(checkpoint), "samples_ema_0.9999_000010_10", "samples_7x16x16x3.npz"
    )
    arrays = load_npz(result.npz_path)
    assert list(arrays) == ["arr_0"]
    images = arrays["arr_0"]
    assert images.shape == (7, 16, 16, 3) and images.dtype == np.uint8
    assert sorted(os.listdir(result.images_dir)) == [f"{k:06d}.png" for k in range(7)]
    for k in range(7):
        assert np.array_equal(read_png(os.path.join(result.images_dir, f"{k:06d}.png"))[0], images[k])
    assert read_png(result.grid_path)[0].shape == (20, 7 * 18 + 2, 3)
    out = capsys.readouterr()
    assert "70 in total" in out.out and result.npz_path in out.out and result.images_dir in out.out
    assert "img/s" in out.err


def test_reference_layout_state_dict_samples_without_conversion(tmp_path):
    # As the reference saves it: torch.save(model.state_dict()), here class-conditional with learned sigmas.
    flags = dict(TINY_MODEL_FLAGS, learn_sigma=True, class_cond=True)
    model = create_model(
        **{k: v for k, v in flags.items() if k != "diffusion_steps"}, use_scale_shift_norm=True, num_head_channels=-1
    )
    state_dict = perturb_(model).state_dict()
    assert {"time_embed.0.weight", "label_emb.weight", "input_blocks.0.0.weight", "out.2.weight"} <= set(state_dict)
    assert state_dict["out.2.weight"].shape[0] == 6
    path = str(tmp_path / "model000100.pt")
    torch.save(state_dict, path)
    result = sample(
        path, "--num_samples", "3", "--batch_size", "2", learn_sigma=True, class_cond=True
    )
    arrays = load_npz(result.npz_path)
    assert sorted(arrays) == ["arr_0", "arr_1"]
    assert arrays["arr_1"].dtype == np.int64 and arrays["arr_1"].shape == (3,)
    assert 0 <= arrays["arr_1"].min() and arrays["arr_1"].max() < 1000


def test_class_labels_are_drawn_from_the_checkpoints_own_classes(tmp_path):
    # A 3-class model (label_emb.weight has 3 rows): the flags say nothing about the class count.
    model = create_model(**{k: v for k, v in TINY_MODEL_FLAGS.items() if k != "diffusion_steps"}, class_cond=True,
                         num_classes=3, use_scale_shift_norm=True)
    path = str(tmp_path / "model000100.pt")
    torch.save(perturb_(model).state_dict(), path)
    result = sample(path, "--num_samples", "24", "--batch_size", "8", class_cond=True, timestep_respacing="2")
    labels = load_npz(result.npz_path)["arr_1"]
    assert labels.shape == (24,) and labels.max() < 3
    assert sorted(set(labels.tolist())) == [0, 1, 2]   # all three classes drawn, uniformly


def test_checkpoint_not_fitting_the_flags_names_keys_and_flags(checkpoint, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        sample(checkpoint, "--num_samples", "1", "--sample_dir", str(tmp_path / "s"), learn_sigma=True)
    message = str(exit_info.value.code)
    assert message.startswith("image_sample.py: error:") and "out.2.weight" in message and "--learn_sigma" in message


@pytest.mark.slow
@requires_mpiexec
def test_same_seed_gives_the_same_samples_on_one_and_two_ranks(checkpoint, tmp_path):
    one_rank = sample(checkpoint, "--num_samples", "7", "--batch_size", "2", "--sample_dir", str(tmp_path / "one"))
    completed = run_script(
        launcher_command(
            "mpi", "scripts/image_sample.py", *tiny_flags(timestep_respacing="10"), "--model_path", checkpoint,
            "--num_samples", "7", "--batch_size", "2", "--sample_dir", str(tmp_path / "two"),
        )
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.count("7 samples (7 generated now") == 1, "rank 0 alone reports"
    two_ranks = load_npz(str(tmp_path / "two" / "samples_7x16x16x3.npz"))
    # Same batch size and one thread per process in both runs: the same batches, only split over ranks, so
    # the samples are bit-identical.
    assert np.array_equal(load_npz(one_rank.npz_path)["arr_0"], two_ranks["arr_0"])
    assert sorted(os.listdir(tmp_path / "two" / "images")) == [f"{k:06d}.png" for k in range(7)]


def test_same_seed_gives_the_same_samples_across_batch_sizes(checkpoint, tmp_path):
    runs = []
    for batch_size in ("5", "2"):
        sample_dir = str(tmp_path / batch_size)
        result = sample(checkpoint, "--num_samples", "5", "--batch_size", batch_size, "--sample_dir", sample_dir)
        runs.append(load_npz(result.npz_path))
    # Identical noise; the network's kernels may move a value near a quantisation step by one level.
    difference = np.abs(runs[0]["arr_0"].astype(int) - runs[1]["arr_0"].astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-2
    other_seed = sample(checkpoint, "--num_samples", "5", "--seed", "1", "--sample_dir", str(tmp_path / "seed1"))
    assert (load_npz(other_seed.npz_path)["arr_0"] != runs[0]["arr_0"]).mean() > 0.5


def _file_records(folder):
    """{name: (inode, mtime_ns, sha256)} of the PNGs in `folder`: what a rewrite of any of them would change."""
    records = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".png") and not name.startswith("."):
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            records[name] = (os.stat(path).st_ino, os.stat(path).st_mtime_ns, digest)
    return records


def test_sigkilled_run_resumes_to_the_uninterrupted_result(checkpoint, tmp_path):
    flags = ["--num_samples", "7", "--batch_size", "2"]
    whole = sample(checkpoint, *flags, "--sample_dir", str(tmp_path / "whole"))
    killed_dir = tmp_path / "killed"
    completed = run_script(
        [
            sys.executable, os.path.join(DIST_SCRIPTS, "sample_killed.py"), "--kill_after", "4",
            *tiny_flags(timestep_respacing="10"), "--model_path", checkpoint, *flags, "--sample_dir", str(killed_dir),
        ]
    )
    assert completed.returncode == -9, completed.stderr
    kept = _file_records(killed_dir / "images")
    assert sorted(kept) == [f"{k:06d}.png" for k in range(4)]

    resumed = sample(checkpoint, *flags, "--sample_dir", str(killed_dir))
    assert resumed.num_generated == 3
    # The resumed run generated only the missing samples: the four kept PNGs are the same files, untouched ...
    after = _file_records(killed_dir / "images")
    assert {name: after[name] for name in kept} == kept
    # ... it removed the killed write's temporary file, and its npz equals the uninterrupted run's.
    assert sorted(os.listdir(killed_dir / "images")) == [f"{k:06d}.png" for k in range(7)]
    expected, got = load_npz(whole.npz_path), load_npz(resumed.npz_path)
    assert np.array_equal(expected["arr_0"], got["arr_0"])
    for k in range(7):
        assert np.array_equal(read_png(os.path.join(resumed.images_dir, f"{k:06d}.png"))[0], expected["arr_0"][k])


def test_rerun_with_other_sampling_arguments_is_refused(checkpoint, tmp_path):
    sample(checkpoint, "--num_samples", "2", "--sample_dir", str(tmp_path / "s"))
    with pytest.raises(SystemExit) as exit_info:
        sample(checkpoint, "--num_samples", "2", "--sample_dir", str(tmp_path / "s"), "--use_ddim", "True")
    assert "use_ddim: folder has False, now True" in str(exit_info.value.code)


@pytest.mark.parametrize(
    "diffusion_steps, respacing, use_ddim, eta, steps_per_sample",
    [
        (1000, "250", "False", "0", 250),
        (1000, "130,60,60", "False", "0", 250),
        (1000, "ddim25", "True", "0", 25),
        (1000, "ddim25", "True", "1", 25),
        (50, "10", "True", "0", 10),       # DDIM over a non-DDIM spacing, as the reference allows
        (50, "ddim5", "False", "0", 5),    # a ddimN grid without --use_ddim: ancestral on that grid
    ],
)
def test_spacings_and_samplers_run(checkpoint, tmp_path, diffusion_steps, respacing, use_ddim, eta, steps_per_sample):
    result = sample(
        checkpoint, "--num_samples", "1", "--use_ddim", use_ddim, "--ddim_eta", eta,
        "--sample_dir", str(tmp_path / "s"), diffusion_steps=diffusion_steps, timestep_respacing=respacing,
    )
    assert result.steps_per_sample == steps_per_sample
    assert load_npz(result.npz_path)["arr_0"].shape == (1, 16, 16, 3)


def test_impossible_spacing_fails_with_a_message_and_no_traceback(checkpoint, tmp_path):
    completed = run_script(
        [
            sys.executable, "scripts/image_sample.py", *tiny_flags(timestep_respacing="60"),
            "--model_path", checkpoint, "--sample_dir", str(tmp_path / "s"),
        ]
    )
    assert completed.returncode != 0
    assert "error: --timestep_respacing" in completed.stderr and "cannot take 60" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not os.path.exists(tmp_path / "s")
    with pytest.raises(SystemExit, match="ddim30: no integer stride gives exactly 30 steps out of 50"):
        sample(checkpoint, "--sample_dir", str(tmp_path / "s"), timestep_respacing="ddim30")


def test_config_beside_the_checkpoint_is_used_and_flags_override_it(tmp_path):
    checkpoint = save_tiny_checkpoint(str(tmp_path / "ema_0.9999_000020.pt"))
    training_config = {
        **TINY_MODEL_FLAGS, "channel_mult": [1, 2], "timestep_respacing": "5", "lr": 2e-5, "batch_size": 64,
        "data_dir": "data/ffhq",
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(training_config))
    # Only --model_path and sampling options on the command line: the model flags come from config.yaml.
    from_config = image_sample.main(["--model_path", checkpoint, "--num_samples", "2"])
    assert from_config.steps_per_sample == 5
    assert os.path.basename(os.path.dirname(from_config.npz_path)) == "samples_ema_0.9999_000020_5"
    overridden = image_sample.main(["--model_path", checkpoint, "--num_samples", "2", "--timestep_respacing", "ddim10"])
    assert overridden.steps_per_sample == 10
    # An explicit --config replaces the one beside the checkpoint.
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({**training_config, "timestep_respacing": "25"}))
    explicit = image_sample.main(
        ["--model_path", checkpoint, "--num_samples", "1", "--config", str(tmp_path / "other.yaml")]
    )
    assert explicit.steps_per_sample == 25


def test_missing_model_path_is_a_clear_error():
    with pytest.raises(SystemExit, match="--model_path is required"):
        image_sample.main(tiny_flags())


def test_training_state_file_points_to_the_weights_beside_it(checkpoint, tmp_path):
    weights = torch.load(checkpoint, weights_only=True)
    state = training_state(
        step=20, model=weights, ema={"0.9999": weights}, optimizer={}, grad_scaler={}, schedule_sampler={},
        rng=[], data={}, config={},
    )
    path = str(tmp_path / "state000020.pt")
    torch.save(state, path)
    with pytest.raises(SystemExit, match=r"training-state file.*ema_<rate>_000020\.pt .*model000020\.pt"):
        sample(path, "--num_samples", "1")


def test_unusable_paths_are_refused_before_the_model_is_loaded(checkpoint, tmp_path, monkeypatch):
    def not_now(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(image_sample, "load_model_and_diffusion", not_now)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit, match=r"^image_sample.py: error: --sample_dir '.*a_file' is a file, not a folder"):
        sample(checkpoint, "--sample_dir", str(tmp_path / "a_file"))
    with pytest.raises(SystemExit, match=r"a_file/samples' cannot be created: .*a_file is a file, not a folder$"):
        sample(checkpoint, "--sample_dir", str(tmp_path / "a_file" / "samples"))
    # A log dir as --model_path: its newest weights are named.
    monkeypatch.undo()
    folder = os.path.dirname(checkpoint)
    with pytest.raises(SystemExit, match=r"--model_path '.*' is a folder; pass one checkpoint file such as "
                                         r".*ema_0\.9999_000010\.pt$"):
        sample(folder)


@pytest.mark.parametrize(
    "sampler, steps, schedule, evaluations",
    [("dpm++2m", 3, "logsnr", 3), ("dpm++2m_sde", 3, "karras", 3), ("heun", 3, "karras", 5), ("ddim", 0, "", 10)],
)
def test_each_sampler_writes_the_usual_files_and_records_itself(tmp_path, sampler, steps, schedule, evaluations, capsys):
    """Class-conditional, learned variance (the ε channels are used), 3 samples in batches of 2."""
    path = save_tiny_checkpoint(str(tmp_path / "ema_0.9999_000010.pt"), learn_sigma=True, class_cond=True)
    few_step = sampler != "ddim"
    flags = ["--num_samples", "3", "--batch_size", "2", "--sampler", sampler]
    flags += ["--steps", str(steps)] if few_step else []
    result = sample(path, *flags, learn_sigma=True, class_cond=True, timestep_respacing="" if few_step else "10")
    folder = os.path.dirname(result.npz_path)
    assert os.path.basename(folder) == (f"samples_ema_0.9999_000010_{sampler}{steps}_{schedule}" if few_step
                                        else "samples_ema_0.9999_000010_10_ddim")
    arrays = load_npz(result.npz_path)
    assert arrays["arr_0"].shape == (3, 16, 16, 3) and arrays["arr_1"].shape == (3,)
    assert sorted(os.listdir(result.images_dir)) == [f"{k:06d}.png" for k in range(3)]
    assert read_png(result.grid_path)[0].shape == (20, 3 * 18 + 2, 3)
    assert (result.steps_per_sample, result.evaluations_per_sample) == (steps or 10, evaluations)
    with open(os.path.join(folder, "run.json")) as f:
        run = json.load(f)
    assert run["network_evaluations_per_sample"] == evaluations
    assert "heun_churn" not in run["identity"]  # recorded only when non-zero: older folders resume
    if few_step:
        assert {k: run["identity"][k] for k in ("sampler", "steps", "step_schedule", "use_ddim")} == dict(
            sampler=sampler, steps=steps, step_schedule=schedule, use_ddim=False)
    else:  # the identity DDIM folders always had: resumable across this change
        assert run["identity"]["use_ddim"] and "sampler" not in run["identity"]
    assert f"{sampler}, {steps or 10} steps, {evaluations} network evaluations each" in capsys.readouterr().out


def test_rerun_with_another_sampler_or_step_count_is_refused(checkpoint, tmp_path):
    sample(checkpoint, "--num_samples", "1", "--sampler", "heun", "--steps", "2", "--sample_dir", str(tmp_path / "s"),
           timestep_respacing="")
    for flags, change in ((["--sampler", "dpm++2m", "--steps", "2"], "sampler: folder has 'heun', now 'dpm++2m'"),
                          (["--sampler", "heun", "--steps", "3"], "steps: folder has 2, now 3")):
        with pytest.raises(SystemExit) as exit_info:
            sample(checkpoint, "--num_samples", "1", *flags, "--sample_dir", str(tmp_path / "s"),
                   timestep_respacing="")
        assert change in str(exit_info.value.code)


def test_heun_churn_names_the_folder_is_recorded_and_must_match_on_rerun(checkpoint):
    flags = ["--num_samples", "1", "--sampler", "heun", "--steps", "2"]
    result = sample(checkpoint, *flags, "--heun_churn", "40", "--heun_s_noise", "1.003", timestep_respacing="")
    folder = os.path.dirname(result.npz_path)
    assert os.path.basename(folder) == "samples_ema_0.9999_000010_heun2_karras_churn40"
    assert result.evaluations_per_sample == 3
    with open(os.path.join(folder, "run.json")) as f:
        assert json.load(f)["identity"]["heun_churn"] == {"churn": 40, "s_tmin": 0, "s_tmax": "inf", "s_noise": 1.003}
    with pytest.raises(SystemExit) as exit_info:
        sample(checkpoint, *flags, "--sample_dir", folder, timestep_respacing="")
    assert "heun_churn: folder has {'churn': 40.0, " in str(exit_info.value.code)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sampler", "dpm++2m", "--heun_churn", "40"], "--sampler dpm++2m and --heun_churn 40 do not go together"),
        (["--heun_churn", "40"], "--sampler ancestral and --heun_churn 40 do not go together"),
        (["--sampler", "heun", "--heun_s_noise", "1.003", "--heun_s_tmax", "50"],
         "--heun_s_tmax 50, --heun_s_noise 1.003 without --heun_churn > 0 would change nothing"),
        (["--sampler", "heun", "--heun_churn", "-1"], "--heun_churn -1 must be >= 0"),
        (["--sampler", "heun", "--heun_churn", "40", "--heun_s_tmin", "60", "--heun_s_tmax", "50"],
         "--heun_s_tmin 60 and --heun_s_tmax 50 must satisfy 0 <= S_tmin <= S_tmax"),
        (["--sampler", "heun", "--use_ddim", "True"], "--sampler heun and --use_ddim True contradict each other"),
        (["--sampler", "ancestral", "--use_ddim", "True"], "--sampler ancestral and --use_ddim True contradict"),
        (["--steps", "5"], "--sampler ancestral and --steps 5 do not go together"),
        (["--use_ddim", "True", "--step_schedule", "karras"], "--sampler ddim and --step_schedule karras do not go"),
        (["--sampler", "dpm++2m", "--timestep_respacing", "10"],
         "--sampler dpm++2m and --timestep_respacing '10' do not go together"),
        (["--sampler", "dpm++2m_sde", "--ddim_eta", "0.5"], "--sampler dpm++2m_sde and --ddim_eta 0.5 do not go"),
        (["--sampler", "heun", "--step_schedule", "cosine"], "--step_schedule 'cosine' is not one of time, logsnr"),
        (["--sampler", "euler"], "--sampler 'euler' is not one of ancestral, ddim, dpm++2m, dpm++2m_sde, heun"),
    ],
)
def test_bad_sampler_flag_combinations_name_both_flags(tmp_path, flags, message):
    argv = [*tiny_flags(), "--model_path", str(tmp_path / "absent.pt"), "--sample_dir", str(tmp_path / "s"), *flags]
    with pytest.raises(SystemExit) as exit_info:
        image_sample.main(argv)
    assert str(exit_info.value.code).startswith("image_sample.py: error: ") and message in str(exit_info.value.code)
    assert not os.path.exists(tmp_path / "s")
