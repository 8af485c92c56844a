"""Which launcher started this process, read from its environment variables alone (no MPI call, no network).

The first rule that applies wins:

1. torchrun: RANK and WORLD_SIZE are set (torchrun, torch.distributed.launch, or by hand).
2. MPI: an MPI launcher's world size is above 1 (OMPI_COMM_WORLD_SIZE, PMI_SIZE, MV2_COMM_WORLD_SIZE), or PMIx's
   PMIX_RANK is set in a Slurm step of several tasks. This covers mpiexec/mpirun and `srun --mpi=pmi2` or
   `--mpi=pmix`; rank and world size then come from MPI itself.
3. Slurm: a task of an srun step (SLURM_PROCID and SLURM_STEP_ID set) whose step has several tasks
   (SLURM_STEP_NUM_TASKS, else SLURM_NTASKS). A batch script or an salloc shell is no step: it sees the
   allocation's SLURM_NTASKS (and a batch script SLURM_PROCID=0) but no SLURM_STEP_ID, so a plain `python` there
   runs alone instead of waiting for tasks that were never started.
4. plain: one process, no process group.

Slurm's rendezvous: rank 0 serves the store at MASTER_ADDR if set, else at the first host of the step's node list
(SLURM_STEP_NODELIST, else SLURM_JOB_NODELIST, else SLURM_NODELIST; srun places task 0 on that host), on
MASTER_PORT if set, else on 15000 + SLURM_JOB_ID % 20000, so that two jobs sharing a node use different ports unless
their ids differ by a multiple of 20000.
"""

import dataclasses
import itertools
import re

TORCHRUN, MPI, SLURM, PLAIN = "torchrun", "MPI", "Slurm", "plain"

# Variables an MPI launcher sets to the world size (Open MPI; MPICH/Hydra, Intel MPI and Slurm's PMI-2; MVAPICH2).
MPI_WORLD_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
NODELIST_VARIABLES = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
SLURM_BASE_PORT, SLURM_PORT_RANGE = 15000, 20000


@dataclasses.dataclass(frozen=True)
class Launch:
    """A launch as its environment describes it.

    :param launcher: TORCHRUN, MPI, SLURM or PLAIN.
    :param rank, local_rank: this process's rank overall and on its node (None under MPI: MPI knows them).
    :param world_size: the number of processes (under MPI the launcher's number; MPI's own is authoritative).
    :param tag: what sets this launch apart from another one sharing its rendezvous store or port ("" if nothing).
    """

    launcher: str
    rank: object
    world_size: int
    local_rank: object
    tag: str = ""


