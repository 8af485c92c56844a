"""scripts/classifier_train.py: the reference's flags, checkpoints and logs, exact and reference-style resume, a stop
signal, a multi-rank launch, and refused input."""

import os
import signal
import subprocess
import sys

import classifier_train
import pytest
import torch
import yaml
from classifier_fixtures import (
    TINY_CLASSIFIER_FLAGS,
    classifier_train_argv,
    make_two_class_folder,
)
from launchers import LAUNCHERS, clean_env, launcher_command

from guided_diffusion import checkpoint
from guided_diffusion.classifier_util import (
    classifier_and_diffusion_defaults,
    create_classifier,
)
from guided_diffusion.logger import read_progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "classifier_train.py")
REFERENCE_FLAGS = {
    "data_dir": "", "val_data_dir": "", "noised": True, "iterations": 150000, "lr": 3e-4, "weight_decay": 0.0,
    "anneal_lr": False, "batch_size": 4, "microbatch": -1, "schedule_sampler": "uniform", "resume_checkpoint": "",
    "log_interval": 10, "eval_interval": 5, "save_interval": 10000,
    "image_size": 64, "classifier_use_fp16": False, "classifier_width": 128, "classifier_depth": 2,
    "classifier_attention_resolutions": "32,16,8", "classifier_use_scale_shift_norm": True,
    "classifier_resblock_updown": True, "classifier_pool": "attention",
    "learn_sigma": False, "diffusion_steps": 1000, "noise_schedule": "linear", "timestep_respacing": "",
    "use_kl": False, "predict_xstart": False, "rescale_timesteps": False, "rescale_learned_sigmas": False,
}


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory):
    return make_two_class_folder(str(tmp_path_factory.mktemp("two_classes")))


def train(data_dir, log_dir, **flags):
    return classifier_train.main(classifier_train_argv(data_dir, str(log_dir), **flags))


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_reference_flags_keep_names_and_defaults():
    args = classifier_train.parse_args([])
    assert {key: getattr(args, key) for key in REFERENCE_FLAGS} == REFERENCE_FLAGS
    assert set(classifier_and_diffusion_defaults()) <= set(vars(args))


def test_run_writes_reference_checkpoints_logs_and_config(two_classes, tmp_path):
    loop = train(two_classes, tmp_path, iterations=4, val_data_dir=two_classes, anneal_lr=True)
    names = set(os.listdir(tmp_path))
    assert {"model000004.pt", "opt000004.pt", "state000004.pt"} <= names
    assert not any(name.startswith("ema_") for name in names)
    # modelNNNNNN.pt is a plain state_dict of the reference's layout.
    create_classifier(**TINY_CLASSIFIER_FLAGS).load_state_dict(weights(tmp_path / "model000004.pt"), strict=True)
    rows = read_progress(str(tmp_path))
    assert [row["step"] for row in rows] == [1, 2, 4]
    assert [row["samples"] for row in rows] == [4, 8, 16]
    for key in ("train_loss", "train_acc@1", "train_acc@5", "val_loss", "val_acc@1", "val_acc@5"):
        assert key in rows[-1], key
    assert any(key.startswith("train_loss_q") for key in rows[-1])
    assert all(0 <= row["train_acc@1"] <= row["train_acc@5"] <= 1 for row in rows)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (config["iterations"], config["precision"], config["classifier_width"]) == (4, "fp32", 32)
    # --anneal_lr: step s ran at lr·(1 - s/iterations); the last step was s = 3.
    assert loop.opt.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 - 3 / 4))


def test_clean_images_are_classified_at_t_zero(two_classes, tmp_path):
    train(two_classes, tmp_path, iterations=1, noised=False)
    row = read_progress(str(tmp_path))[0]
    assert "train_loss_q0" in row and not any(f"train_loss_q{q}" in row for q in (1, 2, 3))


