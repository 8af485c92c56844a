"""Hostile data beyond single files: bombs met inside decoding worker processes, a FIFO where a zip is expected, a
--size whose output training could not read, and bad reference images counted at every in-training evaluation."""

import os
import shutil
import subprocess
import sys
import threading

import pytest
import test_train_eval
import test_zip_bombs
from launchers import TESTS_DIR, clean_env
from test_prepare import PREPARE_PATH, prepare
from test_train_eval import eval_flags
from test_zip_bombs import BOMB_BYTES, PEAK_LIMIT_MB, huge_png_header
from train_fixtures import make_image_folder, read_progress, train

from guided_diffusion import image_datasets

PEAK_MEMORY = os.path.join(TESTS_DIR, "dist_scripts", "peak_memory.py")
bomb_zip = test_zip_bombs.bomb_zip   # fixtures of those modules, used here by name
standin = test_train_eval.standin


@pytest.mark.slow
@pytest.mark.parametrize("reader", ["loader", "prepare"])
def test_bombs_read_in_a_decoding_worker_are_skipped_within_the_memory_budget(bomb_zip, tmp_path, reader):
    """The workers decode (load_data's default num_workers=1, prepare.py's pool): their peak memory counts."""
    args = [str(bomb_zip)] + ([str(tmp_path / "out")] if reader == "prepare" else [])
    result = subprocess.run([sys.executable, PEAK_MEMORY, reader, *args], env=clean_env(), capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    grown, *skipped = result.stdout.strip().splitlines()
    assert float(grown) < PEAK_LIMIT_MB, result.stdout
    assert [line.split(" | ")[0] for line in skipped] == ["bomb.png", "huge_header.png"], result.stdout
    assert f"it declares {BOMB_BYTES} bytes" in skipped[0]


def run_or_unblock(function, timeout, unblock):
    """function()'s result or exception, from a daemon thread; a failure if it still runs after `timeout` seconds
    (then `unblock()` frees the thread)."""
    outcome = {}

    def call():
        try:
            outcome["result"] = function()
        except ValueError as e:
            outcome["error"] = e

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        unblock()
        pytest.fail(f"still waiting after {timeout} s")
    return outcome


def _open_fifo_for_writing(path):
    # A reader waiting in open() on a FIFO returns once a writer opens it; closing it then ends the file.
    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def test_a_fifo_named_like_a_zip_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "set.zip"
    os.mkfifo(fifo)
    outcome = run_or_unblock(lambda: image_datasets.open_image_source(str(fifo)), timeout=30,
                             unblock=lambda: _open_fifo_for_writing(fifo))
    assert isinstance(outcome.get("error"), ValueError) and "is not a regular file" in str(outcome["error"])
    # datasets/prepare.py lists with the same code: one line, exit code 1.
    done = subprocess.run([sys.executable, PREPARE_PATH, "--source", str(fifo), "--dest", str(tmp_path / "out")],
                          env=clean_env(), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert done.stderr.strip() == f"prepare.py: error: {str(fifo)!r} is not a regular file (a FIFO, socket or " \
                                  "device): pass a folder or a .zip file"


def test_a_size_whose_images_training_would_skip_is_refused_before_any_work(tmp_path):
    make_image_folder(str(tmp_path / "raw"), count=1)
    side = int(image_datasets.MAX_IMAGE_PIXELS**0.5) + 1   # 7072 x 7072 px: over the loader's pixel limit
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--source", str(tmp_path / "raw"), "--dest", str(tmp_path / "out"), "--size", str(side),
                      "--workers", "0"])
    assert str(exit_info.value) == (f"prepare.py: error: --size {side} must be a positive number of pixels, at most "
                                    f"{side - 1} (image_datasets.MAX_IMAGE_PIXELS)")
    assert not (tmp_path / "out").exists()


def test_bad_reference_images_are_counted_in_the_progress_rows_of_every_evaluation(images, standin, tmp_path):
    """The second evaluation reads the reference statistics from the cache; its row counts the skipped images too."""
    data = tmp_path / "data"
    shutil.copytree(images, data)
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (data / "oversized.png").write_bytes(huge_png_header())
    train(str(data), tmp_path / "run", max_steps=4, **eval_flags(standin, tmp_path / "cache"))
    rows = [row for row in read_progress(tmp_path / "run") if "fid" in row]
    assert [(row["step"], row["eval_reference_unreadable"]) for row in rows] == [(2, 2), (4, 2)]
