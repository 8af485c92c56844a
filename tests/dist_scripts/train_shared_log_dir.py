"""Run under a 2-rank launcher (mpiexec or torchrun): image_train.py on both ranks into one --log_dir.

Usage: train_shared_log_dir.py DATA_DIR LOG_DIR REPORT_DIR
Each rank writes REPORT_DIR/rank{r}.json: its pid, the holder recorded in LOG_DIR's lock file while it trained its
first step (rank 0 takes the lock for the job) and the step it finished at.
"""

import json
import os
import sys

import torch

from train_fixtures import train_argv

import image_train
from guided_diffusion import dist_util, run_lock, train_util


def main():
    torch.set_num_threads(1)
    data_dir, log_dir, report_dir = sys.argv[1:4]
    holders = []
    run_step = train_util.TrainLoop.run_step

    def recording_run_step(self, batch, cond):
        if not holders:
            holders.append(run_lock.read_holder(log_dir))
        run_step(self, batch, cond)

    train_util.TrainLoop.run_step = recording_run_step
    cleanup, dist_util.cleanup = dist_util.cleanup, lambda: None  # rank and step are read after main() returns
    loop = image_train.main(train_argv(data_dir, log_dir, max_steps=2))
    report = {"rank": loop.rank, "pid": os.getpid(), "holder": holders[0], "step": loop.step}
    with open(os.path.join(report_dir, f"rank{loop.rank}.json"), "w") as f:
        json.dump(report, f)
    cleanup()


if __name__ == "__main__":
    main()