def detect(environ):
    """The Launch described by `environ` (a mapping such as os.environ), by the rules of the module docstring.

    :raises ValueError: naming the variable, when one that decides the launcher is not an integer.
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        # A restarted torchrun worker group meets in the same agent store as the attempt before.
        attempt = f"attempt-{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        return Launch(TORCHRUN, _int(environ, "RANK"), _int(environ, "WORLD_SIZE"), _int(environ, "LOCAL_RANK", 0),
                      attempt)
    slurm_tasks = 1  # the tasks of this srun step; 1 outside a step
    if all(name in environ for name in ("SLURM_PROCID", "SLURM_STEP_ID", "SLURM_NTASKS")):
        slurm_tasks = _int(environ, "SLURM_STEP_NUM_TASKS", None) or _int(environ, "SLURM_NTASKS")
    mpi_size = max([_int(environ, name, 1) for name in MPI_WORLD_SIZE_VARIABLES])
    if mpi_size == 1 and "PMIX_RANK" in environ:
        mpi_size = slurm_tasks
    if mpi_size > 1:
        return Launch(MPI, None, mpi_size, None)
    if slurm_tasks > 1:
        step = f"job-{environ.get('SLURM_JOB_ID', '')}.{environ['SLURM_STEP_ID']}"  # ports of two jobs may collide
        return Launch(SLURM, _int(environ, "SLURM_PROCID"), slurm_tasks, _int(environ, "SLURM_LOCALID", 0), step)
    return Launch(PLAIN, 0, 1, 0)


def slurm_address(environ):
    """(host, port) of a Slurm launch's rendezvous store (module docstring).

    :raises ValueError: naming the variable that is missing or malformed, and what to set instead.
    """
    host = environ.get("MASTER_ADDR")
    if not host:
        name = next((name for name in NODELIST_VARIABLES if environ.get(name)), None)
        if name is None:
            raise ValueError(
                f"a Slurm launch needs a node list for its rendezvous, but none of {', '.join(NODELIST_VARIABLES)} "
                "is set; set MASTER_ADDR to the host of rank 0"
            )
        host = expand_nodelist(environ[name], name)[0]
    if environ.get("MASTER_PORT"):
        port = _int(environ, "MASTER_PORT")
    elif environ.get("SLURM_JOB_ID"):
        port = SLURM_BASE_PORT + _int(environ, "SLURM_JOB_ID") % SLURM_PORT_RANGE
    else:
        raise ValueError("a Slurm launch needs SLURM_JOB_ID or MASTER_PORT for its rendezvous port; set MASTER_PORT")
    if not 0 < port < 65536:
        raise ValueError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
    return host, port


# One bracket group "[...]" of a host pattern, and one of its ranges: "7" or "01-04".
_GROUP = re.compile(r"\[([^\[\]]*)\]")
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def expand_nodelist(text, variable="the node list"):
    """Host names of Slurm's compact node list, in order: "gpu[01-04,07],cpu3" -> gpu01 gpu02 gpu03 gpu04 gpu07 cpu3.

    Ranges keep the zero padding of their first number (gpu[001-003] -> gpu001 ...); a name may hold several bracket
    groups (r[1-2]n[1-2] -> r1n1 r1n2 r2n1 r2n2) and text after them (n[1-2]-ib -> n1-ib n2-ib).

    :param variable: the environment variable `text` came from, named in errors.
    :raises ValueError: on malformed syntax, naming `variable` and the offending part.
    """
    hosts = []
    for pattern in _split_top_level(text, variable):
        choices = []  # for each fixed or bracketed piece of the pattern, the strings it can be
        position = 0
        for group in _GROUP.finditer(pattern):
            choices.append([_plain_text(pattern[position:group.start()], text, variable)])
            choices.append(_expand_ranges(group.group(1), text, variable))
            position = group.end()
        choices.append([_plain_text(pattern[position:], text, variable)])
        hosts.extend("".join(parts) for parts in itertools.product(*choices))
    return hosts


def _split_top_level(text, variable):
    """The comma-separated host patterns of `text` (commas inside brackets do not split)."""
    patterns, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError(f"{variable}={text!r} is not a Slurm node list: unbalanced or nested brackets")
        if char == "," and depth == 0:
            if i == start:
                raise ValueError(f"{variable}={text!r} is not a Slurm node list: an empty host name")
            patterns.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"{variable}={text!r} is not a Slurm node list: an unclosed bracket")
    return patterns


def _plain_text(part, text, variable):
    if "[" in part or "]" in part:
        raise ValueError(f"{variable}={text!r} is not a Slurm node list: unbalanced brackets")
    return part


def _expand_ranges(ranges, text, variable):
    """["01", "02", "07"] for the inside of a bracket group such as "01-02,07"."""
    values = []
    for item in ranges.split(","):
        match = _RANGE.fullmatch(item)
        if not match:
            raise ValueError(f"{variable}={text!r} is not a Slurm node list: [{ranges}] has {item!r}, not N or N-M")
        first, last = match.group(1), match.group(2) or match.group(1)
        if int(last) < int(first):
            raise ValueError(f"{variable}={text!r} is not a Slurm node list: the range {item!r} runs backwards")
        values.extend(str(n).zfill(len(first)) for n in range(int(first), int(last) + 1))
    return values


def _int(environ, name, default=...):
    """environ[name] as an int (default when unset, if given)."""
    if name not in environ and default is not ...:
        return default
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the launcher variable {name}={value!r} is not an integer") from None
