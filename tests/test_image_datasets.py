"""Tests of guided_diffusion/image_datasets.py: ADM crops, listing, labels, sharding, sources, resume, bad input."""

import io
import math
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from launchers import clean_env
from PIL import Image

from guided_diffusion import dist_util, image_datasets
from guided_diffusion.image_datasets import center_crop_arr, load_data, random_crop_arr


def _save(path, pixels, mode=None):
    """Write pixels (whose dtype and shape select the PIL mode) and check the mode is the one intended."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(pixels)
    assert mode is None or image.mode == mode
    image.save(path)


def _noise_images(root, names, size=(20, 14), seed=0):
    """Write random RGB PNGs under root; returns their arrays by name."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name in names:
        arrays[name] = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        _save(os.path.join(root, name), arrays[name])
    return arrays


def _zip_folder(folder, zip_path):
    with zipfile.ZipFile(zip_path, "w") as archive:
        for dirpath, _, files in sorted(os.walk(folder)):
            for f in sorted(files):
                full = os.path.join(dirpath, f)
                archive.write(full, os.path.relpath(full, folder))


def _batches(data, count):
    return [next(data) for _ in range(count)]


def _assert_same_batches(batches_a, batches_b):
    for (xa, ca), (xb, cb) in zip(batches_a, batches_b):
        assert torch.equal(xa, xb)
        assert ca.keys() == cb.keys()
        for key in ca:
            assert torch.equal(ca[key], cb[key])


# ---------------------------------------------------------------------------------------------------------------
# Crops


def _documented_center_crop(image, size):
    """The algorithm of docs/compatibility.md, "Data loading", written out step by step, independently of the
    library."""
    width, height = image.size
    while min(width, height) >= 2 * size:
        width, height = width // 2, height // 2
        image = image.resize((width, height), Image.BOX)
    factor = size / min(width, height)
    width, height = round(width * factor), round(height * factor)
    pixels = np.array(image.resize((width, height), Image.BICUBIC))
    top, left = (height - size) // 2, (width - size) // 2
    return pixels[top:top + size, left:left + size], (width, height)


@pytest.mark.parametrize(
    "source_size, size, resized_size",
    [
        ((1000, 600), 64, (107, 64)),    # halved 3x to 125x75, then bicubic to 107x64
        ((300, 170), 32, (57, 32)),      # halved twice to 75x42
        ((170, 300), 32, (32, 57)),      # portrait
        ((2048, 1131), 256, (465, 256)),  # large: halved twice to 512x282
        ((40, 25), 32, (51, 32)),        # upscaled, no halving
    ],
)
def test_center_crop_equals_documented_algorithm(source_size, size, resized_size):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (source_size[1], source_size[0], 3), dtype=np.uint8))
    expected, resized = _documented_center_crop(image, size)
    assert resized == resized_size
    got = center_crop_arr(image, size)
    assert got.shape == (size, size, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)


def test_random_crop_short_side_and_window_in_documented_range(monkeypatch):
    size = 16
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    seen = []
    resize = image_datasets.resize_short_side

    def recording_resize(img, short_side):
        seen.append(short_side)
        return resize(img, short_side)

    monkeypatch.setattr(image_datasets, "resize_short_side", recording_resize)
    for seed in range(200):
        crop = random_crop_arr(image, size, np.random.default_rng(seed))
        assert crop.shape == (size, size, 3)
        resized = np.asarray(resize(image, seen[-1]))
        windows = {
            (top, left)
            for top in range(resized.shape[0] - size + 1)
            for left in range(resized.shape[1] - size + 1)
            if np.array_equal(resized[top:top + size, left:left + size], crop)
        }
        assert windows, "the crop must be a window of the image resized to the drawn short side"
    assert set(seen) == set(range(size, math.ceil(size / 0.8) + 1))  # 16..20, both ends reached


# ---------------------------------------------------------------------------------------------------------------
# Listing, labels, sources


