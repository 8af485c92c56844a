import os
import sys

import pytest
import torch

# tests/helpers.py and tests/dist_scripts/*.py are importable by name; the repo root without installation.
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(TESTS_DIR, "dist_scripts"))
sys.path.insert(0, TESTS_DIR)
sys.path.insert(0, os.path.dirname(TESTS_DIR))

from train_fixtures import make_image_folder  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One torch thread everywhere: results are bit-comparable with the one-thread subprocesses the tests launch,
    and tiny models run faster than on two threads of a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of 16 tiny PNGs (20x20, two classes by name prefix)."""
    return make_image_folder(str(tmp_path_factory.mktemp("images")))
