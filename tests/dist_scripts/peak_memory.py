"""Peak memory of reading an image set in decoding worker processes (DataLoader workers of the training loader, the
process pool of datasets/prepare.py), where a zip bomb would be decompressed.

    python peak_memory.py loader DATA_DIR                # one batch of 4 at 16 px from load_data, 1 worker
    python peak_memory.py prepare SOURCE DEST            # datasets/prepare.py at 16 px, 1 worker

Prints the growth (MB) of the largest peak resident memory, of this process or of a worker, over this process's
resident memory before reading; then "name | error" for each skipped file. A worker's peak (ru_maxrss, counted once
it has been joined) starts from the pages it shares with this process after the fork, hence the comparison with
this process's memory at that moment.
"""

import importlib.util
import os
import resource
import sys
import warnings

from guided_diffusion import image_datasets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resident_kb(field):
    """VmRSS (now) or VmHWM (peak) of this process, in kB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def read_with_loader(data_dir):
    data = image_datasets.load_data(data_dir=data_dir, batch_size=4, image_size=16, deterministic=True,
                                    num_workers=1, rank=0, world_size=1)
    next(data)
    data.close()   # joins the worker, so that RUSAGE_CHILDREN holds its peak
    return data.skipped_files


def read_with_prepare(source, dest):
    spec = importlib.util.spec_from_file_location("prepare", os.path.join(ROOT, "datasets", "prepare.py"))
    prepare = importlib.util.module_from_spec(spec)
    sys.modules["prepare"] = prepare   # the pool's workers look its functions up by module name
    spec.loader.exec_module(prepare)
    return prepare.prepare_dataset(source, dest, 16, 1)[1]   # the pool is joined when it returns


def main():
    action, *args = sys.argv[1:]
    baseline_kb = resident_kb("VmRSS")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # the skipped files are printed below
        skipped = read_with_loader(*args) if action == "loader" else read_with_prepare(*args)
    peak_kb = max(resident_kb("VmHWM"), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(f"{(peak_kb - baseline_kb) / 1024:.1f}")
    for name, error in sorted(skipped.items()):
        print(os.path.basename(name), "|", error)


if __name__ == "__main__":
    main()
