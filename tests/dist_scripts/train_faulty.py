"""Run scripts/image_train.py on every rank of a launch, optionally with a fault on one rank, and report each rank.

Usage: train_faulty.py OUT_DIR FAULT <image_train flags>
FAULT is "none" or KIND:RANK:STEP: rank RANK, having finished STEP optimizer steps, instead of the next one
  raise   raises a RuntimeError (a bug: traceback)
  error   raises a ValueError (a user error: one line)
  hang    writes its pid to OUT_DIR/hung_rank{RANK} and sleeps for ever (a rank that hangs, or is killed from outside)
A rank whose run ends writes OUT_DIR/rank{r}.json: world size, final step, digests of its weights and its EMA.
"""

import json
import os
import sys
import time

import torch

import image_train
from guided_diffusion import dist_util, train_util
from guided_diffusion.checkpoint import state_dict_fingerprint


def inject(out_dir, fault):
    """Patch TrainLoop.run_step with FAULT (see the module docstring)."""
    if fault == "none":
        return
    kind, rank, step = fault.split(":")
    run_step = train_util.TrainLoop.run_step

    def faulty_run_step(self, batch, cond):
        if self.rank == int(rank) and self.step == int(step):
            if kind == "raise":
                raise RuntimeError(f"injected fault on rank {rank} at step {step}")
            if kind == "error":
                raise ValueError(f"injected user error on rank {rank} at step {step}")
            with open(os.path.join(out_dir, f"hung_rank{rank}"), "w") as f:
                f.write(str(os.getpid()))
            while True:
                time.sleep(60)
        run_step(self, batch, cond)

    train_util.TrainLoop.run_step = faulty_run_step


def main():
    out_dir, fault, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    inject(out_dir, fault)
    loop = image_train.main(flags)
    rank, world_size = dist_util.rank_and_world_size()
    report = {"world_size": world_size, "step": loop.step, "model": state_dict_fingerprint(loop.model.state_dict()),
              "ema": state_dict_fingerprint(loop.ema_params)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