def test_resume_is_exact_validation_changes_no_training_draw_and_auto_resume_finds_the_newest(two_classes, tmp_path):
    flags = {"val_data_dir": two_classes, "microbatch": 2, "save_interval": 2}
    straight = train(two_classes, tmp_path / "straight", iterations=4, **flags)
    train(two_classes, tmp_path / "resumed", iterations=2, **flags)
    resumed = train(two_classes, tmp_path / "resumed", iterations=4, resume_checkpoint="auto", **flags)
    assert resumed.step == 4
    for name in ("model000004.pt", "opt000004.pt"):
        expected, found = weights(tmp_path / "straight" / name), weights(tmp_path / "resumed" / name)
        assert checkpoint.state_dict_fingerprint(found) == checkpoint.state_dict_fingerprint(expected), name
    assert read_progress(str(tmp_path / "resumed")) == read_progress(str(tmp_path / "straight"))
    assert straight.step == 4
    # Validation draws nothing from the training streams: without it the weights are the same.
    train(two_classes, tmp_path / "unvalidated", iterations=4, microbatch=2, save_interval=2)
    assert checkpoint.state_dict_fingerprint(weights(tmp_path / "unvalidated" / "model000004.pt")) == \
        checkpoint.state_dict_fingerprint(weights(tmp_path / "straight" / "model000004.pt"))


def test_reference_style_resume_from_a_model_file_with_its_optimizer(two_classes, tmp_path):
    train(two_classes, tmp_path, iterations=2, save_interval=2)
    os.remove(tmp_path / "state000002.pt")  # as the reference leaves a run: modelNNNNNN.pt and optNNNNNN.pt
    with pytest.warns(UserWarning, match="not exact"):
        loop = train(two_classes, tmp_path, iterations=3, resume_checkpoint=str(tmp_path / "model000002.pt"))
    assert loop.step == 3 and os.path.exists(tmp_path / "state000003.pt")


def test_a_stop_signal_saves_the_step_and_exits_with_128_plus_the_signal(two_classes, tmp_path, monkeypatch):
    run_step = classifier_train.ClassifierTrainLoop.run_step

    def signalled_at_step_two(self, batch, labels):
        run_step(self, batch, labels)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(classifier_train.ClassifierTrainLoop, "run_step", signalled_at_step_two)
    with pytest.raises(SystemExit) as stopped:
        train(two_classes, tmp_path, iterations=10, save_interval=5)
    assert stopped.value.code == 128 + signal.SIGUSR1
    assert checkpoint.complete_steps(str(tmp_path)) == [2]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_ranks_train_and_save_once(two_classes, tmp_path, launcher):
    command = launcher_command(launcher, SCRIPT, *classifier_train_argv(two_classes, str(tmp_path), iterations=2,
                                                                           batch_size=2, save_interval=2))
    done = subprocess.run(command, check=False, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert checkpoint.complete_steps(str(tmp_path)) == [2]
    assert [row["samples"] for row in read_progress(str(tmp_path))] == [4, 8]  # 2 ranks x batch 2 per step


@pytest.mark.parametrize("flags, message", [
    ({"data_dir": ""}, "--data_dir is required"),
    ({"schedule_sampler": "loss-second-moment"}, "--schedule_sampler 'loss-second-moment'"),
    ({"timestep_respacing": "10"}, "--timestep_respacing '10'"),
    ({"classifier_use_fp16": True, "precision": "bf16"}, "--classifier_use_fp16 True asks for fp16"),
    ({"classifier_pool": "max"}, "--classifier_pool 'max'"),
    ({"eval_interval": 0}, "--eval_interval 0 must be >= 1"),
])
def test_bad_flags_end_with_one_line(two_classes, tmp_path, flags, message):
    with pytest.raises(SystemExit) as error:
        train(flags.pop("data_dir", two_classes), tmp_path, iterations=1, **flags)
    assert str(error.value).startswith("classifier_train.py: error: ") and message in str(error.value)


def test_one_class_data_and_a_resume_with_another_model_are_refused(two_classes, tmp_path):
    single = make_two_class_folder(str(tmp_path / "single"), count=4)
    for name in os.listdir(single):
        os.rename(os.path.join(single, name), os.path.join(single, "cat_" + name))
    with pytest.raises(SystemExit, match="holds 1 class\\(es\\) by file name"):
        train(single, tmp_path / "run", iterations=1)
    train(two_classes, tmp_path / "run2", iterations=1, save_interval=1)
    with pytest.raises(SystemExit, match="--classifier_width 32 in the checkpoint vs 64 now"):
        train(two_classes, tmp_path / "run2", iterations=2, resume_checkpoint="auto", classifier_width=64)


@pytest.mark.slow
def test_script_runs_from_the_command_line(two_classes, tmp_path):
    argv = classifier_train_argv(two_classes, str(tmp_path), iterations=1, save_interval=1)
    done = subprocess.run([sys.executable, SCRIPT, *argv], check=False, cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert checkpoint.complete_steps(str(tmp_path)) == [1]
