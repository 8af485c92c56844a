"""launch_env: Slurm's compact node lists, the Slurm rendezvous port, and which launcher an environment describes."""

import pytest

from guided_diffusion import launch_env
from guided_diffusion.launch_env import (
    MPI,
    PLAIN,
    SLURM,
    TORCHRUN,
    detect,
    expand_nodelist,
    slurm_address,
)


@pytest.mark.parametrize("nodelist, hosts", [
    ("a[1-3,5],b7", ["a1", "a2", "a3", "a5", "b7"]),
    ("gpu[01-04,07],cpu3", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"]),
    ("gpu[001-003]", ["gpu001", "gpu002", "gpu003"]),
    ("a[8-10]", ["a8", "a9", "a10"]),            # no padding: widths grow
    ("a[08-10]", ["a08", "a09", "a10"]),         # the padding of the first number
    ("n[1-2]-ib", ["n1-ib", "n2-ib"]),           # text after the group
    ("r[1-2]n[3,5]", ["r1n3", "r1n5", "r2n3", "r2n5"]),  # several groups in one name
    ("x[1-2],y[3-4],z", ["x1", "x2", "y3", "y4", "z"]),  # several hosts with groups
    ("node7", ["node7"]),
    ("localhost", ["localhost"]),
    ("c1.cluster.org,c2.cluster.org", ["c1.cluster.org", "c2.cluster.org"]),
])
def test_nodelist_expansion(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist, problem", [
    ("a[1-3", "unclosed bracket"),
    ("a1-3]", "unbalanced"),
    ("a[1-[2]]", "nested"),
    ("a[]", "''"),
    ("a[1-]", "'1-'"),
    ("a[x]", "'x'"),
    ("a[3-1]", "runs backwards"),
    ("a,,b", "empty host name"),
    ("a,", "empty host name"),
    ("", "empty host name"),
])
def test_malformed_nodelists_name_the_variable(nodelist, problem):
    with pytest.raises(ValueError) as error:
        expand_nodelist(nodelist, "SLURM_JOB_NODELIST")
    assert str(error.value).startswith(f"SLURM_JOB_NODELIST={nodelist!r} is not a Slurm node list: ")
    assert problem in str(error.value)


STEP = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu[07-08]"}


def test_slurm_rendezvous_is_the_first_host_on_a_port_from_the_job_id():
    assert slurm_address(STEP) == ("gpu07", 15000 + 123456 % 20000)
    # A step on part of the allocation: its own node list, where srun put task 0.
    assert slurm_address({**STEP, "SLURM_STEP_NODELIST": "gpu08"}) == ("gpu08", 18456)
    assert slurm_address({"SLURM_NODELIST": "n[3-4]", "SLURM_JOB_ID": "7"}) == ("n3", 15007)


def test_two_jobs_on_one_node_get_different_ports_and_master_variables_win():
    ports = {slurm_address({**STEP, "SLURM_JOB_ID": str(job)})[1] for job in range(1000, 1010)}
    assert len(ports) == 10 and all(15000 <= port < 35000 for port in ports)
    assert slurm_address({**STEP, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500"}) == ("10.0.0.5", 29500)
    # MASTER_ADDR alone: no node list needed, and a malformed one is not read.
    assert slurm_address({**STEP, "SLURM_JOB_NODELIST": "gpu[", "MASTER_ADDR": "h"}) == ("h", 18456)


@pytest.mark.parametrize("environ, message", [
    ({**STEP, "SLURM_JOB_NODELIST": "gpu[07-"}, r"SLURM_JOB_NODELIST='gpu\[07-' is not a Slurm node list"),
    ({"SLURM_JOB_ID": "5"}, "none of SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, SLURM_NODELIST is set; set MASTER_ADDR"),
    ({"SLURM_JOB_NODELIST": "a"}, "needs SLURM_JOB_ID or MASTER_PORT .*; set MASTER_PORT"),
    ({**STEP, "MASTER_PORT": "99999"}, "MASTER_PORT=99999 is not a TCP port"),
    ({**STEP, "SLURM_JOB_ID": "12x"}, "SLURM_JOB_ID='12x' is not an integer"),
])
def test_slurm_rendezvous_errors_name_the_variable(environ, message):
    with pytest.raises(ValueError, match=message):
        slurm_address(environ)


TORCHRUN_VARS = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
SALLOC_SHELL = {"SLURM_JOB_ID": "99", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NODELIST": "n[1-2]"}
BATCH_SCRIPT = {**SALLOC_SHELL, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}  # no SLURM_STEP_ID


@pytest.mark.parametrize("environ, launch", [
    ({}, (PLAIN, 0, 1, 0)),
    (TORCHRUN_VARS, (TORCHRUN, 3, 8, 1)),
    ({**TORCHRUN_VARS, **STEP, "PMI_SIZE": "4"}, (TORCHRUN, 3, 8, 1)),   # torchrun started by srun/mpiexec
    ({"PMI_RANK": "1", "PMI_SIZE": "2"}, (MPI, None, 2, None)),           # mpiexec (MPICH)
    ({"OMPI_COMM_WORLD_SIZE": "4", **STEP}, (MPI, None, 4, None)),        # mpirun in an allocation
    ({"PMI_SIZE": "1"}, (PLAIN, 0, 1, 0)),                                # mpiexec -n 1
    ({**STEP, "PMI_RANK": "1", "PMI_SIZE": "4"}, (MPI, None, 4, None)),   # srun --mpi=pmi2
    ({**STEP, "PMIX_RANK": "1"}, (MPI, None, 4, None)),                   # srun --mpi=pmix
    ({"PMIX_RANK": "0"}, (PLAIN, 0, 1, 0)),                               # a PMIx singleton
    (STEP, (SLURM, 1, 4, 1)),                                              # srun, no MPI
    ({**STEP, "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "4"}, (SLURM, 1, 4, 1)),  # srun --preserve-env
    ({**STEP, "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (PLAIN, 0, 1, 0)),  # srun -n 1
    (SALLOC_SHELL, (PLAIN, 0, 1, 0)),                                      # python in an salloc shell
    (BATCH_SCRIPT, (PLAIN, 0, 1, 0)),                                      # python in an sbatch script
])
def test_launcher_precedence(environ, launch):
    detected = detect(environ)
    assert (detected.launcher, detected.rank, detected.world_size, detected.local_rank) == launch


def test_launches_sharing_a_store_are_told_apart():
    assert detect(STEP).tag != detect({**STEP, "SLURM_JOB_ID": "123457"}).tag
    assert detect(STEP).tag != detect({**STEP, "SLURM_STEP_ID": "1"}).tag
    restarted = detect({**TORCHRUN_VARS, "TORCHELASTIC_RESTART_COUNT": "1"})
    assert restarted.tag != detect(TORCHRUN_VARS).tag


@pytest.mark.parametrize("name", ["RANK", "SLURM_NTASKS", "PMI_SIZE"])
def test_malformed_launcher_variables_are_named(name):
    environ = {**TORCHRUN_VARS, **STEP} if name == "RANK" else dict(STEP)
    environ[name] = "four"
    with pytest.raises(ValueError, match=f"the launcher variable {name}='four' is not an integer"):
        launch_env.detect(environ)
