"""scripts/gpu_check.sh: its dry mode (the CPU rehearsal CI runs, as CI has no GPU), a failing part, and the CUDA
tests' skips on a CPU."""

import csv
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from train_fixtures import ROOT, read_progress

from benchmarks import run, settings

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
PARTS = ["env", "tests", "data", "train", "sample", "benchmark", "benchmark_compile"]


def run_check(out, *args, **env):
    return subprocess.run(
        ["bash", SCRIPT, "--out", str(out), *args], env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True, text=True, timeout=700, check=False,
    )


def part_statuses(out):
    with open(out / "parts.tsv", newline="") as f:
        return {row["part"]: row["status"] for row in csv.DictReader(f, delimiter="\t")}


def skip_messages(junit_path):
    """{test name: its skip message, or None if it did not skip}, from a pytest junit file."""
    cases = ET.parse(junit_path).getroot().iter("testcase")
    return {case.get("name"): next((c.get("message") for c in case if c.tag == "skipped"), None) for case in cases}


@pytest.mark.slow
def test_dry_run_passes_every_part_and_writes_its_results(tmp_path):
    out = tmp_path / "check"
    result = run_check(out, "--dry")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert part_statuses(out) == dict.fromkeys(PARTS, "passed")
    skipped = skip_messages(out / "pytest_cuda.xml")
    assert len(skipped) >= 10 and all("CUDA" in (message or "") for message in skipped.values())
    for name, setting in (("benchmark", "eager"), ("benchmark_compile", "channels_last")):
        bench = json.loads((out / f"{name}.json").read_text())
        assert bench["meta"]["settings"] == [setting] and (out / f"{name}.md").exists()
        for entry in bench["results"][setting].values():
            assert entry["images_per_s"] > 0 and 0 < entry["matmul_peak_fraction"]
    assert read_progress(out / "train")[-1]["step"] == 4
    with np.load(out / "samples" / "samples_2x32x32x3.npz") as samples:
        assert samples["arr_0"].shape == (2, 32, 32, 3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tests"]["skipped"] == len(skipped) and summary["tests"]["failed"] == 0
    assert "| train | passed |" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_a_failing_part_fails_the_check_and_the_others_still_run(tmp_path):
    # An unknown pytest option makes the tests part fail at once; the benchmark part must run all the same.
    out = tmp_path / "check"
    result = run_check(out, "--dry", "--parts", "tests,benchmark_compile", PYTEST_ADDOPTS="--no-such-option")
    assert result.returncode == 1
    statuses = part_statuses(out)
    assert statuses["tests"] == "failed (exit code 4)" and statuses["benchmark_compile"] == "passed"
    assert set(statuses) == {"env", "tests", "benchmark_compile"}
    assert "| tests | failed (exit code 4) |" in (out / "summary.md").read_text()


def test_bad_arguments_are_refused_with_the_flag_named(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("")
    for args, message in (
        (["--parts", "tests,bench"], "--parts: 'bench' is not one of"),
        (["--budget", "ten"], "--budget must be a whole number"),
        (["--reference", str(tmp_path / "missing")], "--reference"),
        (["--frobnicate"], "unknown argument '--frobnicate'"),
    ):
        result = run_check(tmp_path / "new", "--dry", *args)
        assert result.returncode == 2 and message in result.stderr, args
    result = run_check(tmp_path / "full", "--dry")
    assert result.returncode == 2 and "is not empty" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a CUDA GPU the CUDA tests run instead of skipping")
def test_every_cuda_test_is_marked_and_skips_with_a_reason_on_a_cpu(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "cuda", os.path.join(ROOT, "tests", "test_cuda.py"), "-q",
         "-p", "no:cacheprovider", "--junitxml", str(tmp_path / "junit.xml")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "deselected" not in result.stdout  # -m cuda kept every test: each carries the marker
    skipped = skip_messages(tmp_path / "junit.xml")
    assert len(skipped) >= 10
    for name, message in skipped.items():
        assert message and "CUDA" in message, name


@pytest.mark.parametrize("device,name,dtype", [("cuda", "eager", "tf32"), ("cuda", "bf16", "bf16"),
                                               ("cpu", "eager", "fp32"), ("cpu", "bf16", "bf16")])
def test_benchmark_share_of_peak_uses_the_dtype_the_kernels_run(device, name, dtype, monkeypatch):
    # cuDNN runs fp32 convolutions in TF32 unless told otherwise: a GPU's fp32 settings are held to the TF32 peak.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    result = {"model_flops_per_image": {"forward_backward": 3e9, "forward": 1e9},
              "matmul_peak_gflops": {"fp32": 100.0, "tf32": 400.0, "bf16": 800.0}}
    achieved = run._achieved(result, settings.parse_setting(name), "train", 20.0, torch.device(device))
    assert achieved["matmul_peak_dtype"] == dtype
    assert achieved["matmul_peak_fraction"] == pytest.approx(60.0 / result["matmul_peak_gflops"][dtype])
