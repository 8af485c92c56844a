"""Launching a test script on several ranks: one command builder, one environment, one skip for a missing mpiexec.

    @pytest.mark.slow
    @pytest.mark.parametrize("launcher", LAUNCHERS)
    def test_x(launcher):
        subprocess.run(launcher_command(launcher, SCRIPT, *args), env=clean_env(), ...)
"""

import os
import sys

import pytest

# The venv's own mpiexec: mpi4py is built against the MPI library installed with it (pip install mpich).
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCHER_PREFIXES = ("PMI_", "OMPI_", "MV2_", "PMIX_", "HYDRA_", "TORCHELASTIC_")
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
    """Command running the Python file `script` with `args` on `ranks` processes under mpiexec ("mpi") or torchrun.

    Under mpiexec the script runs through `python -m mpi4py`, so an uncaught exception on one rank aborts every rank
    instead of leaving the others waiting in a collective.
    """
    if launcher == "mpi":
        return [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpi4py", script, *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), script,
                *args]
    raise ValueError(f"launcher {launcher!r} is not 'mpi' or 'torchrun'")


def clean_env(**extra):
    """This environment without any launcher's variables, one torch thread, no visible GPU (gloo on the CPU), and
    scripts/ and tests/dist_scripts/ importable by name."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCHER_VARIABLES and not k.startswith(LAUNCHER_PREFIXES)
    }
    python_path = [*IMPORT_PATH, *filter(None, [env.get("PYTHONPATH")])]
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(python_path), **extra)
    return env
