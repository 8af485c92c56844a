"""dist_util: a plain process, launcher detection, 2 ranks under mpiexec, torchrun and srun (simulated), two
"nodes" on localhost, and no hangs: a peer that never arrives, a rank that dies, hangs or raises.

The reference's setup: docs/compatibility.md, "Training loop"; defects #3 and #10 of its "Reference defects fixed here".
Launching on clusters: docs/clusters.md.
"""

import json
import os
import pathlib
import pickle
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from guided_diffusion import dist_util

from launchers import LAUNCHERS, clean_env, free_slurm_job_id, launcher_command, requires_mpiexec, slurm_env, start
from train_fixtures import ROOT, train_argv

DIST_CHECK = os.path.join(os.path.dirname(__file__), "dist_scripts", "dist_check.py")
TRAIN_FAULTY = os.path.join(os.path.dirname(__file__), "dist_scripts", "train_faulty.py")
RANK_RAISES_IN_MPI_WAIT = os.path.join(os.path.dirname(__file__), "dist_scripts", "rank_raises_in_mpi_wait.py")
IMAGE_TRAIN = os.path.join(ROOT, "scripts", "image_train.py")
LAUNCH_TIMEOUT_S = 120
# How long a launch whose ranks must end by themselves may take, start-up included: far below any --dist_timeout the
# launches use unless they set a short one, so a rank that waited for a dead peer until the timeout fails the test.
ENDS_WITHIN_S = 90
# A run that only a fault ends: no checkpoint on the way, so one the fault failed to end cannot fill the disk.
UNTIL_A_FAULT = {"max_steps": 10000, "save_interval": 10000}


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


def _launch_env(monkeypatch, **variables):
    """This process's environment without any launcher's variables (those clean_env drops), plus `variables`."""
    for name in os.environ.keys() - clean_env().keys():
        monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def test_launcher_variables_give_rank_and_world_size(monkeypatch):
    monkeypatch.setattr(dist_util, "_local_rank", None)  # as in a process that has not run setup_dist
    _launch_env(monkeypatch)
    assert dist_util.rank_and_world_size() == (0, 1)
    monkeypatch.setenv("PMI_SIZE", "1")  # mpiexec -n 1 is a plain process
    assert dist_util.rank_and_world_size() == (0, 1)
    _launch_env(monkeypatch, SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="1", SLURM_STEP_ID="0")
    assert dist_util.rank_and_world_size() == (1, 2) and dist_util.local_rank() == 1
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


def test_clean_env_drops_slurm_and_takes_overrides(monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "3")
    env = clean_env(CUDA_VISIBLE_DEVICES="1", OMP_NUM_THREADS="2")
    assert "SLURM_PROCID" not in env and env["CUDA_VISIBLE_DEVICES"] == "1" and env["OMP_NUM_THREADS"] == "2"


def test_a_taken_slurm_port_is_named_with_the_fix(monkeypatch):
    """Rank 0 of an srun step whose port another job holds: one LaunchError naming the port and MASTER_PORT."""
    monkeypatch.setattr(dist_util, "_local_rank", dist_util._local_rank)  # setup_dist sets it before failing
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _launch_env(monkeypatch, SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_STEP_ID="0",
                    SLURM_JOB_ID="1", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port))
        with pytest.raises(dist_util.LaunchError, match=rf"^rank 0 could not serve the rendezvous store on port {port} "
                           r"\(Slurm; .*\); another job on this node may use the port: set MASTER_PORT to a free one$"):
            dist_util.setup_dist(timeout_minutes=0.05)


def test_dist_timeout_must_be_positive(images, tmp_path):
    import image_train

    # max_steps: without the check the run would train (and save) until stopped.
    with pytest.raises(SystemExit, match="image_train.py: error: --dist_timeout must be a positive number of minutes"):
        image_train.main(train_argv(images, str(tmp_path), dist_timeout=0, max_steps=1))