def test_listing_is_recursive_sorted_and_filters_extensions(tmp_path):
    for name in ["b_2.png", "a_1.JPG", "sub/c_1.jpeg", "sub/deeper/a_9.Gif", "notes.txt", "z/readme", "a.png.bak"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.lower().endswith((".png", ".jpg", ".jpeg", ".gif")):
            Image.new("RGB", (4, 4)).save(path, format="PNG")
        else:
            path.write_text("x")
    source = image_datasets.open_image_source(str(tmp_path))
    rel = [os.path.relpath(n, tmp_path) for n in source.names]
    assert rel == ["a_1.JPG", "b_2.png", "sub/c_1.jpeg", "sub/deeper/a_9.Gif"]
    np.testing.assert_array_equal(image_datasets.class_labels(source.names), [0, 1, 2, 0])


def test_class_labels_come_from_prefix(tmp_path):
    _noise_images(tmp_path, ["dog_1.png", "cat_1.png", "cat_2.png", "dog_2.png"])
    data = load_data(data_dir=str(tmp_path), batch_size=4, image_size=8, class_cond=True, deterministic=True,
                     num_workers=0, rank=0, world_size=1)
    x, cond = next(data)
    assert cond["y"].dtype == torch.int64
    assert cond["y"].tolist() == [0, 0, 1, 1]  # listing order cat_1, cat_2, dog_1, dog_2
    assert x.dtype == torch.float32 and x.shape == (4, 3, 8, 8)
    assert x.min() >= -1 and x.max() <= 1


def test_unconditional_batches_have_empty_cond(tmp_path):
    _noise_images(tmp_path, [f"img_{i}.png" for i in range(4)])
    _, cond = next(load_data(data_dir=str(tmp_path), batch_size=2, image_size=8, num_workers=0, rank=0,
                             world_size=1))
    assert cond == {}


def test_zip_and_folder_give_same_batches(tmp_path):
    folder = tmp_path / "images"
    names = [f"{cls}_{i}.png" for cls in ("a", "b") for i in range(3)] + ["sub/c_0.png", "sub/deep/a_9.png"]
    _noise_images(folder, names)
    _zip_folder(folder, tmp_path / "images.zip")
    for deterministic in (True, False):
        kwargs = dict(batch_size=3, image_size=8, class_cond=True, deterministic=deterministic, num_workers=0,
                      rank=0, world_size=1)
        from_folder = _batches(load_data(data_dir=str(folder), **kwargs), 6)
        from_zip = _batches(load_data(data_dir=str(tmp_path / "images.zip"), **kwargs), 6)
        _assert_same_batches(from_folder, from_zip)


def test_zip_ignores_directories_and_macos_entries(tmp_path):
    zip_path = tmp_path / "set.zip"
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buffer, format="PNG")
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("b/", b"")
        archive.writestr("b/x_1.png", buffer.getvalue())
        archive.writestr("a_0.png", buffer.getvalue())
        archive.writestr("__MACOSX/b/._x_1.png", b"resource fork")
    assert image_datasets.open_image_source(str(zip_path)).names == ["a_0.png", "b/x_1.png"]


def test_bundled_demo_dataset_loads_at_32px():
    assert os.path.isfile(image_datasets.DEMO_DATASET)
    source = image_datasets.open_image_source("")
    assert len(source.names) == 2031
    assert all(os.path.basename(n).startswith("emoji_u") for n in source.names)
    data = load_data(data_dir="", batch_size=16, image_size=32, num_workers=0, rank=0, world_size=1)
    x, cond = next(data)
    assert x.shape == (16, 3, 32, 32) and cond == {}
    assert -1 <= x.min() < 0 and x.max() == 1   # white background, coloured glyphs
    assert x.std() > 0.2


# ---------------------------------------------------------------------------------------------------------------
# Sharding, determinism, resume


def _colour_coded_images(root, count):
    """Image i is a flat colour whose red channel is 10 * i, so a decoded pixel names its file."""
    for i in range(count):
        _save(os.path.join(root, f"img_{i:02d}.png"), np.full((6, 9, 3), (10 * i, 7, 200), dtype=np.uint8))


def _file_ids(x):
    return [round((v + 1) * 127.5 / 10) for v in x[:, 0, 0, 0].tolist()]


