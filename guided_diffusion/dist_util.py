"""One distributed setup for mpiexec (the ADM way), torchrun and a plain single process.

The reference's setup is described in docs/compatibility.md, "Training loop" (Distributed training).

- mpiexec: rank and world size come from MPI; rank 0 opens the rendezvous store on a free port and broadcasts
  its address and port over MPI.
- torchrun: rank, world size, local rank and the master address come from its environment variables.
- a plain process (or any launch with world size 1): no process group at all, so single-process training pays
  for no collectives.

nccl on CUDA, gloo otherwise. Each process uses cuda:<local rank> among the devices the user made visible; the
user's CUDA_VISIBLE_DEVICES is never changed (the reference overwrote it: docs/compatibility.md, "Reference defects
fixed here" #10). This is the only module that reads launcher variables or imports MPI; everything else asks
`rank_and_world_size()` and `dev()`.
"""

import io
import os
import socket

import torch
import torch.distributed as dist

# Variables an MPI launcher sets to the world size (Open MPI; MPICH/Hydra, Intel MPI and Slurm PMI; MVAPICH2).
MPI_WORLD_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")

# Local rank found by setup_dist (MPI needs a collective for it, which must not run on a query path).
_local_rank = None


def _launcher():
    """"torchrun", "mpi" or None, from the environment alone (no MPI call, so it cannot hang)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun"
    for name in MPI_WORLD_SIZE_VARIABLES:
        if int(os.environ.get(name, "1")) > 1:
            return "mpi"
    return None


def _mpi():
    # Imported only under an MPI launcher: plain runs need neither mpi4py nor an MPI library.
    from mpi4py import MPI

    return MPI


def rank_and_world_size():
    """(rank, world size): the process group's when initialised, else the launcher's, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    launcher = _launcher()
    if launcher == "torchrun":
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if launcher == "mpi":
        comm = _mpi().COMM_WORLD
        return comm.Get_rank(), comm.Get_size()
    return 0, 1


def local_rank():
    """Rank among the processes of this node (selects the GPU)."""
    if _local_rank is not None:
        return _local_rank
    return int(os.environ.get("LOCAL_RANK", "0"))


def dev():
    """The device this process trains on: cuda:<local rank> (modulo the visible devices), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def setup_dist():
    """Join the process group of the current launch (idempotent). A world of one process creates no group."""
    global _local_rank
    if dist.is_initialized():
        return
    launcher = _launcher()
    rank, world_size = rank_and_world_size()
    if launcher == "mpi":
        comm = _mpi().COMM_WORLD
        node_comm = comm.Split_type(_mpi().COMM_TYPE_SHARED)
        _local_rank = node_comm.Get_rank()
    if world_size == 1:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(dev())
    if launcher == "torchrun":
        dist.init_process_group(backend=backend, init_method="env://")
        return
    store = _mpi_rendezvous_store(comm, all_on_one_node=node_comm.Get_size() == world_size)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)


def _mpi_rendezvous_store(comm, all_on_one_node):
    """A TCPStore served by rank 0 on a free port; address and port reach the other ranks over MPI.

    On one node every rank reaches rank 0 at localhost; across nodes, at rank 0's host name.
    """
    rank, world_size = comm.Get_rank(), comm.Get_size()
    host = "localhost" if all_on_one_node else socket.getfqdn()
    host = comm.bcast(host, root=0)
    store = None
    if rank == 0:
        # Port 0: the store binds a free port itself, so no other process can take it in between.
        store = dist.TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False)
    port = comm.bcast(store.port if rank == 0 else None, root=0)
    if rank != 0:
        store = dist.TCPStore(host, port, world_size, is_master=False)
    return store


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
