"""Tests of datasets/prepare.py: raw images -> N x N PNGs with the loader's centre crop."""

import importlib.util
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from launchers import clean_env
from PIL import Image

from guided_diffusion.image_datasets import center_crop_arr, decode_image, load_data

PREPARE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "datasets", "prepare.py")
_spec = importlib.util.spec_from_file_location("prepare", PREPARE_PATH)
prepare = importlib.util.module_from_spec(_spec)
sys.modules["prepare"] = prepare   # so worker processes can find the functions they are sent
_spec.loader.exec_module(prepare)


@pytest.fixture
def raw_folder(tmp_path):
    """Raw images of assorted sizes, formats and modes, nested, plus one corrupt file and one non-image."""
    root = tmp_path / "raw"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)).save(root / "cat_1.png")
    Image.fromarray(rng.integers(0, 256, (40, 90, 3), dtype=np.uint8)).save(root / "cat_2.jpg", quality=95)
    Image.fromarray(rng.integers(0, 256, (33, 33), dtype=np.uint8)).save(root / "sub" / "dog_1.png")
    Image.fromarray(rng.integers(0, 256, (64, 48, 4), dtype=np.uint8)).save(root / "sub" / "dog_2.PNG")
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "readme.txt").write_text("ignored")
    return root


def test_folder_to_folder_uses_the_loader_crop(raw_folder, tmp_path, capsys):
    dest = tmp_path / "out"
    written, skipped = prepare.main(["--source", str(raw_folder), "--dest", str(dest), "--size", "16",
                                     "--workers", "0"])
    assert written == 4
    assert list(skipped) == [str(raw_folder / "sub" / "broken.jpg")]
    assert "broken.jpg" in capsys.readouterr().err
    outputs = sorted(os.path.relpath(os.path.join(d, f), dest) for d, _, files in os.walk(dest) for f in files)
    assert outputs == ["cat_1.png", "cat_2.png", "sub/dog_1.png", "sub/dog_2.png"]
    for raw_name, out_name in [("cat_2.jpg", "cat_2.png"), ("sub/dog_2.PNG", "sub/dog_2.png")]:
        expected = center_crop_arr(decode_image((raw_folder / raw_name).read_bytes()), 16)
        with Image.open(dest / out_name) as out:
            assert out.mode == "RGB" and out.size == (16, 16)
            np.testing.assert_array_equal(np.asarray(out), expected)


def test_zip_output_matches_folder_output_and_trains_like_raw(raw_folder, tmp_path):
    prepare.prepare_dataset(str(raw_folder), str(tmp_path / "out"), 16, workers=0)
    zipped = tmp_path / "raw.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        for d, _, files in os.walk(raw_folder):
            for f in files:
                archive.write(os.path.join(d, f), os.path.relpath(os.path.join(d, f), raw_folder))
    written, _ = prepare.prepare_dataset(str(zipped), str(tmp_path / "out.zip"), 16, workers=2)
    assert written == 4
    with zipfile.ZipFile(tmp_path / "out.zip") as archive:
        assert archive.namelist() == ["cat_1.png", "cat_2.png", "sub/dog_1.png", "sub/dog_2.png"]
        for member in archive.namelist():
            assert archive.read(member) == (tmp_path / "out" / member).read_bytes()

    # Re-cropping an S x S image at S is the identity, so the prepared set feeds training the same pixels.
    kwargs = dict(batch_size=4, image_size=16, deterministic=True, random_flip=False, num_workers=0, rank=0,
                  world_size=1)
    with pytest.warns(RuntimeWarning, match="broken.jpg"):
        x_raw, _ = next(load_data(data_dir=str(raw_folder), **kwargs))
    x_prepared, _ = next(load_data(data_dir=str(tmp_path / "out.zip"), **kwargs))
    assert torch.equal(x_raw, x_prepared)


