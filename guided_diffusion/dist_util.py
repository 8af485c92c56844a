"""One distributed setup for mpiexec (the ADM way), torchrun, Slurm's srun and a plain single process.

The reference's setup is described in docs/compatibility.md, "Training loop" (Distributed training); launching on
clusters, the launchers' precedence and what happens when a rank dies, in docs/clusters.md.

- mpiexec (also srun --mpi=pmi2/pmix): rank and world size come from MPI; rank 0 opens the rendezvous store on a
  free port and broadcasts its address and port over MPI.
- torchrun: rank, world size, local rank and the store come from its environment variables.
- srun without MPI: rank, world size and local rank from SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID; rank 0 serves
  the store on the first host of the node list (guided_diffusion/launch_env.py says which variables and port).
- a plain process (or any launch with world size 1): no process group at all, so single-process training pays
  for no collectives.

Every rank first announces itself in the store and waits, at most the timeout, for all the others, so a peer that
never arrives ends the start-up with one LaunchError naming the launcher, the address and the missing ranks; the same
timeout bounds every later collective. nccl on CUDA, gloo otherwise. Each process uses cuda:<local rank> among the
devices the user made visible; the user's CUDA_VISIBLE_DEVICES is never changed (the reference overwrote it:
docs/compatibility.md, "Reference defects fixed here" #10). This module and launch_env.py are the only ones that read
launcher variables or import MPI; everything else asks `rank_and_world_size()` and `dev()`.
"""

import datetime
import io
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

from . import launch_env

DEFAULT_TIMEOUT_MINUTES = 30.0
# A test and debugging knob: "1" makes an mpiexec launch on one node use the cross-node rendezvous (rank 0's host
# name instead of localhost), so that path runs without a second machine.
FORCE_CROSS_NODE_STORE = "P2_FORCE_CROSS_NODE_STORE"
MPI_OUTPUT_DRAIN_S = 1.0  # seconds a failing MPI rank waits for its output to be forwarded before MPI_Abort

# Local rank found by setup_dist (MPI needs a collective for it, which must not run on a query path), and the
# one-line description of the group it joined.
_local_rank = None
_description = None


class LaunchError(RuntimeError):
    """The ranks of a launch could not meet: a peer never arrived, or the rendezvous store could not be reached."""


def _mpi():
    # Imported only under an MPI launcher: plain runs need neither mpi4py nor an MPI library.
    from mpi4py import MPI

    return MPI