def test_two_shards_are_disjoint_and_cover_the_dataset(tmp_path):
    _colour_coded_images(tmp_path, 12)
    seen = {}
    for rank in (0, 1):
        data = load_data(data_dir=str(tmp_path), batch_size=3, image_size=4, num_workers=0, rank=rank,
                         world_size=2)
        assert data.batches_per_epoch == 2
        seen[rank] = [i for x, _ in _batches(data, 2) for i in _file_ids(x)]
        assert sorted(seen[rank]) == list(range(rank, 12, 2))  # files[rank::world]
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(12))


def test_rank_and_world_size_come_from_dist_util(tmp_path, monkeypatch):
    _colour_coded_images(tmp_path, 8)
    monkeypatch.setattr(dist_util, "rank_and_world_size", lambda: (1, 2))
    data = load_data(data_dir=str(tmp_path), batch_size=4, image_size=4, num_workers=0)
    assert sorted(_file_ids(next(data)[0])) == [1, 3, 5, 7]


def test_epochs_reshuffle_and_deterministic_mode_keeps_order(tmp_path):
    _colour_coded_images(tmp_path, 8)
    shuffled = load_data(data_dir=str(tmp_path), batch_size=8, image_size=4, num_workers=0, rank=0, world_size=1)
    orders = [_file_ids(next(shuffled)[0]) for _ in range(3)]
    assert all(sorted(o) == list(range(8)) for o in orders)
    assert len({tuple(o) for o in orders}) == 3
    ordered = load_data(data_dir=str(tmp_path), batch_size=4, image_size=4, deterministic=True, num_workers=0,
                        rank=0, world_size=1)
    assert [_file_ids(next(ordered)[0]) for _ in range(4)] == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2


def test_same_batches_for_any_num_workers_and_exact_resume(tmp_path):
    _noise_images(tmp_path, [f"{c}_{i}.png" for c in "ab" for i in range(5)], size=(13, 9))
    kwargs = dict(data_dir=str(tmp_path), batch_size=3, image_size=8, class_cond=True, random_crop=True, seed=5,
                  rank=0, world_size=1)
    reference = _batches(load_data(num_workers=0, **kwargs), 8)  # 3 batches per epoch: crosses two epochs
    _assert_same_batches(reference, _batches(load_data(num_workers=2, **kwargs), 8))

    first = load_data(num_workers=2, **kwargs)
    _batches(first, 5)
    state = first.state_dict()
    assert state == {"epoch": 1, "batch_index": 2}
    resumed = load_data(num_workers=0, **kwargs)
    resumed.load_state_dict(state)
    _assert_same_batches(reference[5:], _batches(resumed, 3))


def test_flips_are_seeded_and_about_half(tmp_path):
    asymmetric = np.zeros((8, 8, 3), dtype=np.uint8)
    asymmetric[:, :4] = 255
    for i in range(64):
        _save(str(tmp_path / f"img_{i:02d}.png"), asymmetric)
    data = load_data(data_dir=str(tmp_path), batch_size=64, image_size=8, num_workers=0, rank=0, world_size=1)
    flipped = (next(data)[0][:, 0, 0, 0] < 0).sum().item()  # left column black after a flip
    assert 16 < flipped < 48
    plain = load_data(data_dir=str(tmp_path), batch_size=64, image_size=8, random_flip=False, num_workers=0,
                      rank=0, world_size=1)
    assert (next(plain)[0][:, 0, 0, 0] == 1).all()


def test_load_state_dict_rejects_a_foreign_state(tmp_path):
    _colour_coded_images(tmp_path, 4)
    data = load_data(data_dir=str(tmp_path), batch_size=2, image_size=4, num_workers=0, rank=0, world_size=1)
    with pytest.raises(ValueError, match="2 batches per epoch"):
        data.load_state_dict({"epoch": 0, "batch_index": 7})


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_missing_and_empty_data_dir_name_the_path(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_data(data_dir=missing, batch_size=1, image_size=8)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"{empty}.*holds no images"):
        load_data(data_dir=str(empty), batch_size=1, image_size=8)
    not_a_zip = tmp_path / "data.tar"
    not_a_zip.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .zip"):
        load_data(data_dir=str(not_a_zip), batch_size=1, image_size=8)
    broken_zip = tmp_path / "data.zip"
    broken_zip.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="not a readable zip"):
        load_data(data_dir=str(broken_zip), batch_size=1, image_size=8)


