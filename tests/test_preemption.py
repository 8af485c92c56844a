"""Preemption (guided_diffusion/preemption.py): SIGTERM, SIGUSR1 and Ctrl-C stop training after a checkpoint of the
step they interrupted, on every rank at the same step, with exit code 128 + the signal and no traceback; rerunning
the same command with --resume_checkpoint auto ends bit-identical to an uninterrupted run. Also: a second Ctrl-C,
wall-clock checkpoints (--save_interval_minutes, on a fake clock) and DataLoader workers that ignore the signals."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from launchers import clean_env, launcher_command, requires_mpiexec
from train_fixtures import checkpoint_digests, read_progress, train, train_argv

import image_train
from guided_diffusion import checkpoint, preemption, train_util
from guided_diffusion.image_datasets import load_data

SIGNALLED = os.path.join(os.path.dirname(__file__), "dist_scripts", "train_signalled.py")
MAX_STEPS = 8
FLAGS = dict(max_steps=MAX_STEPS, log_interval=3, save_interval=100, resume_checkpoint="auto")
EXIT_CODES = {"TERM": 143, "USR1": 138, "INT": 130}
LAUNCH_TIMEOUT_S = 180


def _signal_step(case):
    """The step a case's signal interrupts: a seeded random choice in 2..MAX_STEPS - 2."""
    return random.Random(case).randint(2, MAX_STEPS - 2)