def test_existing_dest_and_name_collisions_are_errors(raw_folder, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x.png").write_bytes(b"")
    with pytest.raises(FileExistsError, match="taken"):
        prepare.prepare_dataset(str(raw_folder), str(taken), 16, workers=0)
    Image.new("RGB", (8, 8)).save(raw_folder / "cat_1.jpg")
    with pytest.raises(ValueError, match="would both become 'cat_1.png'"):
        prepare.prepare_dataset(str(raw_folder), str(tmp_path / "new"), 16, workers=0)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare.prepare_dataset(str(tmp_path / "nowhere"), str(tmp_path / "new"), 16, workers=0)


HOSTILE_MEMBERS = {  # zip member name -> where prepare.py writes it, relative to --dest (None: not listed)
    "../../x1.png": None,  # a ".." component is hidden ("."), so neither training nor prepare.py lists it
    "a/../../x3.png": None,
    "..\\..\\x4.png": None,
    "/abs/x2.png": "abs/x2.png",
    "C:\\win\\x5.png": "win/x5.png",
    "fine/x6.png": "fine/x6.png",
}
WRITTEN = sorted(name for name in HOSTILE_MEMBERS.values() if name is not None)


def _tree(root):
    """Every file under `root`, as paths relative to it."""
    return sorted(os.path.relpath(os.path.join(folder, name), root)
                  for folder, _, names in os.walk(root) for name in names)


@pytest.mark.parametrize("dest_name", ["out", "out.zip"])
def test_member_names_that_climb_out_of_dest_are_written_inside_it(tmp_path, dest_name):
    work = tmp_path / "work" / "deeper"  # "../../" from --dest lands in tmp_path/work
    work.mkdir(parents=True)
    archive = work / "hostile.zip"
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(archive, "w") as zf:
        for name in HOSTILE_MEMBERS:
            image = Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
            with zf.open(name, "w") as f:
                image.save(f, format="PNG")
    before = _tree(tmp_path)
    dest = work / dest_name
    prepare.main(["--source", str(archive), "--dest", str(dest), "--size", "16", "--workers", "0"])
    new_files = sorted(set(_tree(tmp_path)) - set(before))
    if dest_name == "out":
        assert new_files == [os.path.join("work", "deeper", "out", *name.split("/")) for name in WRITTEN]
    else:
        assert new_files == [os.path.join("work", "deeper", "out.zip")]
        with zipfile.ZipFile(dest) as zf:
            assert sorted(zf.namelist()) == WRITTEN
    # Training reads such an archive directly without writing anything.
    batch, _ = next(load_data(data_dir=str(archive), batch_size=2, image_size=16, deterministic=True))
    assert batch.shape == (2, 3, 16, 16)


def test_the_writer_refuses_a_name_that_is_not_plain(tmp_path):
    from guided_diffusion.image_datasets import ImageSetWriter

    for dest in (tmp_path / "folder", tmp_path / "set.zip"):
        with ImageSetWriter(str(dest)) as writer, pytest.raises(ValueError, match="is not a plain relative path"):
            writer.add("../escaped.png", b"x")
    assert not (tmp_path / "escaped.png").exists()


def _bad_source(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"not a png")
    return tmp_path / "bad"


PREPARE_ERRORS = [  # (case, flags from tmp_path, the one line expected on stderr after "prepare.py: error: ")
    ("missing source", lambda t: ["--source", str(t / "none"), "--dest", str(t / "o")],
     r"--source '.*none' does not exist"),
    ("not a zip", lambda t: ["--source", str(_a_file(t, "x.zip")), "--dest", str(t / "o")],
     r"--source '.*x.zip' is not a readable zip file"),
    ("empty source", lambda t: ["--source", str(_empty(t)), "--dest", str(t / "o")],
     r"--source '.*empty' holds no images"),
    ("all unreadable", lambda t: ["--source", str(_bad_source(t)), "--dest", str(t / "o.zip"), "--workers", "0"],
     r"--source '.*bad': none of its 1 images is readable \(see the warnings above\)"),
    ("dest under a file", lambda t: ["--source", str(_bad_source(t)), "--dest", str(_a_file(t, "f") / "o")],
     r"--dest '.*f/o' cannot be created: .*f is a file, not a folder"),
    ("dest not empty", lambda t: ["--source", str(_bad_source(t)), "--dest", str(_a_file(t, "f"))],
     r"--dest '.*f' already exists and is not an empty folder"),
    ("bad size", lambda t: ["--source", "s", "--dest", "d", "--size", "x"], r"argument --size: invalid int value: 'x'"),
    ("no source flag", lambda t: ["--dest", "d"], r"the following arguments are required: --source"),
    ("negative workers", lambda t: ["--source", "s", "--dest", "d", "--workers", "-1"], r"--workers -1 must be >= 0"),
]


def _a_file(tmp_path, name):
    (tmp_path / name).write_text("x")
    return tmp_path / name


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


@pytest.mark.parametrize("flags, expected", [case[1:] for case in PREPARE_ERRORS], ids=[c[0] for c in PREPARE_ERRORS])
def test_each_user_error_is_one_line(tmp_path, flags, expected):
    result = subprocess.run([sys.executable, PREPARE_PATH, *flags(tmp_path)], env=clean_env(PYTHONWARNINGS="ignore"),
                            capture_output=True, text=True, timeout=120, check=False)
    lines = [line for line in result.stderr.splitlines()  # not the progress bar or the skip warnings
             if line.strip() and "img/s" not in line and not line.startswith("warning:")]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert re.fullmatch(r"prepare.py: error: " + expected + r".*", lines[0]), lines[0]
    assert not (tmp_path / "o.zip").exists()