def test_fewer_images_than_a_global_batch_is_an_error(tmp_path):
    _colour_coded_images(tmp_path, 6)
    with pytest.raises(ValueError, match=r"6 images, fewer than one global batch \(batch_size 4 x 2 ranks = 8\)"):
        load_data(data_dir=str(tmp_path), batch_size=4, image_size=4, rank=0, world_size=2)


@pytest.mark.parametrize("flag, value", [("batch_size", 0), ("image_size", -32), ("image_size", 32.0),
                                         ("num_workers", -1), ("seed", -1)])
def test_bad_arguments_fail_before_reading_data(flag, value):
    kwargs = dict(data_dir="/this/path/is/never/read", batch_size=2, image_size=8)
    kwargs[flag] = value
    with pytest.raises(ValueError, match=flag):
        load_data(**kwargs)


def test_corrupt_files_are_skipped_with_one_warning_and_full_batches(tmp_path):
    _colour_coded_images(tmp_path, 6)
    good = (tmp_path / "img_00.png").read_bytes()
    (tmp_path / "img_02.png").write_bytes(good[: len(good) // 2])     # truncated PNG
    (tmp_path / "img_04.jpg").write_bytes(b"this is not a JPEG")      # not an image
    data = load_data(data_dir=str(tmp_path), batch_size=3, image_size=4, deterministic=True, num_workers=0,
                     rank=0, world_size=1)
    # Listing: img_00, img_01, img_02 (bad), img_03, img_04.jpg (bad), img_04.png, img_05 -> 7 files, 2 batches.
    with pytest.warns(RuntimeWarning) as caught:
        batches = _batches(data, 4)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert any("img_02.png" in m for m in messages) and any("img_04.jpg" in m for m in messages)
    assert data.num_skipped == 2 and set(data.skipped_files) == {str(tmp_path / "img_02.png"),
                                                                 str(tmp_path / "img_04.jpg")}
    ids = [_file_ids(x) for x, _ in batches]
    # A bad file's slot takes the next readable file of the epoch order (here the first file of the next batch).
    assert ids[:2] == [[0, 1, 3], [3, 4, 5]]
    assert ids[2:] == ids[:2]


def test_unreadable_shard_is_a_clear_error(tmp_path):
    for i in range(3):
        (tmp_path / f"img_{i}.png").write_bytes(b"garbage")
    for workers in (0, 1):
        data = load_data(data_dir=str(tmp_path), batch_size=2, image_size=4, num_workers=workers, rank=0,
                         world_size=1)
        with pytest.warns(RuntimeWarning, match="skipping unreadable image"), \
                pytest.raises(ValueError, match="^only 0 of the 3 images .* are readable, fewer than batch_size 2; "
                                                "see the warnings above for the skipped files$"):
            next(data)
        assert data._iterator is None  # the worker was stopped


def _decode_file(path):
    return np.asarray(image_datasets.decode_image(open(path, "rb").read()))


def test_grayscale_palette_alpha_and_16_bit_are_converted(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    _save(str(tmp_path / "gray.png"), gray, "L")
    np.testing.assert_array_equal(_decode_file(tmp_path / "gray.png"), np.repeat(gray[..., None], 3, axis=2))

    sixteen = np.array([[0, 257, 32896, 65535], [1000, 30000, 65534, 128]], dtype=np.uint16)
    _save(str(tmp_path / "deep.png"), sixteen, "I;16")
    with Image.open(tmp_path / "deep.png") as check:
        assert check.mode.startswith("I")
    decoded = _decode_file(tmp_path / "deep.png")
    np.testing.assert_array_equal(decoded[..., 0], [[0, 1, 128, 255], [4, 117, 255, 0]])
    assert (decoded == decoded[..., :1]).all()

    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 10, 10, 255)   # opaque red
    rgba[0, 1] = (0, 0, 0, 0)         # fully transparent black -> white
    rgba[1, 0] = (0, 0, 0, 128)       # half-transparent black -> mid grey
    rgba[1, 1] = (0, 0, 255, 255)
    _save(str(tmp_path / "alpha.png"), rgba, "RGBA")
    decoded = _decode_file(tmp_path / "alpha.png").astype(int)
    np.testing.assert_array_equal(decoded[0, 0], (200, 10, 10))
    np.testing.assert_array_equal(decoded[0, 1], (255, 255, 255))
    assert np.abs(decoded[1, 0] - 127).max() <= 1
    np.testing.assert_array_equal(decoded[1, 1], (0, 0, 255))

    _save(str(tmp_path / "la.png"), np.array([[[50, 255], [50, 0]]], dtype=np.uint8), "LA")
    np.testing.assert_array_equal(_decode_file(tmp_path / "la.png")[0], [[50, 50, 50], [255, 255, 255]])

    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 220, 30] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    for fmt, args in (("png", {"transparency": 0}), ("gif", {"transparency": 0}), ("png", {})):
        path = tmp_path / f"palette_{len(args)}.{fmt}"
        palette.save(path, **args)
        background = (255, 255, 255) if args else (0, 0, 0)
        np.testing.assert_array_equal(_decode_file(path)[0], [background, (10, 220, 30)])


def test_demo_dataset_missing_explains_how_to_rebuild(monkeypatch, tmp_path):
    monkeypatch.setattr(image_datasets, "DEMO_DATASET", str(tmp_path / "emoji32.zip"))
    with pytest.raises(FileNotFoundError, match="build_emoji.py"):
        load_data(data_dir="", batch_size=1, image_size=32)


BROKEN_WORKER = """
import sys
from guided_diffusion import image_datasets
data = image_datasets.load_data(data_dir=sys.argv[1], batch_size=2, image_size=8, num_workers=1)
def unreadable_disk(name):
    raise RuntimeError("the disk went away")
data._reader.source.read = unreadable_disk  # in the worker too: it is forked after this
try:
    next(data)
finally:
    data.close()  # as image_train.py does on any error
"""


def test_a_bug_in_a_decoding_worker_ends_the_process_instead_of_waiting_for_the_worker(tmp_path):
    """The worker ignores SIGTERM (preemption.py), so an exit that left it running would wait for it for ever."""
    for i in range(4):
        _save(str(tmp_path / f"img_{i}.png"), np.zeros((8, 8, 3), dtype=np.uint8))
    result = subprocess.run([sys.executable, "-c", BROKEN_WORKER, str(tmp_path)], env=clean_env(),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and "the disk went away" in result.stderr, result.stderr[-3000:]


def test_a_symbolic_link_loop_in_the_data_dir_is_named(tmp_path):
    for i in range(2):
        _save(str(tmp_path / "sub" / f"img_{i}.png"), np.zeros((8, 8, 3), dtype=np.uint8))
    os.symlink(tmp_path, tmp_path / "sub" / "up")
    os.symlink(tmp_path / "sub", tmp_path / "beside")  # a link to a folder that is not above it is followed
    # Listed in sorted order: the loop is met first through "beside", the link to sub.
    with pytest.raises(ValueError, match=f"^{tmp_path / 'beside' / 'up'} is a symbolic link to {tmp_path}, a folder "
                                         "that contains it"):
        load_data(data_dir=str(tmp_path), batch_size=1, image_size=8)
    os.remove(tmp_path / "sub" / "up")
    assert len(image_datasets.FolderSource(str(tmp_path)).names) == 4


def test_a_fifo_with_an_image_name_is_not_listed(tmp_path):
    """Reading a FIFO blocks until a writer comes: listed, it would stop training for ever."""
    _save(str(tmp_path / "img_0.png"), np.zeros((8, 8, 3), dtype=np.uint8))
    os.mkfifo(tmp_path / "img_1.png")
    assert image_datasets.FolderSource(str(tmp_path)).names == [str(tmp_path / "img_0.png")]


LEFT_OPEN = """
import sys
from guided_diffusion import image_datasets
data = image_datasets.load_data(data_dir=sys.argv[1], batch_size=2, image_size=8, num_workers=1)
next(data)  # and exit without close(), as a short user script does
"""


def test_a_script_that_never_closes_its_data_still_exits(tmp_path):
    for i in range(4):
        _save(str(tmp_path / f"img_{i}.png"), np.zeros((8, 8, 3), dtype=np.uint8))
    result = subprocess.run([sys.executable, "-c", LEFT_OPEN, str(tmp_path)], env=clean_env(), capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
