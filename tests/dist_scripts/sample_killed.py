"""Run scripts/image_sample.py and SIGKILL this process while it writes the first PNG after `--kill_after` PNGs.

Usage: python tests/dist_scripts/sample_killed.py --kill_after K <image_sample flags>  (--kill_after first)
The dying write leaves its temporary file behind, as a real kill during a write would.
"""

import os
import signal
import sys

import image_sample
from guided_diffusion import sampling
from guided_diffusion.fileio import TEMPORARY_MARKER


def main():
    if sys.argv[1] != "--kill_after":
        sys.exit("usage: sample_killed.py --kill_after K <image_sample flags>")
    kill_after, flags = int(sys.argv[2]), sys.argv[3:]
    written = 0
    original_write_png = sampling.write_png

    def write_png_then_die(path, image, label=None):
        nonlocal written
        if written == kill_after:
            # Named as fileio.atomic_write names its temporary files.
            directory, name = os.path.split(path)
            with open(os.path.join(directory, f".{name}{TEMPORARY_MARKER}{os.getpid()}"), "wb") as f:
                f.write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        original_write_png(path, image, label)
        written += 1

    sampling.write_png = write_png_then_die
    image_sample.main(flags)


if __name__ == "__main__":
    main()
