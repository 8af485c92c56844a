"""scripts/image_train.py: flags and configs, log dirs, config.yaml, resume rules, a SIGKILL mid-checkpoint, and
one-line errors for bad configs, data, log dirs and a diverging loss."""

import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from launchers import clean_env
from train_fixtures import (
    ROOT,
    checkpoint_digests,
    read_progress,
    train,
    train_argv,
)

import image_train
from guided_diffusion import checkpoint, fileio
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from test_configs import TABLE_A, TWINS

KILLED = os.path.join(os.path.dirname(__file__), "dist_scripts", "train_killed.py")
REFERENCE_TRAIN_FLAGS = dict(
    data_dir="", log_dir="", schedule_sampler="uniform", lr=1e-4, weight_decay=0.0, lr_anneal_steps=0, batch_size=1,
    microbatch=-1, ema_rate="0.9999", log_interval=10, save_interval=10000, resume_checkpoint="", use_fp16=False,
    fp16_scale_growth=1e-3,
)


def test_reference_flags_keep_names_and_defaults():
    args = image_train.parse_args(["--log_dir", "x"])
    for key, value in {**REFERENCE_TRAIN_FLAGS, **model_and_diffusion_defaults()}.items():
        if key != "log_dir":
            assert getattr(args, key) == value, key
    assert (args.seed, args.max_steps, args.precision, args.keep_checkpoints) == (0, 0, "fp32", 0)


def test_no_arguments_means_the_demo_config(monkeypatch, tmp_path):
    demo = tmp_path / "demo.yaml"
    demo.write_text("image_size: 32\nnum_channels: 32\nmax_steps: 7\n")
    monkeypatch.setattr(image_train, "DEMO_CONFIG", str(demo))
    args = image_train.parse_args([])
    assert (args.config, args.image_size, args.max_steps) == (str(demo), 32, 7)
    assert image_train.parse_args(["--lr", "1e-3"]).image_size == 64  # any flag: the reference defaults


@pytest.mark.parametrize("p2_name, baseline_name", TWINS)
def test_bundled_configs_parse(p2_name, baseline_name):
    p2, baseline = (vars(image_train.parse_args(["--config", os.path.join(ROOT, "configs", name)]))
                    for name in (p2_name, baseline_name))
    row = p2_name[: -len("_p2.yaml")]
    gamma, dropout, lr, max_steps, num_params = TABLE_A.get(row, (1.0, 0.0, 5e-4, 1000, 1_371_974))  # else demo
    assert (p2["p2_gamma"], p2["dropout"], p2["lr"], p2["max_steps"]) == (gamma, dropout, lr, max_steps)
    with torch.device("meta"):
        model, _ = create_model_and_diffusion(**{k: p2[k] for k in model_and_diffusion_defaults()})
    assert sum(p.numel() for p in model.parameters()) == num_params
    # The baseline resolves to its P2 config with gamma = 0 and nothing else different.
    assert {k for k in p2 if p2[k] != baseline[k]} == {"p2_gamma", "config"} and baseline["p2_gamma"] == 0.0