def _assert_identical_ranks(results, out_dir, run_dir, launcher, steps):
    assert [r.returncode for r in results] == [0] * len(results), [r.stderr[-3000:] for r in results]
    reports = [json.loads(pathlib.Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [(r["world_size"], r["step"]) for r in reports] == [(2, steps)] * 2
    assert reports[0]["model"] == reports[1]["model"] and reports[0]["ema"] == reports[1]["ema"]
    return [line for line in open(os.path.join(run_dir, "log.txt")) if line.startswith("process group: ")]


@pytest.mark.slow
@pytest.mark.parametrize("launcher, via", [
    ("slurm", "the node list's first host"),          # srun without MPI: SLURM_* variables, nodelist localhost
    ("torchrun-2-nodes", "MASTER_ADDR:MASTER_PORT"),  # torchrun --nnodes 2 --node_rank 0/1 on localhost
])
def test_slurm_and_two_node_torchrun_train_identical_ranks(images, tmp_path, launcher, via):
    run_dir = str(tmp_path / "run")
    with start(launcher, TRAIN_FAULTY, str(tmp_path), "none", *train_argv(images, run_dir, max_steps=3)) as launch:
        results = launch.wait(LAUNCH_TIMEOUT_S)
    described = _assert_identical_ranks(results, str(tmp_path), run_dir, launcher, steps=3)
    name = "Slurm" if launcher == "slurm" else "torchrun"
    assert re.fullmatch(rf"process group: 2 ranks launched by {name}, gloo, rendezvous at localhost:\d+ \({via}\), "
                        r"timeout 30 min\n", described[0]), described


@pytest.mark.slow
@requires_mpiexec
def test_mpiexec_cross_node_store_trains(images, tmp_path):
    """The rendezvous of mpiexec across nodes (rank 0's host name), forced on one machine."""
    run_dir = str(tmp_path / "run")
    with start("mpi", TRAIN_FAULTY, str(tmp_path), "none", *train_argv(images, run_dir, max_steps=3),
               env={dist_util.FORCE_CROSS_NODE_STORE: "1"}) as launch:
        results = launch.wait(LAUNCH_TIMEOUT_S)
    described = _assert_identical_ranks(results, str(tmp_path), run_dir, "mpi", steps=3)
    assert "launched by MPI, gloo, rendezvous at " in described[0]
    assert "(rank 0's host name, several nodes)" in described[0], described


@pytest.mark.slow
@pytest.mark.parametrize("present, waiting_for", [
    (0, r"waited 0.05 min for 1 of 2 ranks \(missing: 1\)"),
    (1, r"waited 0.05 min for rank 0's rendezvous store"),
])
def test_a_peer_that_never_arrives_ends_the_start_with_one_line(images, tmp_path, present, waiting_for):
    """An srun step of 2 tasks where only one started: it stops after --dist_timeout with one line on stderr."""
    env = slurm_env(present, 2, free_slurm_job_id())
    command = [sys.executable, IMAGE_TRAIN, *train_argv(images, str(tmp_path), dist_timeout=0.05)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    port = 15000 + int(env["SLURM_JOB_ID"]) % 20000
    assert re.fullmatch(
        rf"image_train.py: error: rank {present} {waiting_for} at localhost:{port} \(Slurm\)( \(.*\))?; check that "
        r"every task started, or raise --dist_timeout", result.stderr.strip()), result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fate", ["killed", "hung"])
def test_when_a_rank_dies_or_hangs_the_other_ends_within_the_timeout(images, tmp_path, fate):
    """srun (simulated), gloo: rank 1 stops after step 2 and is SIGKILLed or left hanging; rank 0 must not wait for
    ever: a killed peer fails its next collective at once, a hung one at --dist_timeout (0.2 min)."""
    flags = train_argv(images, str(tmp_path / "run"), dist_timeout=0.2, **UNTIL_A_FAULT)
    hung = tmp_path / "hung_rank1"
    with start("slurm", TRAIN_FAULTY, str(tmp_path), "hang:1:2", *flags) as launch:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not hung.exists() and launch.processes[1].poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert hung.exists(), launch.wait(0)[1].stderr[-3000:]
        if fate == "killed":
            time.sleep(0.5)  # the pid is written before the file is closed
            os.kill(int(hung.read_text()), signal.SIGKILL)
        try:
            launch.processes[0].wait(ENDS_WITHIN_S)
        except subprocess.TimeoutExpired:
            pass
        rank0 = launch.wait(0)[0]
    assert rank0.returncode not in (None, 0), rank0.stderr[-3000:]
    expected = "Connection closed by peer" if fate == "killed" else "Timed out waiting 12000ms"
    assert expected in rank0.stderr, rank0.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("launcher, fault", [
    pytest.param("mpi-no-runner", "raise:1:2", marks=requires_mpiexec),  # the README's mpiexec form, a bug
    pytest.param("mpi-no-runner", "error:1:2", marks=requires_mpiexec),  # ... a user error
    ("torchrun", "error:1:2"),
    ("slurm", "raise:1:2"),
    ("slurm", "error:0:2"),
])
def test_a_rank_that_raises_ends_every_rank(images, tmp_path, launcher, fault):
    """One rank raises after step 2 under the default --dist_timeout (30 min): every process still ends, non-zero,
    within ENDS_WITHIN_S (start-up included), because the failing rank's error path ends the job."""
    flags = train_argv(images, str(tmp_path / "run"), **UNTIL_A_FAULT)
    with start(launcher, TRAIN_FAULTY, str(tmp_path), fault, *flags) as launch:
        results = launch.wait(ENDS_WITHIN_S)
    assert all(r.returncode not in (None, 0) for r in results), [(r.returncode, r.stderr[-2000:]) for r in results]
    kind, rank, _ = fault.split(":")
    stderr = results[int(rank)].stderr if launcher == "slurm" else results[0].stderr  # the failing rank's
    if kind == "raise":
        assert "RuntimeError: injected fault on rank 1 at step 2" in stderr, stderr[-3000:]
    else:  # one line (after the progress bar's last update), no traceback where the rank's own stderr is known
        assert re.search(rf"image_train.py: error: injected user error on rank {rank} at step 2$", stderr, re.MULTILINE), \
            stderr[-3000:]
        assert launcher != "slurm" or "Traceback" not in stderr, stderr[-3000:]


@requires_mpiexec
def test_an_mpi_rank_that_raises_aborts_a_rank_waiting_in_mpi():
    """Rank 1 raises while rank 0 waits in an MPI barrier, under an mpiexec that does not end the other ranks when one
    exits with an error: the failing rank's MPI_Abort still ends rank 0, with the error's exit code."""
    with start("mpi-no-cleanup", RANK_RAISES_IN_MPI_WAIT) as launch:
        (result,) = launch.wait(ENDS_WITHIN_S)
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "rank_raises_in_mpi_wait.py: error: injected user error on rank 1\n" in result.stderr, result.stderr
