"""scripts/run_demo.py: train -> sample -> evaluate on the bundled dataset, shortened (the demo's whole pipeline)."""

import json
import os
import subprocess
import sys

import pytest

from helpers import save_standin_inception

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
