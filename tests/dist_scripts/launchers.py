"""Launching a test script on several ranks: one command builder, one environment, one skip for a missing mpiexec.

    @pytest.mark.slow
    @pytest.mark.parametrize("launcher", LAUNCHERS)
    def test_x(launcher):
        subprocess.run(launcher_command(launcher, SCRIPT, *args), env=clean_env(), ...)

Launches of several commands (a simulated srun, a 2-node torchrun) go through `start`, which also takes the
single-command launchers:

    with start("slurm", SCRIPT, *args) as launch:
        results = launch.wait(timeout=120)
"""

import collections
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

# The venv's own mpiexec: mpi4py is built against the MPI library installed with it (pip install mpich).
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCHER_PREFIXES = ("PMI_", "OMPI_", "MV2_", "PMIX_", "HYDRA_", "TORCHELASTIC_", "SLURM_")
# The launched test scripts import the entry points (scripts/) and the fixtures beside them by name, as pytest.ini's
# `pythonpath` lets the tests do; the package itself comes from the install.
TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPORT_PATH = (os.path.join(os.path.dirname(TESTS_DIR), "scripts"), os.path.join(TESTS_DIR, "dist_scripts"))

requires_mpiexec = pytest.mark.skipif(
    not os.path.exists(MPIEXEC), reason=f"the venv has no mpiexec ({MPIEXEC}; pip install mpich)"
)

# Both launchers as a parametrize list; the mpiexec case is skipped where the venv has none.
LAUNCHERS = [pytest.param("mpi", marks=requires_mpiexec), "torchrun"]


def launcher_command(launcher, script, *args, ranks=2):
    """Command running the Python file `script` with `args` on `ranks` processes under one launcher command:

    "mpi": mpiexec through `python -m mpi4py`, whose runner aborts every rank on an uncaught exception;
    "mpi-no-runner": mpiexec running python directly, where only the script's own error path ends the other ranks;
    "mpi-no-cleanup": as "mpi-no-runner", but MPICH's mpiexec leaves the other ranks running when one exits with an
    error (as srun --mpi=pmi2 does without --kill-on-bad-exit): only MPI_Abort ends them;
    "torchrun": one node.
    """
    if launcher == "mpi":
        return [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpi4py", script, *args]
    if launcher == "mpi-no-runner":
        return [MPIEXEC, "-n", str(ranks), sys.executable, script, *args]
    if launcher == "mpi-no-cleanup":
        return [MPIEXEC, "-n", str(ranks), "-disable-auto-cleanup", sys.executable, script, *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), script,
                *args]
    raise ValueError(f"launcher {launcher!r} is not 'mpi', 'mpi-no-runner', 'mpi-no-cleanup' or 'torchrun'")


def clean_env(**extra):
    """This environment without any launcher's variables, one torch thread, no visible GPU (gloo on the CPU), and
    scripts/ and tests/dist_scripts/ importable by name; `extra` overrides any of them."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCHER_VARIABLES and not k.startswith(LAUNCHER_PREFIXES)
    }
    python_path = [*IMPORT_PATH, *filter(None, [env.get("PYTHONPATH")])]
    env.update({"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join(python_path),
                **extra})
    return env


def slurm_env(rank, ranks, job_id, **extra):
    """clean_env() plus what srun gives task `rank` of a `ranks`-task step of job `job_id` on one node, localhost.

    SLURM_STEP_ID marks a task of an srun step: a batch script sees the allocation's other variables too.
    """
    return clean_env(SLURM_PROCID=str(rank), SLURM_NTASKS=str(ranks), SLURM_LOCALID=str(rank), SLURM_JOB_ID=str(job_id),
                     SLURM_STEP_ID="0", SLURM_JOB_NODELIST="localhost", **extra)


def free_port():
    """A TCP port nothing listens on now (it may be taken before it is used: good enough for tests)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def free_slurm_job_id():
    """A Slurm job id whose derived rendezvous port (15000 + id % 20000, guided_diffusion/launch_env.py) is free."""
    rng = random.Random()
    for _ in range(200):
        job_id = rng.randrange(1, 10**7)
        with socket.socket() as s:
            try:
                s.bind(("", 15000 + job_id % 20000))
            except OSError:
                continue
        return job_id
    raise RuntimeError("no free port in 15000-34999")


Result = collections.namedtuple("Result", "returncode stdout stderr")  # returncode None: killed at the timeout


class Launch:
    """Processes started together (each in its own session, output in temporary files); leaving the `with` block kills
    whatever still runs, with its children."""

    def __init__(self, commands):
        """:param commands: [(argv, env)] to start."""
        self.processes, self._files = [], []
        for argv, env in commands:
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in __exit__)
            self._files.append((out, err))
            self.processes.append(subprocess.Popen(argv, env=env, stdout=out, stderr=err, text=True,
                                                   start_new_session=True))

    def wait(self, timeout):
        """[Result] of every process, waiting at most `timeout` seconds for all of them together."""
        deadline = time.monotonic() + timeout
        try:
            for process in self.processes:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        running = [process.poll() is None for process in self.processes]
        self.kill()
        results = []
        for process, still_running, (out, err) in zip(self.processes, running, self._files):
            out.seek(0), err.seek(0)
            results.append(Result(None if still_running else process.returncode, out.read(), err.read()))
        return results

    def kill(self):
        """SIGKILL every process still running and whatever it started (its session)."""
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
        for out, err in self._files:
            out.close(), err.close()


def start(launcher, script, *args, ranks=2, env=None):
    """Start the Python file `script` with `args` on `ranks` processes. `launcher` is one of launcher_command's, or

    "slurm": `ranks` processes as srun would start them on one node (slurm_env, a job id whose port is free);
    "torchrun-2-nodes": two torchrun agents on localhost as two nodes (--nnodes 2, --node_rank 0 and 1, a static
    rendezvous at localhost on a free port), each running ranks // 2 processes.

    :param env: variables added to every process's clean_env().
    :return: a Launch.
    """
    env = env or {}
    if launcher == "slurm":
        job_id = free_slurm_job_id()
        return Launch([([sys.executable, script, *args], slurm_env(rank, ranks, job_id, **env))
                       for rank in range(ranks)])
    if launcher == "torchrun-2-nodes":
        port = str(free_port())
        return Launch([([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                         "--nproc_per_node", str(ranks // 2), "--master_addr", "localhost", "--master_port", port,
                         script, *args], clean_env(**env)) for node in range(2)])
    return Launch([(launcher_command(launcher, script, *args, ranks=ranks), clean_env(**env))])