def _launch(command, out_dir, interrupt_ranks=0):
    """Run a train_signalled.py command; with `interrupt_ranks`, Ctrl-C its whole process group (launcher, ranks and
    DataLoader workers, as a terminal does) once that many ranks wait at their step. Returns (exit code, stderr)."""
    process = subprocess.Popen(command, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        if interrupt_ranks:
            waiting = [os.path.join(out_dir, f"waiting_rank{r}") for r in range(interrupt_ranks)]
            deadline = time.monotonic() + LAUNCH_TIMEOUT_S
            while not all(map(os.path.exists, waiting)) and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, stderr


def _assert_stopped(out_dir, run_dir, name, step, ranks):
    """A signalled run's stop: each rank's exit code, no traceback, the message, the checkpoint and row of `step`."""
    for rank in range(ranks):
        stderr = open(os.path.join(out_dir, f"stderr_rank{rank}.txt")).read()
        assert "Traceback" not in stderr, stderr[-3000:]
        exit_file = os.path.join(out_dir, f"exit_rank{rank}.json")
        # Under mpiexec, rank 0's exit aborts the job (mpi4py) and may end a peer before it records its code.
        if rank == 0 or os.path.exists(exit_file):
            assert json.load(open(exit_file))["code"] == EXIT_CODES[name], rank
    # (After it, `python -m mpi4py` reports the exit code it aborts the MPI job with.)
    assert (f"image_train.py: stopped by SIG{name} at step {step}; its checkpoint is in {run_dir}; rerun the same "
            "command to resume") in open(os.path.join(out_dir, "stderr_rank0.txt")).read().splitlines()
    assert f"stopped by SIG{name} at step {step}" in open(os.path.join(run_dir, "log.txt")).read()
    assert checkpoint.complete_steps(run_dir) == [step]
    assert read_progress(run_dir)[-1]["step"] == step


def _assert_finished_like(run_dir, straight_dir, stop_step):
    assert checkpoint.complete_steps(run_dir) == [stop_step, MAX_STEPS]
    assert checkpoint_digests(run_dir, MAX_STEPS) == checkpoint_digests(straight_dir, MAX_STEPS)
    # One row per step logged: the first, every log_interval, the stop step and the last.
    expected = sorted({1, stop_step, MAX_STEPS} | set(range(3, MAX_STEPS, 3)))
    assert [row["step"] for row in read_progress(run_dir)] == expected


@pytest.fixture(scope="module")
def straight(images, tmp_path_factory):
    """An uninterrupted single-process run of MAX_STEPS steps."""
    run_dir = tmp_path_factory.mktemp("straight")
    train(images, run_dir, **FLAGS)
    return str(run_dir)


@pytest.mark.parametrize("name", ["TERM", "USR1", "INT"])
def test_signal_stops_after_a_checkpoint_and_the_same_command_resumes_exactly(images, tmp_path, straight, name):
    step = _signal_step(f"one rank {name}")
    run_dir, out_dir = str(tmp_path / "run"), str(tmp_path / "out")
    # SIGTERM and SIGUSR1 come from the process itself mid-step; Ctrl-C from outside, to the whole process group with
    # a DataLoader worker in it, as a terminal sends it.
    how = ["INT", str(step), "wait"] if name == "INT" else [name, str(step), "all"]
    command = [sys.executable, SIGNALLED, *how, out_dir, *train_argv(images, run_dir, num_workers=1, **FLAGS)]
    code, _ = _launch(command, out_dir, interrupt_ranks=1 if name == "INT" else 0)
    assert code == EXIT_CODES[name]
    _assert_stopped(out_dir, run_dir, name, step, ranks=1)

    rerun = train(images, run_dir, num_workers=1, **FLAGS)  # the same command again
    assert rerun.step == MAX_STEPS
    _assert_finished_like(run_dir, straight, step)


@pytest.fixture(scope="module")
def straight_two_ranks(images, tmp_path_factory):
    """An uninterrupted 2-rank run of MAX_STEPS steps (train_signalled.py with no step to signal)."""
    root = tmp_path_factory.mktemp("straight_two_ranks")
    command = launcher_command("torchrun", SIGNALLED, "TERM", "0", "all", str(root / "out"),
                               *train_argv(images, str(root / "run"), **FLAGS))
    result = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return str(root / "run")


@pytest.mark.slow
@pytest.mark.parametrize("launcher, name, ranks, lag", [
    ("torchrun", "INT", "wait", 0),                             # Ctrl-C to the process group: launcher and ranks
    pytest.param("mpi", "USR1", "1", 0, marks=requires_mpiexec),  # one rank signalled: the other learns of it
    ("torchrun", "TERM", "0", 1),                               # decisions one step late, as on CUDA
])
def test_two_ranks_stop_at_the_same_step_and_resume_exactly(images, tmp_path, monkeypatch, straight_two_ranks,
                                                            launcher, name, ranks, lag):
    step = _signal_step(f"two ranks {launcher} {name}")
    run_dir, out_dir = str(tmp_path / "run"), str(tmp_path / "out")
    flags = train_argv(images, run_dir, num_workers=1, **FLAGS)
    command = launcher_command(launcher, SIGNALLED, name, str(step), ranks, out_dir, *flags)
    monkeypatch.setenv("DECISION_LAG", str(lag))  # passed on by clean_env()
    code, stderr = _launch(command, out_dir, interrupt_ranks=2 if ranks == "wait" else 0)
    # The launchers' own reports: mpiexec passes rank 0's code on; torchrun exits 1 naming each rank's code.
    assert code == (EXIT_CODES[name] if launcher == "mpi" else 1), stderr[-3000:]
    stop_step = step + lag
    _assert_stopped(out_dir, run_dir, name, stop_step, ranks=2)

    rerun_code, stderr = _launch(command, out_dir)
    assert rerun_code == 0, stderr[-3000:]
    _assert_finished_like(run_dir, straight_two_ranks, stop_step)


def _signal_at_step(monkeypatch, step, *signums, clock_step_s=0.0):
    """Patch TrainLoop.optimize to send `signums` to this process during step `step`, advancing a fake
    preemption.clock by `clock_step_s` after each."""
    now = [0.0]
    monkeypatch.setattr(preemption, "clock", lambda: now[0])
    optimize = train_util.TrainLoop.optimize

    def signalled(self, log_now):
        if self.step + 1 == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
                now[0] += clock_step_s
        optimize(self, log_now)

    monkeypatch.setattr(train_util.TrainLoop, "optimize", signalled)


@pytest.mark.parametrize("seconds_apart, stops_at_once", [(preemption.REPEAT_WINDOW_S, True), (0.0, False)])
def test_a_second_ctrl_c_stops_at_once(images, tmp_path, monkeypatch, capsys, seconds_apart, stops_at_once):
    before = {signum: signal.getsignal(signum) for signum in preemption.STOP_SIGNALS}
    _signal_at_step(monkeypatch, 3, signal.SIGINT, signal.SIGINT, clock_step_s=seconds_apart)
    with pytest.raises(SystemExit) as exit_info:
        train(images, tmp_path, **FLAGS)
    assert exit_info.value.code == 130
    stderr = capsys.readouterr().err
    if stops_at_once:
        assert "image_train.py: interrupted; rerun with --resume_checkpoint auto --log_dir LOG_DIR" in stderr
        assert checkpoint.complete_steps(str(tmp_path)) == []
    else:  # one Ctrl-C delivered twice (by the terminal and by a launcher forwarding it)
        assert "stopped by SIGINT at step 3" in stderr
        assert checkpoint.complete_steps(str(tmp_path)) == [3]
    assert {signum: signal.getsignal(signum) for signum in preemption.STOP_SIGNALS} == before


def test_a_signal_during_the_last_step_finishes_the_run(images, tmp_path, monkeypatch):
    _signal_at_step(monkeypatch, MAX_STEPS, signal.SIGTERM)
    loop = train(images, tmp_path, **FLAGS)
    assert loop.step == MAX_STEPS and checkpoint.complete_steps(str(tmp_path)) == [MAX_STEPS]


def test_save_interval_minutes_checkpoints_on_the_wall_clock_and_keeps_resume_exact(images, tmp_path, straight,
                                                                                      monkeypatch):
    now = [0.0]
    monkeypatch.setattr(preemption, "clock", lambda: now[0])
    run_step = train_util.TrainLoop.run_step

    def timed_run_step(self, batch, cond):
        run_step(self, batch, cond)
        now[0] += 25.0  # seconds per step

    monkeypatch.setattr(train_util.TrainLoop, "run_step", timed_run_step)
    run_dir = tmp_path / "timed"
    train(images, run_dir, save_interval_minutes=1.0, **FLAGS)
    # 60 s have passed since the previous save after step 3 (75 s) and step 6 (150 s, 75 s after the save at 3).
    assert checkpoint.complete_steps(str(run_dir)) == [3, 6, MAX_STEPS]
    assert checkpoint_digests(str(run_dir), MAX_STEPS) == checkpoint_digests(straight, MAX_STEPS)
    # A resume from a wall-clock checkpoint is exact too.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in checkpoint.checkpoint_files_by_step(str(run_dir))[3] + [checkpoint.CONFIG_FILE]:
        os.link(run_dir / name, resumed / name)
    monkeypatch.setattr(train_util.TrainLoop, "run_step", run_step)
    train(images, resumed, save_interval_minutes=1.0, **FLAGS)
    assert checkpoint_digests(str(resumed), MAX_STEPS) == checkpoint_digests(straight, MAX_STEPS)


def test_dataloader_workers_ignore_the_stop_signals(images):
    data = load_data(data_dir=images, batch_size=4, image_size=16, num_workers=1)
    first = next(data)[0]
    workers = data._iterator._workers
    for signum in preemption.STOP_SIGNALS:
        os.kill(workers[0].pid, signum)
    for _ in range(6):
        next(data)
    assert workers[0].is_alive() and first.shape == (4, 3, 16, 16)
    data.close()


def test_handlers_are_installed_only_in_the_main_thread():
    def handler(signum, frame):
        pass

    seen = []

    def in_thread():
        with preemption.signal_handlers(handler):
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen == [signal.getsignal(signal.SIGTERM)] and seen[0] is not handler
    with preemption.signal_handlers(handler):
        assert signal.getsignal(signal.SIGTERM) is handler
    assert signal.getsignal(signal.SIGTERM) is seen[0]


def test_auto_resume_needs_log_dir():
    args = image_train.parse_args(["--resume_checkpoint", "auto"])
    with pytest.raises(ValueError, match="--resume_checkpoint auto .* no --log_dir was given; pass --log_dir"):
        image_train.resolve_config(args, 0, 1)
