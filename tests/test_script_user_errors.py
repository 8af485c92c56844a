"""Bad files given to the scripts (damaged or hostile checkpoints, broken statistics, unusable output paths): each
run ends with exit code 1 and one line "<script>: error: ..." on stderr, never a traceback."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import save_standin_inception
from launchers import clean_env
from PIL import Image
from sample_tiny_model import save_tiny_checkpoint, tiny_flags
from test_checkpoint import WritesAFileWhenUnpickled, truncate_file
from train_fixtures import ROOT, train_argv

MARKER = "code_ran"  # what a hostile pickle would create if it were ever unpickled


def _image_sample(tmp_path, model_path, *flags):
    return ["image_sample.py", *tiny_flags(timestep_respacing="2"), "--num_samples", "1", "--model_path",
            str(model_path), *flags]


def _image_train(tmp_path, resume, images, **flags):
    return ["image_train.py", *train_argv(images, str(tmp_path / "run"), max_steps=2, resume_checkpoint=str(resume),
                                          **flags)]


def _evaluate(tmp_path, samples, reference, *flags):
    standin = save_standin_inception(tmp_path / "standin.pt")
    return ["evaluate.py", str(samples), str(reference), "--inception_path", standin, "--num_workers", "0",
            "--cache_dir", str(tmp_path / "cache"), "--metrics", "fid", *flags]


def _weights(tmp_path, damage):
    """A tiny U-Net checkpoint damaged as `damage` says: truncated, empty or holding a hostile pickled object."""
    path = tmp_path / "model000000.pt"
    save_tiny_checkpoint(str(path))
    if damage == "truncated":
        truncate_file(path)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "hostile":
        torch.save({"w": WritesAFileWhenUnpickled(str(tmp_path / MARKER))}, path)
    return path


def _images_npz(tmp_path, name="samples.npz"):
    path = tmp_path / name
    np.savez(path, arr_0=np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    return path


def _nan_statistics(tmp_path):
    path = tmp_path / "statistics.npz"
    np.savez(path, mu=np.zeros(16), sigma=np.full((16, 16), np.nan))
    return path


def _object_samples(tmp_path):
    path = tmp_path / "samples.npz"
    np.savez(path, arr_0=np.array([None, 1], dtype=object))
    return path


def _truncated_npz(tmp_path):
    path = _images_npz(tmp_path, "reference.npz")
    truncate_file(path)
    return path


def _a_file(tmp_path):
    (tmp_path / "a_file").write_text("x")
    return tmp_path / "a_file"


def _a_folder(tmp_path):
    (tmp_path / "a_folder").mkdir()
    return tmp_path / "a_folder"


# (case, argv builder(tmp_path, images), phrase the error line must hold)
CASES = [
    ("sample: truncated .pt", lambda t, i: _image_sample(t, _weights(t, "truncated")),
     "is not a readable PyTorch checkpoint"),
    ("sample: empty .pt", lambda t, i: _image_sample(t, _weights(t, "empty")), "EOFError: no data"),
    ("sample: hostile pickle", lambda t, i: _image_sample(t, _weights(t, "hostile")),
     "holds a pickled Python object (io.open)"),
    ("sample: --sample_dir is a file", lambda t, i: _image_sample(t, _weights(t, ""), "--sample_dir", _a_file(t)),
     "--sample_dir"),
    ("sample: --model_path is a folder", lambda t, i: _image_sample(t, os.path.dirname(_weights(t, ""))),
     "is a folder; pass one checkpoint file such as"),
    ("train: truncated checkpoint", lambda t, i: _image_train(t, _weights(t, "truncated"), i),
     "is not a readable PyTorch checkpoint"),
    ("train: empty checkpoint", lambda t, i: _image_train(t, _weights(t, "empty"), i), "EOFError: no data"),
    ("train: hostile pickle", lambda t, i: _image_train(t, _weights(t, "hostile"), i),
     "holds a pickled Python object (io.open)"),
    ("train: checkpoint not fitting, no config.yaml", lambda t, i: _image_train(t, _weights(t, ""), i),
     "does not fit the U-Net built from the current flags"),
    ("evaluate: truncated npz", lambda t, i: _evaluate(t, _images_npz(t), _truncated_npz(t)),
     "is not a readable npz file"),
    ("evaluate: object array", lambda t, i: _evaluate(t, _object_samples(t), _images_npz(t, "reference.npz")),
     "holds Python objects, which are never unpickled"),
    ("evaluate: NaN statistics", lambda t, i: _evaluate(t, _images_npz(t), _nan_statistics(t)),
     "sigma holds 256 NaN or infinite value(s)"),
    ("evaluate: --out is a folder", lambda t, i: _evaluate(t, _images_npz(t), _images_npz(t, "reference.npz"),
                                                           "--out", _a_folder(t)), "--out"),
]


def run_script(argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", argv[0]), *argv[1:]], env=clean_env(),
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("builder, phrase", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_file_ends_the_script_with_one_line(images, tmp_path, builder, phrase):
    argv = builder(tmp_path, images)
    result = run_script(argv)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    script = argv[0]
    error = result.stderr[result.stderr.index(f"{script}: error: "):].splitlines()
    # A checkpoint that does not fit is summarised: the cause and a few keys (state_dict_check.py).
    assert len(error) == 1 or (phrase.startswith("does not fit") and len(error) <= 6), error
    assert phrase in error[0]
    assert "will likely succeed" not in result.stderr and "allow_pickle" not in result.stderr
    assert not (tmp_path / MARKER).exists()


def test_corrupt_reference_image_is_skipped_and_counted(tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    pixels = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(reference / f"{index}.png")
    (reference / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    result = run_script(_evaluate(tmp_path, _images_npz(tmp_path), reference, "--out", str(tmp_path / "r.json")))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "skipped 1 unreadable image(s)" in result.stderr and (tmp_path / "r.json").exists()
