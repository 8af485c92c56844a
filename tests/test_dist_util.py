"""dist_util: a plain process, launcher detection, and 2 ranks under mpiexec and torchrun.

The reference's setup: docs/compatibility.md, "Training loop"; defects #3 and #10 of its "Reference defects fixed here".
"""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from guided_diffusion import dist_util

from launchers import LAUNCHERS, clean_env, launcher_command

DIST_CHECK = os.path.join(os.path.dirname(__file__), "dist_scripts", "dist_check.py")
LAUNCH_TIMEOUT_S = 120


def test_plain_process_needs_no_group_and_no_mpi():
    code = (
        "import sys, torch.distributed as dist\n"
        "from guided_diffusion import dist_util\n"
        "dist_util.setup_dist()\n"
        "print(dist_util.rank_and_world_size(), dist.is_initialized(), 'mpi4py' in sys.modules, dist_util.dev())\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["(0,", "1)", "False", "False", "cpu"]


def test_launcher_variables_give_rank_and_world_size(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert dist_util.rank_and_world_size() == (0, 1)
    monkeypatch.setenv("PMI_SIZE", "1")  # mpiexec -n 1 is a plain process
    assert dist_util.rank_and_world_size() == (0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert dist_util.rank_and_world_size() == (2, 3)


def test_load_state_dict_reads_tensors_and_refuses_pickled_objects(tmp_path):
    torch.save({"w": torch.arange(3)}, tmp_path / "ok.pt")
    assert torch.equal(dist_util.load_state_dict(str(tmp_path / "ok.pt"))["w"], torch.arange(3))
    torch.save({"w": pickle.PickleError("not a tensor")}, tmp_path / "bad.pt")
    with pytest.raises(pickle.UnpicklingError):
        dist_util.load_state_dict(str(tmp_path / "bad.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_ranks_set_up_communicate_and_read_checkpoints(tmp_path, launcher):
    torch.save({"w": torch.tensor([1.5, 2.5])}, tmp_path / "ckpt.pt")
    result = subprocess.run(
        launcher_command(launcher, DIST_CHECK, str(tmp_path), str(tmp_path / "ckpt.pt")),
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    reports = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    for rank, report in enumerate(reports):
        assert report["rank"] == rank and report["world_size"] == 2
        assert report["launcher_view"] == [rank, 2]
        assert report["local_rank"] == rank
        assert report["backend"] == "gloo" and report["device"] == "cpu"
        assert report["all_reduce"] == 3.0
        assert report["synced"] == [[0.0, 0.0, 0.0], [[10.0, 10.0], [10.0, 10.0]]]  # rank 0's values
        assert report["visible_before"] == report["visible_after"] == ""
        assert not report["initialized_after_cleanup"]
    assert reports[1]["loaded"] == [1.5, 2.5]
