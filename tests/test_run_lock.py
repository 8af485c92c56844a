"""guided_diffusion/run_lock.py and scripts/image_train.py: one run per --log_dir, the ranks of one job sharing it."""

import errno
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from launchers import LAUNCHERS, clean_env, launcher_command
from train_fixtures import ROOT, train, train_argv

from guided_diffusion import checkpoint, run_lock

SHARED = os.path.join(os.path.dirname(__file__), "dist_scripts", "train_shared_log_dir.py")
IMAGE_TRAIN = os.path.join(ROOT, "scripts", "image_train.py")
# A process that locks the folder argv[1], reports "<pid> locked", then exits normally when its stdin closes; with
# argv[2] == "fork" it first forks a child that inherits the lock, and the locking process itself exits at once (as a
# killed run may leave its data-loading workers behind for a while).
HOLDER = """
import os, sys
from guided_diffusion import run_lock
lock = run_lock.acquire(sys.argv[1])
if sys.argv[2:] == ["fork"] and os.fork() != 0:
    os._exit(0)
print(os.getpid(), "locked", flush=True)
sys.stdin.read()
"""


def start_holder(log_dir, *extra):
    """A HOLDER process on `log_dir`, once it holds the lock; returns (Popen, pid of the process holding it)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(log_dir), *extra], env=clean_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid, word = holder.stdout.readline().split()
    assert word == "locked"
    return holder, int(pid)


def folder_digests(folder):
    """{file name: SHA-256 of its bytes} of every file in `folder`."""
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in os.listdir(folder)}


def test_a_held_lock_names_its_holder_and_release_frees_it(tmp_path):
    lock = run_lock.acquire(str(tmp_path / "run"))  # creates the folder
    holder = run_lock.read_holder(str(tmp_path / "run"))
    assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
    with pytest.raises(run_lock.LogDirError, match=rf"--log_dir .*run is in use by another run \(pid {os.getpid()} "
                                                   rf"on {socket.gethostname()}, started .*: .*pytest"):
        run_lock.acquire(str(tmp_path / "run"))
    lock.release()
    lock.release()
    with run_lock.acquire(str(tmp_path / "run"), flag="--out"), pytest.raises(run_lock.LogDirError, match="^--out "):
        run_lock.acquire(str(tmp_path / "run"), flag="--out")
    run_lock.acquire(str(tmp_path / "run")).release()


@pytest.mark.parametrize("end", ["exit", "SIGKILL"])
def test_the_lock_of_a_process_that_ended_is_free(tmp_path, end):
    holder, pid = start_holder(tmp_path)
    try:
        with pytest.raises(run_lock.LogDirError, match=f"in use by another run \\(pid {pid} "):
            run_lock.acquire(str(tmp_path))
        if end == "exit":
            holder.stdin.close()
            assert holder.wait(timeout=30) == 0
        else:
            holder.kill()
            holder.wait(timeout=30)
    finally:
        holder.kill()
    assert run_lock.read_holder(str(tmp_path))["pid"] == pid  # the record stays; the lock does not
    run_lock.acquire(str(tmp_path)).release()


def test_a_child_left_holding_the_lock_is_waited_for_then_named(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "STALE_WAIT_S", 0.3)
    holder, child = start_holder(tmp_path, "fork")
    try:
        holder.wait(timeout=30)  # the process that locked it has exited; its child still holds the lock
        recorded = run_lock.read_holder(str(tmp_path))["pid"]
        assert recorded == holder.pid != child
        with pytest.raises(run_lock.LogDirError, match=f"left running, though pid {recorded} itself has exited"):
            run_lock.acquire(str(tmp_path))
    finally:
        os.kill(child, signal.SIGKILL)
    # The child's end within the wait lets the next run in.
    monkeypatch.setattr(run_lock, "STALE_WAIT_S", 30.0)
    run_lock.acquire(str(tmp_path)).release()


def test_a_holder_that_has_not_recorded_itself_yet(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "UNRECORDED_WAIT_S", 0.2)
    with open(tmp_path / run_lock.LOCK_FILE, "w") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(run_lock.LogDirError, match="in use by another process, which has not recorded itself"):
            run_lock.acquire(str(tmp_path))


def test_a_log_dir_that_cannot_be_a_folder_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    for log_dir in (tmp_path / "file", tmp_path / "file" / "run" / "sub"):
        with pytest.raises(run_lock.LogDirError, match=f"--log_dir {log_dir} cannot be created: {tmp_path / 'file'} "
                                                       "is not a folder; choose another --log_dir"):
            run_lock.acquire(str(log_dir))


def test_a_file_system_without_flock_runs_unlocked_with_a_warning(tmp_path, monkeypatch):
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.warns(UserWarning, match="this file system has no flock"):
        run_lock.acquire(str(tmp_path)).release()


def test_a_second_run_stops_at_once_naming_the_first_and_runs_after_it_is_killed(images, tmp_path):
    run = tmp_path / "run"
    train(images, run, max_steps=2)
    holder, pid = start_holder(run)  # the first run, still running
    try:
        before = folder_digests(run)
        second = subprocess.run(
            [sys.executable, IMAGE_TRAIN, *train_argv(images, str(run), max_steps=4, resume_checkpoint="auto")],
            env=clean_env(PYTHONWARNINGS="ignore"), capture_output=True, text=True, timeout=300, check=False,
        )
        assert second.returncode == 1
        started = run_lock.read_holder(str(run))["started"]
        assert second.stderr.splitlines() == [(
            f"image_train.py: error: --log_dir {run} is in use by another run (pid {pid} on {socket.gethostname()}, "
            f"started {started}: -c {run}); wait for it to end or choose another --log_dir"
        )]
        assert folder_digests(run) == before
        holder.kill()
        holder.wait(timeout=30)
    finally:
        holder.kill()
    assert train(images, run, max_steps=4, resume_checkpoint="auto").step == 4
    assert checkpoint.complete_steps(str(run)) == [2, 4]
    run_lock.acquire(str(run)).release()  # released when main() returned


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_the_ranks_of_one_job_share_the_lock_and_another_run_stops_them_all(images, tmp_path, launcher):
    run, reports = tmp_path / "run", tmp_path / "reports"
    reports.mkdir()
    command = launcher_command(launcher, SHARED, images, str(run), str(reports))
    result = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["step"] for r in ranks] == [2, 2] and ranks[0]["pid"] != ranks[1]["pid"]
    assert [r["holder"]["pid"] for r in ranks] == [ranks[0]["pid"]] * 2  # rank 0 held it for both
    assert checkpoint.complete_steps(str(run)) == [2]

    os.remove(reports / "rank0.json")
    os.remove(reports / "rank1.json")
    with run_lock.acquire(str(run)):
        before = folder_digests(run)
        refused = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=300, check=False)
        assert folder_digests(run) == before
    assert refused.returncode != 0
    assert f"image_train.py: error: --log_dir {run} is in use by another run (pid {os.getpid()} " in refused.stderr
    assert os.listdir(reports) == []
