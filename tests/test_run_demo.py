"""scripts/run_demo.py: train -> sample -> evaluate on the bundled dataset, shortened (the demo's whole pipeline);
stop signals passed on to the running stage, and a rerun that resumes."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import save_standin_inception
from launchers import clean_env
from train_fixtures import read_progress

from guided_diffusion import checkpoint, preemption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path):
    standin = save_standin_inception(tmp_path / "standin.pt")
    log_dir = tmp_path / "demo"
    command = [
        sys.executable, os.path.join(ROOT, "scripts", "run_demo.py"),
        "--log_dir", str(log_dir),
        "--eval_interval", "2",
        "--eval_samples", "8",
        "--num_samples", "12",
        "--timestep_respacing", "5",
        "--inception_path", standin,
        "--train_flags", f"--max_steps 4 --log_interval 2 --save_interval 2 --eval_timestep_respacing ddim5 "
                         f"--eval_batch_size 8 --eval_cache_dir {tmp_path / 'cache'}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sample_dir = log_dir / "samples_5"
    for path in (log_dir / "ema_0.99_000004.pt", sample_dir / "samples_12x32x32x3.npz", sample_dir / "grid.png"):
        assert path.exists(), path
    metrics = json.loads((sample_dir / "metrics.json").read_text())
    assert metrics["fid"] > 0 and metrics["num_samples"] == 12 and metrics["num_reference"] == 2031
    progress = (log_dir / "progress.csv").read_text().splitlines()
    assert "fid" in progress[0].split(",")
    assert "FID/KID of the samples" in out.stdout

    # A rerun resumes: nothing is trained or sampled again, the metrics are recomputed identically.
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((sample_dir / "metrics.json").read_text())["fid"] == metrics["fid"]


# A stand-in stage: reports its process and session ids, then exits with 128 + the first stop signal it receives.
STAGE = """
import os, signal, sys, time
received = []
for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
    signal.signal(signum, lambda signum, frame: received.append(signum))
print(os.getpid(), os.getsid(0), flush=True)
while not received:
    time.sleep(0.01)
sys.exit(128 + received[0])
"""


@pytest.mark.parametrize("signum", preemption.STOP_SIGNALS, ids=preemption.signal_name)
def test_stop_signals_reach_the_stage_in_its_own_session_and_its_code_is_returned(signum):
    code = f"import sys, run_demo; sys.exit(run_demo.run_forwarding_signals([sys.executable, '-c', {STAGE!r}]))"
    demo = subprocess.Popen([sys.executable, "-c", code], env=clean_env(), stdout=subprocess.PIPE, text=True)
    stage_pid, stage_session = map(int, demo.stdout.readline().split())
    try:
        assert stage_session == stage_pid != os.getsid(demo.pid)  # a terminal's Ctrl-C does not reach it directly
        demo.send_signal(signum)
        assert demo.wait(timeout=30) == 128 + signum
    finally:
        demo.kill()
        try:
            os.kill(stage_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_sigterm_during_training_stops_with_a_checkpoint_and_a_rerun_finishes(tmp_path):
    log_dir = tmp_path / "demo"
    command = [
        sys.executable, os.path.join(ROOT, "scripts", "run_demo.py"),
        "--log_dir", str(log_dir),
        "--eval_interval", "0",
        "--num_samples", "12",
        "--timestep_respacing", "3",
        "--inception_path", save_standin_inception(tmp_path / "standin.pt"),
        "--train_flags", "--max_steps 40 --batch_size 4 --log_interval 10 --save_interval 100",
    ]
    demo = subprocess.Popen(command, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not (log_dir / "progress.csv").exists() and demo.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert read_progress(str(log_dir))[0]["step"] == 1  # training is under way
        demo.send_signal(signal.SIGTERM)
        _, stderr = demo.communicate(timeout=300)
    finally:
        demo.kill()
    assert demo.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    step = int(re.search(r"image_train.py: stopped by SIGTERM at step (\d+);", stderr).group(1))
    assert stderr.strip().splitlines()[-1] == (
        "run_demo.py: image_train.py stopped by SIGTERM (exit code 143); rerun the same command to resume"
    )
    assert checkpoint.complete_steps(str(log_dir)) == [step] and step < 40

    again = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {log_dir / f'state{step:06d}.pt'} at step {step}" in (log_dir / "log.txt").read_text()
    assert checkpoint.complete_steps(str(log_dir)) == [step, 40]
    assert (log_dir / "samples_3" / "metrics.json").exists()