def test_default_log_dir_is_a_new_folder_under_runs(images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loop = image_train.main(train_argv(images, "", max_steps=1, save_interval=1, log_interval=1))
    runs = os.listdir(tmp_path / "runs")
    assert len(runs) == 1 and os.path.samefile(loop.log_dir, tmp_path / "runs" / runs[0])
    args = image_train.parse_args(train_argv(images, ""))
    assert image_train.resolve_config(args, 0, 1)["log_dir"] != loop.log_dir  # the next run gets its own folder


def test_config_yaml_holds_resolved_flags_and_use_fp16_means_fp16(images, tmp_path):
    train(images, tmp_path, use_fp16=True, max_steps=1, batch_size=2, log_interval=1)
    config = yaml.safe_load(open(tmp_path / "config.yaml"))
    assert config["precision"] == "fp16" and config["use_fp16"] is False  # fp32 weights, fp16 autocast
    assert config["log_dir"] == str(tmp_path) and config["p2_gamma"] == 1.0
    assert set(model_and_diffusion_defaults()) <= set(config) and "config" not in config
    assert "lg_loss_scale" in read_progress(str(tmp_path))[0]
    # The saved config is itself a valid --config file.
    assert image_train.parse_args(["--config", str(tmp_path / "config.yaml")]).num_channels == 32
    with pytest.raises(SystemExit, match="--use_fp16 True asks for fp16 but --precision is bf16"):
        train(images, tmp_path / "conflict", use_fp16=True, precision="bf16")


def test_channels_last_auto_is_measured_on_a_cpu_and_bad_values_are_named(images, tmp_path):
    train(images, tmp_path / "auto", max_steps=1, batch_size=2)
    assert "speed options: channels_last" in (tmp_path / "auto" / "log.txt").read_text()
    loop = train(images, tmp_path / "plain", max_steps=1, batch_size=2, channels_last=False)
    assert loop.model.input_blocks[0][0].weight.is_contiguous()
    with pytest.raises(SystemExit, match="--channels_last must be auto, true or false"):
        train(images, tmp_path / "bad", channels_last="maybe")


def test_image_sample_reads_the_saved_config(images, tmp_path):
    import image_sample

    train(images, tmp_path, max_steps=1, save_interval=1)
    result = image_sample.main(["--model_path", str(tmp_path / "ema_0.99_000001.pt"), "--num_samples", "2",
                                "--batch_size", "2", "--timestep_respacing", "3", "--sample_dir",
                                str(tmp_path / "samples")])
    assert result.num_samples == 2 and os.path.exists(result.npz_path)


def test_log_dir_with_checkpoints_needs_resume(images, tmp_path):
    train(images, tmp_path, max_steps=2)
    with pytest.raises(SystemExit, match="already holds checkpoints of step\\(s\\) 2.* --resume_checkpoint auto"):
        train(images, tmp_path, max_steps=4)


def test_auto_resume_starts_fresh_then_resumes_from_the_newest_complete_checkpoint(images, tmp_path):
    run_dir = tmp_path / "run"  # does not exist yet
    fresh = train(images, run_dir, max_steps=4, resume_checkpoint="auto")
    assert fresh.step == 4 and "holds no complete checkpoint; starting at step 0" in (run_dir / "log.txt").read_text()
    # A killed write left step 6 incomplete: the rerun resumes from step 4 and replaces it.
    torch.save({"w": torch.zeros(1)}, run_dir / "model000006.pt")
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        resumed = train(images, run_dir, max_steps=6, resume_checkpoint="auto")
    assert resumed.step == 6 and checkpoint.complete_steps(str(run_dir)) == [2, 4, 6]
    assert f"resuming from {run_dir / 'state000004.pt'} at step 4" in (run_dir / "log.txt").read_text()
    # The config saved by an `auto` run does not stop a resume that names the checkpoint, nor the other way round.
    train(images, run_dir, max_steps=8, resume_checkpoint=str(run_dir / "state000006.pt"))
    assert train(images, run_dir, max_steps=10, resume_checkpoint="auto").step == 10
    with pytest.raises(SystemExit, match="--resume_checkpoint auto .* pass --log_dir"):
        image_train.main(train_argv(images, "", resume_checkpoint="auto"))


def test_resume_with_another_model_config_names_the_flags(images, tmp_path):
    train(images, tmp_path, max_steps=2)
    with pytest.raises(SystemExit, match="--num_res_blocks 1 in the checkpoint vs 2 now"):
        train(images, tmp_path, max_steps=4, num_res_blocks=2, resume_checkpoint=str(tmp_path))


def test_weighting_is_logged_saved_in_the_config_and_kept_on_resume(images, tmp_path):
    train(images, tmp_path, max_steps=2, p2_gamma=0.0, weighting="min_snr", snr_gamma=2.0, normalize_weights=True)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (config["weighting"], config["snr_gamma"], config["normalize_weights"]) == ("min_snr", 2.0, True)
    diffusion = create_model_and_diffusion(**{k: config[k] for k in model_and_diffusion_defaults()})[1]
    # T = 100, linear schedule: the mean of min(SNR, 2)/SNR over t is 1/scale.
    scale = diffusion.loss_weight_scale
    assert scale == pytest.approx(1 / np.mean(np.minimum(diffusion.snr, 2.0) / diffusion.snr), rel=1e-12)
    assert f"loss weighting min_snr (snr_gamma 2) of the ε-MSE; normalised: raw weights x {scale:.6g}" in (
        tmp_path / "log.txt").read_text()
    with pytest.raises(SystemExit, match="--weighting 'min_snr' in the checkpoint vs 'sigmoid' now"):
        train(images, tmp_path, max_steps=4, p2_gamma=0.0, weighting="sigmoid", snr_gamma=2.0,
              normalize_weights=True, resume_checkpoint=str(tmp_path))
    with pytest.raises(SystemExit, match="image_train.py: error: --weighting 'p3' is unknown; use one of p2, "):
        train(images, tmp_path / "bad", weighting="p3")


def test_reference_style_resume_from_model_file_continues_in_its_folder(images, tmp_path):
    train(images, tmp_path, max_steps=2)
    for name in ("state000002.pt", "opt000002.pt", "ema_0.99_000002.pt"):
        os.remove(tmp_path / name)
    with pytest.warns(UserWarning) as caught:
        loop = image_train.main(train_argv(images, "", max_steps=4, resume_checkpoint=str(tmp_path / "model000002.pt")))
    messages = " ".join(str(w.message) for w in caught)
    assert "rate 0.99;" in messages and "opt000002.pt not found" in messages
    assert loop.step == 4 and os.path.samefile(loop.log_dir, tmp_path)
    assert checkpoint.complete_steps(str(tmp_path)) == [4]


def test_keep_checkpoints_prunes_older_ones(images, tmp_path):
    train(images, tmp_path, max_steps=6, save_interval=2, keep_checkpoints=2)
    assert checkpoint.complete_steps(str(tmp_path)) == [4, 6]
    assert sorted(checkpoint.checkpoint_files_by_step(str(tmp_path))) == [4, 6]


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_keeps_previous_and_resume_is_exact(images, tmp_path):
    flags = dict(max_steps=6, save_interval=2, log_interval=2)
    train(images, tmp_path / "straight", **flags)
    killed_dir = tmp_path / "killed"
    result = subprocess.run(
        [sys.executable, KILLED, "state000004.pt", *train_argv(images, str(killed_dir), **flags)],
        env=clean_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    names = os.listdir(killed_dir)
    assert checkpoint.complete_steps(str(killed_dir)) == [2]
    assert "model000004.pt" in names and "state000004.pt" not in names  # killed between the files of step 4
    assert any(n.startswith(".state000004.pt" + fileio.TEMPORARY_MARKER) for n in names)
    previous = torch.load(killed_dir / "state000002.pt", weights_only=True)
    assert checkpoint.is_training_state(previous) and previous["step"] == 2

    with pytest.warns(UserWarning, match="interrupted"):
        resumed = train(images, killed_dir, resume_checkpoint=str(killed_dir), **flags)
    assert resumed.step == 6
    assert checkpoint.complete_steps(str(killed_dir)) == [2, 4, 6]
    assert not any(fileio.TEMPORARY_MARKER in n for n in os.listdir(killed_dir))
    assert checkpoint_digests(str(killed_dir), 6) == checkpoint_digests(str(tmp_path / "straight"), 6)


def one_line_error(argv, capsys):
    """image_train.main(argv)'s error message, checked to be one line with nothing else on stderr but the bar."""
    with pytest.raises(SystemExit) as stopped:
        image_train.main(argv)
    message = stopped.value.code
    assert isinstance(message, str) and message.startswith("image_train.py: error: ") and "\n" not in message
    assert "Traceback" not in capsys.readouterr().err
    return message


CONFIG_ERRORS = {
    "missing": (None, "config file '.*none.yaml' does not exist"),
    "yaml_syntax": ("batch_size: [1,\nlr: 2\n", "config file '.*bad.yaml' is not valid YAML: .*line 1"),
    "not_a_mapping": ("- 1\n- 2\n", "config file '.*bad.yaml' must hold a mapping"),
    "unknown_key": ("batch_sise: 4\n", "config file '.*bad.yaml' has unknown key\\(s\\) batch_sise"),
    "wrong_type": ("batch_size: four\n", "config file '.*bad.yaml'.*batch_size.*'four'"),
}


@pytest.mark.parametrize("case", CONFIG_ERRORS)
def test_config_errors_end_in_one_line(images, tmp_path, capsys, case):
    text, expected = CONFIG_ERRORS[case]
    config = tmp_path / ("none.yaml" if text is None else "bad.yaml")
    if text is not None:
        config.write_text(text)
    message = one_line_error(["--config", str(config), *train_argv(images, str(tmp_path / "run"))], capsys)
    assert re.search(expected, message), message
    assert not (tmp_path / "run").exists()


def test_log_dir_resume_and_non_finite_loss_errors_end_in_one_line(images, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for log_dir in (tmp_path / "file", tmp_path / "file" / "run"):
        message = one_line_error(train_argv(images, str(log_dir)), capsys)
        assert message.endswith(f"--log_dir {log_dir} cannot be created: {tmp_path / 'file'} is not a folder; "
                                "choose another --log_dir")
    missing = tmp_path / "none.pt"
    message = one_line_error(train_argv(images, str(tmp_path / "run"), resume_checkpoint=str(missing)), capsys)
    assert f"--resume_checkpoint '{missing}' does not exist" in message
    message = one_line_error(train_argv(images, str(tmp_path / "nan"), lr=1e30, max_steps=6, log_interval=1), capsys)
    assert re.search("the training loss became inf/NaN before step .* train again with a lower --lr", message)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_data_dir_without_readable_images_ends_in_one_line(tmp_path, num_workers):
    """Every image corrupt: one line after the skip warnings, exit 1, and no wait for the decoding worker (before,
    the worker's error came back as a traceback and the exit then waited for ever for the worker)."""
    data = tmp_path / "data"
    data.mkdir()
    for index in range(6):
        (data / f"x{index}.png").write_bytes(b"not a png" * (index + 1))
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "image_train.py"),
         *train_argv(str(data), str(tmp_path / "run"), num_workers=num_workers)],
        env=clean_env(PYTHONWARNINGS="ignore"), capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.split("\n") if line.strip() and "step/s" not in line]  # not the bar
    assert lines == [f"image_train.py: error: only 0 of the 6 images of this rank's shard of '{data}' are readable, "
                     "fewer than batch_size 4; see the warnings above for the skipped files"], result.stderr[-3000:]
