"""Hostile data beyond single files: bombs met inside decoding worker processes, a FIFO where a zip is expected, a
--size whose output training could not read, and bad reference images counted at every in-training evaluation."""

import os
import subprocess
import sys

import pytest
import test_zip_bombs
from launchers import TESTS_DIR, clean_env
from test_zip_bombs import BOMB_BYTES, PEAK_LIMIT_MB

PEAK_MEMORY = os.path.join(TESTS_DIR, "dist_scripts", "peak_memory.py")
bomb_zip = test_zip_bombs.bomb_zip   # a fixture of that module, used here by name


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
