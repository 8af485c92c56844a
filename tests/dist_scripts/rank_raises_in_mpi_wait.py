"""Rank 1 raises a user error while rank 0 waits for it in an MPI barrier, under the scripts' error handler.

Nothing but the failing rank's MPI_Abort (guided_diffusion/cli.py, dist_util.end_every_rank) can end rank 0 then:
no socket of a process group closes under it.
"""

from mpi4py import MPI

from guided_diffusion import dist_util  # noqa: F401 (loaded as in every training script: the error path uses it)
from guided_diffusion.cli import script_main


@script_main()
def main():
    if MPI.COMM_WORLD.Get_rank() == 1:
        raise ValueError("injected user error on rank 1")
    MPI.COMM_WORLD.Barrier()


if __name__ == "__main__":
    main()
