"""Prepare a training set: raw images (folder or zip) -> size x size PNGs (folder or zip), with the loader's crop.

Usage, from the repository root after `pip install -e .`:
    python datasets/prepare.py --source RAW_FOLDER_OR_ZIP --dest OUT_FOLDER_OR_ZIP --size 256 [--workers 8]

Every image is decoded and centre-cropped exactly as `guided_diffusion.image_datasets` does during training
(`decode_image`, then `center_crop_arr`: BOX halving, BICUBIC resize of the short side, centre crop;
docs/compatibility.md, "Data loading"), so training on the output at the same size sees the same pixels as training
on the raw files, without re-decoding large images every epoch. Output names keep each file's relative path with the
extension changed to ".png" (the class prefix before the first "_" survives). Unreadable files are skipped with a
warning and counted.
See datasets/README.md for each dataset of the paper.
"""

import contextlib
import multiprocessing
import os
import sys

from PIL import Image
from tqdm import tqdm

from guided_diffusion import fileio
from guided_diffusion.cli import OneLineArgumentParser, script_main
from guided_diffusion.image_datasets import (
    MAX_IMAGE_PIXELS,
    FolderSource,
    ImageSetWriter,
    UnreadableImageError,
    center_crop_arr,
    decode_image,
    encode_png,
    open_image_source,
    safe_relative_name,
)

_worker_source = None   # the source, opened once in each worker process


def output_names(source):
    """Relative output name ("sub/a_1.png") for each source name; an error if two inputs would collide."""
    names = {}
    for name in source.names:
        relative = os.path.relpath(name, source.path) if isinstance(source, FolderSource) else name
        # Whatever an archive's member names hold ("../x", "/abs/x", "C:\\x"), outputs stay inside --dest.
        output = os.path.splitext(safe_relative_name(relative.replace(os.sep, "/")))[0] + ".png"
        if output in names:
            raise ValueError(
                f"{names[output]!r} and {name!r} in {source.path!r} would both become {output!r}; rename one"
            )
        names[output] = name
    return {source_name: output for output, source_name in names.items()}


def prepare_image(source, name, size):
    """One source file -> (name, PNG bytes of its size x size centre crop, None), or (name, None, error)."""
    try:
        image = decode_image(source.read(name))
    except UnreadableImageError as e:
        return name, None, str(e)
    return name, encode_png(Image.fromarray(center_crop_arr(image, size))), None


def _init_worker(source):
    global _worker_source
    _worker_source = source


def _prepare_in_worker(job):
    return prepare_image(_worker_source, *job)


def prepare_dataset(source_path, dest, size, workers):
    """Write the size x size centre crops of every image under `source_path` to `dest` (folder or .zip).

    :return: (number of images written, {skipped file name: error}).
    """
    if size <= 0 or size * size > MAX_IMAGE_PIXELS:
        # A larger output could not be read back: the training loader skips images of more pixels.
        raise ValueError(f"--size {size} must be a positive number of pixels, at most {int(MAX_IMAGE_PIXELS**0.5)} "
                         "(image_datasets.MAX_IMAGE_PIXELS)")
    if not source_path:
        raise ValueError("--source is required: a folder or .zip of images")
    if workers < 0:
        raise ValueError(f"--workers {workers} must be >= 0 (0 = decode in this process)")
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise FileExistsError(f"--dest {dest!r} already exists and is not an empty folder; choose a new path")
    (fileio.check_output_file if dest.lower().endswith(".zip") else fileio.check_output_dir)(dest, "--dest")
    source = open_image_source(source_path, name="--source")
    names = output_names(source)
    jobs = [(name, size) for name in source.names]
    skipped = {}
    with _naming_dest(dest), ImageSetWriter(dest) as writer, contextlib.ExitStack() as stack:
        if workers > 0:
            pool = stack.enter_context(multiprocessing.Pool(workers, initializer=_init_worker, initargs=(source,)))
            results = pool.imap(_prepare_in_worker, jobs, chunksize=16)
        else:
            results = (prepare_image(source, *job) for job in jobs)
        for name, data, error in tqdm(results, total=len(jobs), desc=f"preparing {size}x{size}", unit="img"):
            if data is None:
                skipped[name] = error
                tqdm.write(f"warning: skipping unreadable image {name}: {error}", file=sys.stderr)
                continue
            writer.add(names[name], data)
        if len(skipped) == len(jobs):  # raised inside the writer, so that a zip --dest is not created
            raise ValueError(f"--source {source_path!r}: none of its {len(jobs)} images is readable (see the "
                             "warnings above)")
    return len(jobs) - len(skipped), skipped


@contextlib.contextmanager
def _naming_dest(dest):
    """An OSError of creating or writing --dest (no such folder, no permission) as one error naming the flag; a full
    disk keeps its own message (fileio.NoSpaceError)."""
    try:
        yield
    except fileio.NoSpaceError:
        raise
    except OSError as e:
        raise ValueError(f"--dest {dest!r} cannot be written: {e.strerror or e} ({e.filename})") from None


@script_main()
def main(argv=None):
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="folder (searched recursively) or .zip of raw images")
    parser.add_argument("--dest", required=True, help="output folder, or a path ending in .zip")
    parser.add_argument("--size", type=int, default=256, help="output side in pixels (the paper: 256)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="decoding processes; 0 = decode in this process")
    args = parser.parse_args(argv)
    written, skipped = prepare_dataset(args.source, args.dest, args.size, args.workers)
    print(f"wrote {written} images of {args.size}x{args.size} to {args.dest}; skipped {len(skipped)} unreadable files")
    return written, skipped


if __name__ == "__main__":
    main()
