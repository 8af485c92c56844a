"""Training through faults of its files: a full disk while saving, a truncated file in the newest checkpoint, and a
checkpoint that does not fit the flags. Each ends in one message; what was saved before resumes exactly."""

import os
import shutil
import subprocess
import sys

import pytest
from launchers import clean_env
from test_checkpoint import truncate_file
from test_fileio import writes_to_full_device
from train_fixtures import ROOT, checkpoint_digests, train, train_argv

from guided_diffusion import checkpoint

STEP_4_FILES = ["model000004.pt", "ema_0.9_000004.pt", "ema_0.99_000004.pt", "opt000004.pt", "state000004.pt"]


@pytest.fixture(scope="module")
def straight_to_4(images, tmp_path_factory):
    """A run to step 4 with checkpoints at 2 and 4."""
    log_dir = tmp_path_factory.mktemp("straight")
    train(images, log_dir, max_steps=4)
    return log_dir


def test_full_disk_while_saving_is_one_line_and_the_previous_checkpoint_resumes(
    images, tmp_path, monkeypatch, straight_to_4
):
    # The disk fills up while the first EMA file of step 4 is written: model000004.pt is already there.
    writes_to_full_device(monkeypatch, ".ema_0.9_000004.pt")
    with pytest.raises(SystemExit) as stopped:
        train(images, tmp_path, max_steps=4)
    assert stopped.value.code == (
        f"image_train.py: error: no space left on device writing {tmp_path / 'ema_0.9_000004.pt'} (its previous "
        "version, if any, is unchanged): free some space and run the command again"
    )
    assert checkpoint.complete_steps(str(tmp_path)) == [2] and "model000004.pt" in os.listdir(tmp_path)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        resumed = train(images, tmp_path, max_steps=4, resume_checkpoint="auto")
    assert resumed.step == 4
    assert checkpoint_digests(str(tmp_path), 4) == checkpoint_digests(str(straight_to_4), 4)


def _can_mount_tmpfs():
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "tmpfs", "/mnt"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="cannot mount a tmpfs in a user namespace (unshare -rm) here")
def test_full_tmpfs_while_saving_is_one_line_and_the_previous_checkpoint_resumes(images, tmp_path, straight_to_4):
    # A real full file system: a 40 MiB tmpfs holds one checkpoint of the tiny model (~30 MB), not two. It lives
    # in the child's mount namespace only, so the child copies the log dir out before it ends.
    log_dir, copy = tmp_path / "on_tmpfs", tmp_path / "copy"
    log_dir.mkdir()
    copy.mkdir()
    command = " ".join([sys.executable, os.path.join(ROOT, "scripts", "image_train.py"),
                        *train_argv(images, str(log_dir), max_steps=4)])
    script = (f"mount -t tmpfs -o size=40m tmpfs {log_dir} || exit 99; {command}; code=$?; "
              f"cp -a {log_dir}/. {copy}/; exit $code")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=clean_env(), capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"image_train.py: error: no space left on device writing {log_dir}/")
    assert checkpoint.complete_steps(str(copy)) == [2]
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        resumed = train(images, copy, max_steps=4, resume_checkpoint=str(copy))
    assert resumed.step == 4 and checkpoint_digests(str(copy), 4) == checkpoint_digests(str(straight_to_4), 4)


@pytest.fixture(scope="module")
def resumed_from_2_to_6(straight_to_4, images, tmp_path_factory):
    """Digests of step 6 of the run resumed from checkpoint 2 (checkpoint 4 removed)."""
    log_dir = tmp_path_factory.mktemp("from_2")
    shutil.copytree(straight_to_4, log_dir, dirs_exist_ok=True)
    for name in STEP_4_FILES:
        os.remove(log_dir / name)
    train(images, log_dir, max_steps=6, resume_checkpoint=str(log_dir))
    return checkpoint_digests(str(log_dir), 6)


@pytest.mark.parametrize(
    "damaged, resume",
    [(name, "folder") for name in ("model000004.pt", "ema_0.9_000004.pt", "opt000004.pt", "state000004.pt")]
    + [("state000004.pt", "auto")],
)
def test_truncated_file_of_the_newest_checkpoint_falls_back_to_the_one_before(
    images, tmp_path, straight_to_4, resumed_from_2_to_6, damaged, resume
):
    shutil.copytree(straight_to_4, tmp_path, dirs_exist_ok=True)
    truncate_file(tmp_path / damaged)
    with pytest.warns(UserWarning, match=f"{tmp_path / damaged} is unreadable .*resuming from checkpoint 2"):
        loop = train(images, tmp_path, max_steps=6, resume_checkpoint=str(tmp_path) if resume == "folder" else resume)
    assert loop.step == 6 and checkpoint.complete_steps(str(tmp_path)) == [2, 4, 6]
    assert checkpoint_digests(str(tmp_path), 6) == resumed_from_2_to_6
    assert all((tmp_path / (name + checkpoint.UNREADABLE_SUFFIX)).exists() for name in STEP_4_FILES)
    assert f"resuming from {tmp_path / 'state000002.pt'} at step 2" in (tmp_path / "log.txt").read_text()


def test_checkpoint_not_fitting_the_flags_without_config_is_a_short_summary(images, tmp_path, straight_to_4):
    # Weights copied to a new folder as step 0 (no config.yaml beside them), resumed with other channel counts.
    shutil.copy(straight_to_4 / "model000004.pt", tmp_path / "model000000.pt")
    with pytest.warns(UserWarning, match="not exact"), pytest.raises(SystemExit) as stopped:
        train(images, tmp_path / "run", max_steps=2, num_channels=64, resume_checkpoint=str(tmp_path))
    message = str(stopped.value.code)
    assert message.startswith(f"image_train.py: error: {tmp_path / 'model000000.pt'} does not fit the U-Net")
    assert "check --num_channels / --channel_mult" in message and len(message.splitlines()) <= 6
    assert "size mismatch" not in message  # not torch's dump of every key
