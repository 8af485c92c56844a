import os
import shutil
import tempfile

import pytest
import torch

from train_fixtures import make_image_folder


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


@pytest.fixture(autouse=True, scope="session")
def private_cache_dir():
    """The speed-option timings (guided_diffusion/speed_options.py) are cached under $XDG_CACHE_HOME: the tests, and
    the processes they launch, use a fresh folder of their own instead of the user's ~/.cache."""
    previous = os.environ.get("XDG_CACHE_HOME")
    folder = tempfile.mkdtemp(prefix="p2-test-cache-")
    os.environ["XDG_CACHE_HOME"] = folder
    yield folder
    if previous is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = previous
    shutil.rmtree(folder, ignore_errors=True)
