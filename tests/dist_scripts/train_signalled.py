"""Run scripts/image_train.py and send this process a real signal in the middle of optimizer step STEP.

Usage: python train_signalled.py SIGNAL STEP RANKS OUT_DIR <image_train flags>      (alone or under a launcher)
SIGNAL is TERM, USR1 or INT; RANKS "all" or one rank number: the ranks that signal themselves (os.kill) after the
backward pass of step STEP, before its optimizer step; or "wait": there every rank creates OUT_DIR/waiting_rank{r}
and waits for a signal from outside. Each rank's stderr goes to OUT_DIR/stderr_rank{r}.txt and its
exit code to OUT_DIR/exit_rank{r}.json. A run resumed at or after STEP is not signalled. With DECISION_LAG=N in the
environment the ranks' stop decisions lag N steps, as they do on CUDA (guided_diffusion/preemption.py).
"""

import json
import os
import signal
import sys
import time

import torch

import image_train
from guided_diffusion import dist_util, preemption, train_util


def main():
    name, step, ranks, out_dir, flags = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
    torch.set_num_threads(1)
    rank = dist_util.rank_and_world_size()[0]
    os.makedirs(out_dir, exist_ok=True)
    stderr = os.open(os.path.join(out_dir, f"stderr_rank{rank}.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(stderr, 2)
    os.close(stderr)
    optimize = train_util.TrainLoop.optimize

    def signalled_optimize(self, log_now):
        if self.step + 1 == step and ranks == "wait":
            # Wrap the installed handler before announcing the wait, and poll: a signal that arrives between the
            # announcement and a signal.pause() would otherwise be missed and the rank would wait for ever.
            number, received = getattr(signal, "SIG" + name), []
            handler = signal.getsignal(number)
            signal.signal(number, lambda signum, frame: (received.append(signum), handler(signum, frame)))
            open(os.path.join(out_dir, f"waiting_rank{self.rank}"), "w").close()
            while not received:
                time.sleep(0.01)
            signal.signal(number, handler)
        elif self.step + 1 == step and ranks in ("all", str(self.rank)):
            os.kill(os.getpid(), getattr(signal, "SIG" + name))
        optimize(self, log_now)

    train_util.TrainLoop.optimize = signalled_optimize
    if "DECISION_LAG" in os.environ:
        preemption.decision_lag = lambda device, world_size: int(os.environ["DECISION_LAG"])
    code = 0
    try:
        image_train.main(flags)
    except SystemExit as exit:
        code = exit.code
        raise
    finally:
        with open(os.path.join(out_dir, f"exit_rank{rank}.json"), "w") as f:
            json.dump({"code": code}, f)


if __name__ == "__main__":
    main()