def rank_and_world_size():
    """(rank, world size): the process group's when initialised, else the launcher's, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    launch = launch_env.detect(os.environ)
    if launch.launcher == launch_env.MPI:
        comm = _mpi().COMM_WORLD
        return comm.Get_rank(), comm.Get_size()
    return launch.rank, launch.world_size


def local_rank():
    """Rank among the processes of this node (selects the GPU)."""
    if _local_rank is not None:
        return _local_rank
    return launch_env.detect(os.environ).local_rank or 0


def dev():
    """The device this process trains on: cuda:<local rank> (modulo the visible devices), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def setup_dist(timeout_minutes=DEFAULT_TIMEOUT_MINUTES, timeout_flag=None):
    """Join the process group of the current launch (idempotent). A world of one process creates no group.

    :param timeout_minutes: how long a rank waits for its peers, at the start and in every collective.
    :param timeout_flag: the flag that sets it (named in the errors), or None.
    :raises LaunchError: when a peer does not arrive in time or the store cannot be reached.
    :raises ValueError: on a malformed launcher variable or a timeout that is not positive.
    """
    global _local_rank, _description
    if dist.is_initialized():
        return
    if not timeout_minutes > 0:
        raise ValueError(f"{timeout_flag or 'the timeout'} must be a positive number of minutes, not {timeout_minutes}")
    launch = launch_env.detect(os.environ)
    rank, world_size, _local_rank = launch.rank, launch.world_size, launch.local_rank
    if launch.launcher == launch_env.MPI:
        comm = _mpi().COMM_WORLD
        node_comm = comm.Split_type(_mpi().COMM_TYPE_SHARED)
        rank, world_size, _local_rank = comm.Get_rank(), comm.Get_size(), node_comm.Get_rank()
    if world_size == 1:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(dev())
    waiting = _Waiting(launch.launcher, rank, timeout_minutes, timeout_flag)
    if launch.launcher == launch_env.MPI:
        cross_node = node_comm.Get_size() < world_size or os.environ.get(FORCE_CROSS_NODE_STORE) == "1"
        store, host, port = _mpi_rendezvous_store(comm, not cross_node, waiting)
        how = "rank 0's host name, several nodes" if cross_node else "localhost, one node"
    elif launch.launcher == launch_env.TORCHRUN:
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        waiting.where = f"{host}:{port}"
        store = waiting.call(lambda: next(dist.rendezvous("env://", timeout=waiting.timeout))[0])
        how = "MASTER_ADDR:MASTER_PORT"
    else:
        host, port = launch_env.slurm_address(os.environ)
        waiting.where = f"{host}:{port}"
        store = _tcp_store(host, port, world_size, rank == 0, waiting)
        how = "MASTER_ADDR:MASTER_PORT" if os.environ.get("MASTER_ADDR") else "the node list's first host"
    store = dist.PrefixStore(f"p2-diffusion/{launch.tag}", store)
    _wait_for_peers(store, rank, world_size, waiting)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=waiting.timeout)
    _description = (f"{world_size} ranks launched by {launch.launcher}, {backend}, rendezvous at {host}:{port} "
                    f"({how}), timeout {timeout_minutes:g} min")


def describe():
    """One line on the process group joined by setup_dist (launcher, backend, rendezvous), or None without one."""
    return _description if dist.is_initialized() else None


class _Waiting:
    """Where a rank waits for its peers, for how long, and the one-line LaunchError when they do not come."""

    def __init__(self, launcher, rank, timeout_minutes, timeout_flag):
        self.launcher, self.rank, self.minutes = launcher, rank, timeout_minutes
        self.timeout = datetime.timedelta(minutes=timeout_minutes)
        self.advice = "check that every task started" + (f", or raise {timeout_flag}" if timeout_flag else "")
        self.where = "the rendezvous store"

    def error(self, what, cause=None):
        reason = f" ({str(cause).strip().splitlines()[0].rstrip('.')})" if cause is not None and str(cause) else ""
        return LaunchError(f"rank {self.rank} {what} at {self.where} ({self.launcher}){reason}; {self.advice}")

    def call(self, connect):
        """connect(), a store's creation, with its failure as a LaunchError."""
        try:
            return connect()
        except dist.DistError as err:
            raise self.error(f"could not reach the rendezvous store within {self.minutes:g} min", err) from None


def _tcp_store(host, port, world_size, is_master, waiting):
    """A TCPStore at host:port, served by this process if is_master (binding every interface), else reached there."""
    if not is_master:
        _await_listener(host, port, waiting)
        return waiting.call(lambda: dist.TCPStore(host, port, world_size, is_master=False, timeout=waiting.timeout))
    try:
        return dist.TCPStore(host, port, world_size, is_master=True, timeout=waiting.timeout, wait_for_workers=False)
    except dist.DistError as err:
        raise LaunchError(
            f"rank 0 could not serve the rendezvous store on port {port} ({waiting.launcher}; {err}); another job on "
            "this node may use the port: set MASTER_PORT to a free one"
        ) from None


def _await_listener(host, port, waiting, poll_s=0.5):
    """Return once host:port accepts TCP connections; LaunchError after the timeout. (A TCPStore client retries by
    itself, but logs every failed try with a C++ stack: this wait is quiet, so the LaunchError is the one line.)"""
    deadline = time.monotonic() + waiting.timeout.total_seconds()
    while True:
        try:
            socket.create_connection((host, port), timeout=poll_s).close()
            return
        except OSError as err:
            if time.monotonic() > deadline:
                raise waiting.error(f"waited {waiting.minutes:g} min for rank 0's rendezvous store", err) from None
        time.sleep(poll_s)


