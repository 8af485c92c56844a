"""Run under a 2-rank launcher: exercise dist_util's setup, collectives and checkpoint reading on every rank.

Usage: dist_check.py OUT_DIR CHECKPOINT
Each rank writes OUT_DIR/rank{r}.json.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from guided_diffusion import dist_util


def main():
    out_dir, checkpoint = sys.argv[1:3]
    visible_before = os.environ.get("CUDA_VISIBLE_DEVICES")
    launcher_view = dist_util.rank_and_world_size()
    dist_util.setup_dist()
    dist_util.setup_dist()  # idempotent
    rank, world_size = dist_util.rank_and_world_size()
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    params = [torch.full((3,), float(rank)), torch.full((2, 2), 10.0 + rank)]
    dist_util.sync_params(params)
    # Only rank 1 reads the file: a read must involve no collective, or this would hang (the reference's did:
    # docs/compatibility.md, "Reference defects fixed here" #3).
    loaded = dist_util.load_state_dict(checkpoint)["w"].tolist() if rank == 1 else None
    dist_util.barrier()
    report = dict(
        rank=rank,
        world_size=world_size,
        launcher_view=list(launcher_view),
        local_rank=dist_util.local_rank(),
        device=str(dist_util.dev()),
        backend=dist.get_backend(),
        all_reduce=total.item(),
        synced=[p.tolist() for p in params],
        loaded=loaded,
        visible_before=visible_before,
        visible_after=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )
    dist_util.cleanup()
    report["initialized_after_cleanup"] = dist.is_initialized()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
