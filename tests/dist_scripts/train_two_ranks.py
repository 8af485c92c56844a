"""Run under a 2-rank launcher (mpiexec or torchrun): 4 straight steps, and 2 steps + resume + 2 steps.

Usage: train_two_ranks.py first DATA_DIR OUT_DIR     trains OUT_DIR/straight (4 steps) and OUT_DIR/resumed (2 steps)
       train_two_ranks.py resume DATA_DIR OUT_DIR    a new launch: resumes OUT_DIR/resumed up to step 4
Each rank writes OUT_DIR/{phase}_rank{r}.json: digests of its final weights and EMA after each run, a digest of
every batch it trained on, and its CUDA_VISIBLE_DEVICES before and after the setup (which must not change it).
"""

import json
import os
import sys

import torch

from train_fixtures import train_argv

import image_train
from guided_diffusion import dist_util, train_util
from guided_diffusion.checkpoint import state_dict_fingerprint

FLAGS = dict(microbatch=2, schedule_sampler="loss-second-moment")


def main():
    torch.set_num_threads(1)
    phase, data_dir, out_dir = sys.argv[1:4]
    visible_before = os.environ.get("CUDA_VISIBLE_DEVICES")
    batches = []
    run_step = train_util.TrainLoop.run_step

    def recording_run_step(self, batch, cond):
        batches.append(state_dict_fingerprint(batch))
        run_step(self, batch, cond)

    train_util.TrainLoop.run_step = recording_run_step
    # Several runs share this process's group: torchrun's store cannot host a second group after the first ends.
    cleanup, dist_util.cleanup = dist_util.cleanup, lambda: None
    resumed_dir = os.path.join(out_dir, "resumed")
    if phase == "first":
        loops = {
            "straight": image_train.main(train_argv(data_dir, os.path.join(out_dir, "straight"), max_steps=4, **FLAGS)),
            "half": image_train.main(train_argv(data_dir, resumed_dir, max_steps=2, **FLAGS)),
        }
    else:
        flags = dict(max_steps=4, resume_checkpoint=resumed_dir, **FLAGS)
        loops = {"resumed": image_train.main(train_argv(data_dir, resumed_dir, **flags))}
    rank, world_size = dist_util.rank_and_world_size()
    report = {
        "rank": rank,
        "world_size": world_size,
        "visible_before": visible_before,
        "visible_after": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "batches": batches,
    }
    for name, loop in loops.items():
        report[f"{name}_model"] = state_dict_fingerprint(loop.model.state_dict())
        report[f"{name}_ema"] = state_dict_fingerprint(loop.ema_params)
        report[f"{name}_step"] = loop.step
    with open(os.path.join(out_dir, f"{phase}_rank{rank}.json"), "w") as f:
        json.dump(report, f)
    cleanup()


if __name__ == "__main__":
    main()
