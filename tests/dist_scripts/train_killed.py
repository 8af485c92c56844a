"""Run scripts/image_train.py and SIGKILL it when FILE's temporary copy is complete, just before its rename.

Usage: python tests/dist_scripts/train_killed.py FILE <image_train flags>     (FILE: a name such as state000004.pt)
The process dies as a crash during a checkpoint write would leave it: the temporary file written and fsynced,
earlier files of the same checkpoint in place, FILE itself missing.
"""

import os
import signal
import sys

import torch

import image_train


def main():
    target, flags = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    replace = os.replace

    def replace_or_die(source, destination):
        if os.path.basename(destination) == target:
            os.kill(os.getpid(), signal.SIGKILL)
        replace(source, destination)

    os.replace = replace_or_die
    image_train.main(flags)


if __name__ == "__main__":
    main()