def _wait_for_peers(store, rank, world_size, waiting, poll_s=0.25):
    """Count this rank in `store` and wait until every rank has, or raise the LaunchError naming the missing ones.

    The wait polls one counter (one request per rank and poll, whatever the world size) instead of a store wait,
    which logs every timeout with a C++ warning.
    """
    deadline = time.monotonic() + waiting.timeout.total_seconds()
    try:
        store.set(f"arrived/{rank}", "1")
        store.add("arrived", 1)
        while store.add("arrived", 0) < world_size:
            if time.monotonic() > deadline:
                missing = [r for r in range(world_size) if not store.check([f"arrived/{r}"])]
                shown = ", ".join(map(str, missing[:8])) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
                raise waiting.error(f"waited {waiting.minutes:g} min for {len(missing)} of {world_size} ranks "
                                    f"(missing: {shown})")
            time.sleep(poll_s)
    except dist.DistError as err:
        raise waiting.error("lost the rendezvous store while waiting for its peers", err) from None


def _mpi_rendezvous_store(comm, all_on_one_node, waiting):
    """(store, host, port): a TCPStore served by rank 0 on a free port; address and port reach the others over MPI.

    On one node every rank reaches rank 0 at localhost; across nodes, at rank 0's host name.
    """
    rank, world_size = comm.Get_rank(), comm.Get_size()
    host = "localhost" if all_on_one_node else socket.getfqdn()
    host = comm.bcast(host, root=0)
    store = None
    if rank == 0:
        # Port 0: the store binds a free port itself, so no other process can take it in between.
        store = _tcp_store(host, 0, world_size, True, waiting)
    port = comm.bcast(store.port if rank == 0 else None, root=0)
    waiting.where = f"{host}:{port}"
    if rank != 0:
        store = _tcp_store(host, port, world_size, False, waiting)
    return store, host, port


def several_processes():
    """Whether this process is one rank of a launch of several (never raises: it runs on error paths)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    try:
        return launch_env.detect(os.environ).world_size > 1
    except ValueError:
        return False  # every rank read the same malformed variable and stops on its own


def end_every_rank(exit_code):
    """End this process with `exit_code` so that the other ranks of its launch end too, within seconds.

    Under MPI: MPI_Abort, which makes the launcher kill every rank. Otherwise the process exits at once, skipping
    interpreter shutdown (atexit handlers, a process group's teardown) where it could wait for peers; the closed
    sockets fail the peers' next gloo collective, torchrun stops the other workers when one fails, and nccl peers
    end at the timeout (docs/clusters.md, "When a rank dies").
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if launch_env.detect(os.environ).launcher == launch_env.MPI:
        # The launcher forwards each rank's output through its own pipes and drops what is still in them when it
        # kills the ranks after MPI_Abort: give it a moment, or this rank's traceback is often lost.
        time.sleep(MPI_OUTPUT_DRAIN_S)
        _mpi().COMM_WORLD.Abort(exit_code)
    os._exit(exit_code)


def load_state_dict(path, map_location="cpu"):
    """Read a checkpoint on this rank; every rank reads its own copy, with no collective (the reference's rank-0-only
    load hung multi-GPU resumes: docs/compatibility.md, "Reference defects fixed here" #3).

    :param path: local path or a blobfile URL (gs://, az://, https://).
    :return: the object stored, loaded with weights_only=True (tensors and primitive containers only).
    """
    if "://" in path:
        import blobfile

        with blobfile.BlobFile(path, "rb") as f:
            return torch.load(io.BytesIO(f.read()), map_location=map_location, weights_only=True)
    return torch.load(path, map_location=map_location, weights_only=True)


@torch.no_grad()
def sync_params(params):
    """Copy rank 0's values of `params` to every rank (in place)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for p in params:
            dist.broadcast(p, 0)


def barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup():
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()
