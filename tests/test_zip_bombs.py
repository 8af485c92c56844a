"""Zip and decompression bombs: a member declaring 1 GiB in a ~1 MB zip, and a PNG whose header declares 81 M
pixels, are skipped with a warning by the training loader and by datasets/prepare.py, before any of it is
decompressed: the peak memory of the process reading them stays far below the bomb's size."""

import os
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest
from launchers import clean_env
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOMB_BYTES = 2**30
PEAK_LIMIT_MB = 200

# Reads every image of the zip argv[2] the way argv[1] says, then prints the growth of the peak resident memory (MB)
# over the peak before reading, and the warnings that were given.
READER = """
import importlib.util, resource, sys, warnings
mode, archive = sys.argv[1], sys.argv[2]
from guided_diffusion import image_datasets
spec = importlib.util.spec_from_file_location("prepare", sys.argv[3])
prepare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if mode == "train":
        data = image_datasets.load_data(data_dir=archive, batch_size=4, image_size=16, deterministic=True,
                                        num_workers=0)  # read in this process, whose memory is measured
        next(data)
        skipped = data.skipped_files
    else:
        _, skipped = prepare.prepare_dataset(archive, sys.argv[4], 16, 0)
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(f"{grown:.1f}")
for name, error in sorted(skipped.items()):
    print(name, "|", error)
"""


def huge_png_header():
    """A PNG declaring 9000 x 9000 RGB pixels (81 M, 243 MB decoded: under Pillow's own bomb limit), with one tiny
    IDAT: only decoding would find it short."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", 9000, 9000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb_zip(tmp_path_factory):
    """4 small images, a 1 GiB member of zeros (about 1 MB compressed) and the huge-header PNG."""
    path = tmp_path_factory.mktemp("bombs") / "bombs.zip"
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for index in range(4):
            with zf.open(f"img_{index}.png", "w") as f:
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(f, format="PNG")
        with zf.open("bomb.png", "w", force_zip64=True) as f:
            zeros = bytes(2**24)
            for _ in range(BOMB_BYTES // len(zeros)):
                f.write(zeros)
        zf.writestr("huge_header.png", huge_png_header())
    assert os.path.getsize(path) < 4 * 2**20
    return path


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["train", "prepare"])
def test_bombs_are_skipped_before_they_are_decompressed(bomb_zip, tmp_path, mode):
    result = subprocess.run(
        [sys.executable, "-c", READER, mode, str(bomb_zip), os.path.join(ROOT, "datasets", "prepare.py"),
         str(tmp_path / "out")],
        env=clean_env(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    grown, *skipped = result.stdout.strip().splitlines()
    assert float(grown) < PEAK_LIMIT_MB, result.stdout
    assert skipped == [
        f"bomb.png | it declares {BOMB_BYTES} bytes, more than the 67108864 an image file may have here "
        "(image_datasets.MAX_IMAGE_BYTES): a zip bomb, or not an image",
        "huge_header.png | its header declares 9000 x 9000 pixels, more than the 50000000 an image may have "
        "here (image_datasets.MAX_IMAGE_PIXELS): a decompression bomb?",
    ]
    if mode == "prepare":
        assert sorted(os.listdir(tmp_path / "out")) == [f"img_{index}.png" for index in range(4)]
