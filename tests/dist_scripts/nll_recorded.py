"""Run scripts/image_nll.py, recording which images each rank evaluates; optionally SIGKILL it mid-write.

Usage: python tests/dist_scripts/nll_recorded.py RECORD_DIR KILL_AFTER <image_nll flags>
Rank r writes RECORD_DIR/rank{r}.json, the image indices it evaluated, batch by batch. With KILL_AFTER >= 0 the
process kills itself with SIGKILL halfway through writing the part file of its batch number KILL_AFTER (0-based):
the bytes written so far stay where the write put them, as a real kill during a write leaves them; -1 = no kill.
"""

import json
import os
import signal
import sys

import image_nll
import numpy as np

from guided_diffusion import dist_util, nll


def die_writing(f):
    f.write(b"PK\x03\x04 partial")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    record_dir, kill_after, flags = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    evaluated = []
    original_image_bpd, original_savez = nll.image_bpd, np.savez

    def recorded_image_bpd(model, diffusion, images, indices, *args, **kwargs):
        evaluated.append([int(i) for i in indices])
        rank = dist_util.rank_and_world_size()[0]
        with open(os.path.join(record_dir, f"rank{rank}.json"), "w") as f:
            json.dump(evaluated, f)
        return original_image_bpd(model, diffusion, images, indices, *args, **kwargs)

    def savez_or_die(file, *args, **arrays):
        if "index" in arrays and len(evaluated) == kill_after + 1:  # a part file of that batch
            if isinstance(file, str):
                with open(file, "wb") as f:
                    die_writing(f)
            die_writing(file)
        original_savez(file, *args, **arrays)

    nll.image_bpd = recorded_image_bpd
    np.savez = savez_or_die
    image_nll.main(flags)


if __name__ == "__main__":
    main()
