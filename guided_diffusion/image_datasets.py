"""Image sets: listing, decoding, ADM's centre/random crops, flips, sharding by rank, exact resume
(docs/compatibility.md, "Data loading"), and writing prepared sets (datasets/prepare.py, datasets/build_emoji.py).

A data source is a folder (a local path or a blobfile URL, listed recursively) or a `.zip` of images, read lazily;
`data_dir=""` selects the bundled demo set `datasets/emoji32.zip`. `load_data` returns an `ImageBatches` iterator
whose batches are a pure function of (seed, rank, epoch, batch index): shuffles and random flips/crops come from
generators seeded by those numbers, never from global RNG state, so the stream does not depend on `num_workers` and
`state_dict()` / `load_state_dict()` resume it exactly.

Deliberate differences from the reference loader (which only calls `convert("RGB")`): transparent pixels
(RGBA, LA, palette or tRNS transparency) are composited on white instead of showing their hidden colour, and 16-bit
grayscale is scaled to 8 bits (v / 257) instead of being clipped at 255. Opaque 8-bit images decode identically.
The listing leaves out hidden files and folders and macOS `__MACOSX` folders, which the reference would try to decode.
The FID reference images of a folder or zip (evaluation.py) are listed and decoded by this same code.
"""

import io
import math
import os
import warnings
import weakref
import zipfile

import blobfile as bf
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from . import dist_util, fileio, preemption

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")
DEMO_DATASET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "datasets", "emoji32.zip")
RANDOM_CROP_MIN_FRACTION = 0.8          # random_crop: the crop covers at least 80% of the short side
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
SIXTEEN_BIT_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")   # "I": how some Pillow versions open 16-bit PNGs
_SHUFFLE_STREAM, _AUGMENT_STREAM = 0, 1  # keep the two kinds of seeded generators from ever sharing a seed
MACOS_RESOURCE_FOLDER = "__MACOSX"
# Limits that keep a zip or decompression bomb from taking the memory (per worker) before it is skipped: the bytes
# of one image file (a 1024 px PNG has a few MB; a 1 GB member in a 1 MB zip is refused from its declared size,
# before any decompression) and the pixels an image header may declare (checked before decoding; 50 M pixels is an
# RGB image of 150 MB, 7071 x 7071 px).
MAX_IMAGE_BYTES = 64 * 2**20
MAX_IMAGE_PIXELS = 50_000_000
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)   # earliest time a zip header holds; fixed so written zips are reproducible


def load_data(
    *,
    data_dir,
    batch_size,
    image_size,
    class_cond=False,
    deterministic=False,
    random_crop=False,
    random_flip=True,
    num_workers=1,
    seed=0,
    rank=None,
    world_size=None,
):
    """Endless training batches from a folder or zip of images (ADM's `load_data`; docs/compatibility.md,
    "Data loading").

    :param data_dir: folder (local or blobfile URL) or local `.zip`; "" = the bundled demo set (`DEMO_DATASET`).
    :param batch_size: images per batch on this rank.
    :param image_size: side S of the square crops, in pixels.
    :param class_cond: also yield labels: the file name before the first "_", sorted unique names -> 0..K-1.
    :param deterministic: keep the listing order in every epoch instead of shuffling.
    :param random_crop: ADM's random crop (short side uniform in [S, ceil(S / 0.8)]) instead of the centre crop.
    :param random_flip: flip horizontally with probability 1/2.
    :param num_workers: decoding processes (0 = decode in this process); the batches do not depend on it.
    :param seed: seed of the shuffles, flips and crops (a non-negative int).
    :param rank, world_size: this process's shard; None = `dist_util.rank_and_world_size()`.
    :return: an `ImageBatches` iterator: `next(data)` gives (x, cond), x float32 [N, 3, S, S] in [-1, 1],
        cond {"y": int64 [N]} with class_cond, else {}.
    """
    for name, value, minimum in (("batch_size", batch_size, 1), ("image_size", image_size, 1),
                                 ("num_workers", num_workers, 0), ("seed", seed, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"load_data: {name}={value!r} must be an integer >= {minimum}")
    if rank is None or world_size is None:
        rank, world_size = dist_util.rank_and_world_size()
    if not 0 <= rank < world_size:
        raise ValueError(f"load_data: rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
    source = open_image_source(data_dir)
    num_files = len(source.names)
    if num_files < batch_size * world_size:
        raise ValueError(
            f"data_dir {source.path!r} holds {num_files} images, fewer than one global batch "
            f"(batch_size {batch_size} x {world_size} ranks = {batch_size * world_size}); "
            "add images or lower --batch_size"
        )
    reader = _BatchReader(
        source=source,
        labels=class_labels(source.names) if class_cond else None,
        shard=np.arange(rank, num_files, world_size),
        # Every rank gets the same number of batches per epoch, so one state_dict (e.g. rank 0's) resumes all ranks.
        batches_per_epoch=(num_files // world_size) // batch_size,
        batch_size=batch_size,
        image_size=image_size,
        shuffle=not deterministic,
        random_crop=random_crop,
        random_flip=random_flip,
        seed=seed,
        rank=rank,
    )
    return ImageBatches(reader, num_workers=num_workers)


class ImageBatches:
    """Endless iterator of training batches with an exact-resume state (epoch, batch index).

    Unreadable files are skipped: each is warned about once (`skipped_files` maps its name to the error) and the
    batch is filled with the next readable images of the epoch order, so every batch is full.
    """

    def __init__(self, reader, num_workers):
        self._reader = reader
        self._num_workers = num_workers
        self._iterator = None
        self._stop_workers = lambda: None
        self.epoch = 0
        self.batch_index = 0
        self.skipped_files = {}

    @property
    def batches_per_epoch(self):
        return self._reader.batches_per_epoch

    @property
    def num_skipped(self):
        return len(self.skipped_files)

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = iter(self._loader())
            # Its workers stop when close() is called, this object is collected or the interpreter exits, whichever
            # comes first: at exit multiprocessing would end them with SIGTERM, which they ignore (preemption.py).
            self._stop_workers = weakref.finalize(self, _stop_workers, self._iterator)
        x, y, skipped = next(self._iterator)
        for name, error in skipped:
            if name not in self.skipped_files:
                self.skipped_files[name] = error
                warnings.warn(f"skipping unreadable image {name}: {error}", RuntimeWarning, stacklevel=2)
        if x is None:  # the shard has too few readable images; y holds the reader's message
            self.close()
            raise ValueError(y + ("; see the warnings above for the skipped files" if skipped else ""))
        self.batch_index += 1
        if self.batch_index == self.batches_per_epoch:
            self.epoch, self.batch_index = self.epoch + 1, 0
        return x, ({"y": y} if y is not None else {})

    def state_dict(self):
        """Position of the next batch: {"epoch": int, "batch_index": int}."""
        return {"epoch": self.epoch, "batch_index": self.batch_index}

    def load_state_dict(self, state):
        """Continue from `state_dict()`'s position: the next batch is the one that would have come next."""
        epoch, batch_index = int(state["epoch"]), int(state["batch_index"])
        if epoch < 0 or not 0 <= batch_index < self.batches_per_epoch:
            raise ValueError(
                f"data state {state!r} does not fit this dataset ({self.batches_per_epoch} batches per epoch); "
                "was it saved with another data_dir, batch_size or number of ranks?"
            )
        self.close()
        self.epoch, self.batch_index = epoch, batch_index

    def close(self):
        """Stop the decoding workers now (they restart on the next `next()`), not when the iterator is collected: an
        exception's traceback can keep it alive until the interpreter exits."""
        self._iterator = None
        self._stop_workers()  # a weakref.finalize: runs at most once

    def _loader(self):
        return DataLoader(
            self._reader,
            batch_size=None,
            sampler=_BatchKeys(self.epoch, self.batch_index, self.batches_per_epoch),
            num_workers=self._num_workers,
            collate_fn=_unchanged,
            # The main process decides when to stop on a Ctrl-C or a scheduler's signal, which reach the workers
            # too (the process group); a worker that died of one would end training with a traceback instead.
            worker_init_fn=preemption.ignore_stop_signals,
        )


def _stop_workers(iterator):
    """End the worker processes of a DataLoader iterator (none without workers)."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


class _BatchKeys:
    """(epoch, batch index) from a starting position onwards, forever; DataLoader keeps this order with any workers."""

    def __init__(self, epoch, batch_index, batches_per_epoch):
        self.epoch, self.batch_index, self.batches_per_epoch = epoch, batch_index, batches_per_epoch

    def __iter__(self):
        epoch, batch_index = self.epoch, self.batch_index
        while True:
            yield epoch, batch_index
            batch_index += 1
            if batch_index == self.batches_per_epoch:
                epoch, batch_index = epoch + 1, 0


def _unchanged(batch):
    return batch


class _BatchReader(Dataset):
    """Decodes whole batches, keyed by (epoch, batch index); runs in the DataLoader's worker processes."""

    def __init__(self, *, source, labels, shard, batches_per_epoch, batch_size, image_size, shuffle, random_crop,
                 random_flip, seed, rank):
        self.source = source
        self.labels = labels
        self.shard = shard                      # global file indices of this rank, files[rank::world_size]
        self.batches_per_epoch = batches_per_epoch
        self.batch_size = batch_size
        self.image_size = image_size
        self.shuffle = shuffle
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.seed = seed
        self.rank = rank
        self._order_epoch, self._order = None, None

    def epoch_order(self, epoch):
        """Global file indices of this shard in the order epoch `epoch` visits them."""
        if self._order_epoch != epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, _SHUFFLE_STREAM, self.rank, epoch])
                self._order = self.shard[rng.permutation(len(self.shard))]
            else:
                self._order = self.shard
            self._order_epoch = epoch
        return self._order

    def __getitem__(self, key):
        """(epoch, batch index) -> (x float32 [N, 3, S, S] in [-1, 1], y int64 [N] or None, [(name, error)]); x None
        and y a message when the shard has fewer than N readable images."""
        epoch, batch_index = key
        order = self.epoch_order(epoch)
        images, indices, skipped = [], [], []
        start = batch_index * self.batch_size
        for offset in range(len(order)):
            if len(images) == self.batch_size:
                break
            file_index = int(order[(start + offset) % len(order)])
            name = self.source.names[file_index]
            try:
                image = decode_image(self.source.read(name))
            except UnreadableImageError as e:
                skipped.append((name, str(e)))
                continue
            images.append(self._augment(image, epoch, file_index))
            indices.append(file_index)
        if len(images) < self.batch_size:  # raised by ImageBatches in the main process, after its warnings
            return None, (f"only {len(images)} of the {len(order)} images of this rank's shard of "
                          f"{self.source.path!r} are readable, fewer than batch_size {self.batch_size}"), skipped
        x = torch.from_numpy(np.stack(images).astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2).contiguous()
        y = torch.from_numpy(self.labels[indices]) if self.labels is not None else None
        return x, y, skipped

    def _augment(self, image, epoch, file_index):
        """RGB PIL image -> uint8 [S, S, 3]: crop, then flip; the random draws depend on (seed, epoch, file)."""
        rng = np.random.default_rng([self.seed, _AUGMENT_STREAM, epoch, file_index])
        if self.random_crop:
            pixels = random_crop_arr(image, self.image_size, rng)
        else:
            pixels = center_crop_arr(image, self.image_size)
        if self.random_flip and rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        return pixels


# ----------------------------------------------------------------------------------------------------------------
# Sources


def open_image_source(data_dir, name="data_dir"):
    """A folder or `.zip` of images -> a source with `.path`, `.names` (sorted recursive listing) and `.read(name)`.

    :param name: how errors name the path (the flag it came from, e.g. "--source").
    """
    path = data_dir or DEMO_DATASET
    if not data_dir and not os.path.isfile(DEMO_DATASET):
        raise FileNotFoundError(
            f"the bundled demo dataset {DEMO_DATASET!r} is missing; rebuild it with datasets/build_emoji.py "
            "or pass --data_dir"
        )
    if not bf.exists(path):
        raise FileNotFoundError(f"{name} {path!r} does not exist")
    if bf.isdir(path):
        source = FolderSource(path)
    elif path.lower().endswith(".zip"):
        source = ZipSource(path, name)
    else:
        raise ValueError(f"{name} {path!r} is a file but not a .zip; pass a folder or a .zip of images")
    if not source.names:
        raise ValueError(
            f"{name} {path!r} holds no images (searched recursively for extensions {', '.join(IMAGE_EXTENSIONS)})"
        )
    return source


def has_image_extension(name):
    return "." in name and name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def is_listed_entry(entry):
    """Whether a folder or file name is looked into at all: hidden entries (".DS_Store", macOS "._x.png"
    companions) and macOS resource-fork folders (`__MACOSX`) hold no images and are left out."""
    return not entry.startswith(".") and entry != MACOS_RESOURCE_FOLDER


class FolderSource:
    """Images under a folder (local path or blobfile URL); names are full paths in recursive sorted order.

    Listed: regular files with an image extension (IMAGE_EXTENSIONS), outside hidden and `__MACOSX` folders.
    """

    def __init__(self, path):
        self.path = path
        self.names = self._list(path)

    def _list(self, folder, ancestors=()):
        """Image paths under `folder`; `ancestors`: the real paths of the folders above it (local folders only).

        :raises ValueError: at a symbolic link to a folder that contains it (the listing would never end).
        """
        if "://" not in folder:
            real = os.path.realpath(folder)
            if real in ancestors:
                raise ValueError(f"{folder} is a symbolic link to {real}, a folder that contains it, so the data dir "
                                 "never ends; remove the link or choose another --data_dir")
            ancestors = (*ancestors, real)
        names = []
        for entry in sorted(bf.listdir(folder)):
            if not is_listed_entry(entry):
                continue
            full_path = bf.join(folder, entry)
            if bf.isdir(full_path):
                names.extend(self._list(full_path, ancestors))
            elif has_image_extension(entry) and _is_regular_file(full_path):
                names.append(full_path)
        return names

    def read(self, name):
        with bf.BlobFile(name, "rb") as f:
            return read_capped(f)


class ZipSource:
    """Images inside a zip, in the order a folder holding the same tree would list them.

    The archive is opened lazily once per process, so forked DataLoader workers never share a file offset.
    Listed as `FolderSource` lists: members with an image extension, no path component hidden or `__MACOSX`.
    """

    def __init__(self, path, name="data_dir"):
        """:param name: how errors name the path (see open_image_source)."""
        self.path = path
        self._archive, self._archive_pid = None, None
        if not _is_regular_file(path):  # opening a FIFO named *.zip would wait for a writer for ever
            raise ValueError(f"{path!r} is not a regular file (a FIFO, socket or device): pass a folder or a .zip file")
        try:
            with zipfile.ZipFile(path) as archive:
                members = archive.namelist()
        except zipfile.BadZipFile as e:
            raise ValueError(f"{name} {path!r} is not a readable zip file ({e})") from None
        images = [
            m for m in members
            if not m.endswith("/") and has_image_extension(m) and all(map(is_listed_entry, m.split("/")))
        ]
        # Sorting by path components equals listing each directory sorted and descending in place.
        self.names = sorted(images, key=lambda m: m.split("/"))

    def read(self, name):
        if self._archive_pid != os.getpid():
            self._archive, self._archive_pid = zipfile.ZipFile(self.path), os.getpid()
        declared = self._archive.getinfo(name).file_size
        if declared > MAX_IMAGE_BYTES:
            raise UnreadableImageError(_too_large(f"it declares {declared} bytes, more"))
        with self._archive.open(name) as f:
            return read_capped(f)

    def __getstate__(self):
        return {**self.__dict__, "_archive": None, "_archive_pid": None}


def _is_regular_file(path):
    # A FIFO, socket or dangling link with an image name is no image (and reading a FIFO would block).
    return "://" in path or os.path.isfile(path)


def class_labels(names):
    """File names -> int64 labels: the base name before the first "_", sorted unique -> 0..K-1 (ADM)."""
    classes = [name.rstrip("/").rsplit("/", 1)[-1].split("_")[0] for name in names]
    index = {c: i for i, c in enumerate(sorted(set(classes)))}
    return np.array([index[c] for c in classes], dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------------
# Decoding and cropping


class UnreadableImageError(ValueError):
    """A file with an image extension that Pillow cannot decode (corrupt, truncated or not an image)."""


def read_capped(file):
    """The bytes of an open image file, reading at most MAX_IMAGE_BYTES + 1 of them (a zip member may lie about
    its size); UnreadableImageError when there are more."""
    data = file.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise UnreadableImageError(_too_large("it holds more bytes"))
    return data


def _too_large(what):
    return (f"{what} than the {MAX_IMAGE_BYTES} an image file may have here (image_datasets.MAX_IMAGE_BYTES): "
            "a zip bomb, or not an image")


def decode_image(data):
    """Encoded bytes -> RGB PIL image (see `to_rgb`); raises UnreadableImageError for anything undecodable, and for
    a header declaring more than MAX_IMAGE_PIXELS pixels (before decoding them)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise UnreadableImageError(
                    f"its header declares {width} x {height} pixels, more than the {MAX_IMAGE_PIXELS} an image may "
                    "have here (image_datasets.MAX_IMAGE_PIXELS): a decompression bomb?")
            image.load()
            return to_rgb(image)
    except Image.UnidentifiedImageError:
        raise UnreadableImageError("not in an image format Pillow recognises") from None
    except UnreadableImageError:
        raise
    # Decoders of damaged files fail with many exception types (OSError, SyntaxError, struct.error, ...);
    # all of them mean the same thing here: this file cannot be used.
    except Exception as e:
        raise UnreadableImageError(f"{type(e).__name__}: {e}") from e


def to_rgb(image):
    """PIL image of any mode -> RGB: 16-bit gray scaled to 8 bits, transparent pixels composited on white."""
    if image.mode in SIXTEEN_BIT_GRAY_MODES:
        values = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8))  # 2-D uint8: mode L
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        image = white
    return image.convert("RGB")


def resize_short_side(image, short_side):
    """ADM's resize: halve with BOX while min(W, H) >= 2 * short_side, then BICUBIC by short_side / min(W, H).

    Each side is rounded with round() (half to even), so the short side becomes short_side.
    """
    while min(image.size) >= 2 * short_side:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = short_side / min(image.size)
    return image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)


def center_crop_arr(image, image_size):
    """RGB PIL image -> uint8 [S, S, 3]: `resize_short_side` to S, then the crop at ((H'-S)//2, (W'-S)//2)."""
    pixels = np.asarray(resize_short_side(image, image_size))
    top = (pixels.shape[0] - image_size) // 2
    left = (pixels.shape[1] - image_size) // 2
    return pixels[top : top + image_size, left : left + image_size]


def random_crop_arr(image, image_size, rng):
    """RGB PIL image -> uint8 [S, S, 3]: short side s ~ U{S..ceil(S/0.8)}, `resize_short_side` to s, a random crop.

    :param rng: numpy Generator supplying s and the crop's top-left corner.
    """
    short_side = int(rng.integers(image_size, math.ceil(image_size / RANDOM_CROP_MIN_FRACTION) + 1))
    pixels = np.asarray(resize_short_side(image, short_side))
    top = int(rng.integers(0, pixels.shape[0] - image_size + 1))
    left = int(rng.integers(0, pixels.shape[1] - image_size + 1))
    return pixels[top : top + image_size, left : left + image_size]


# ----------------------------------------------------------------------------------------------------------------
# Writing


def encode_png(image):
    """PIL image -> PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def safe_relative_name(name):
    """`name` (an archive member's or a relative file path) as a relative path that stays inside any folder it is
    joined to: "/" and "\\" both separate, and empty, ".", ".." and drive ("C:") components are dropped.

    "../../x.png" -> "x.png", "/abs/x.png" -> "abs/x.png", "a/../../x.png" -> "a/x.png", "..\\x.png" -> "x.png".
    """
    parts = name.replace("\\", "/").split("/")
    kept = [part for part in parts if part not in ("", ".", "..") and not (len(part) == 2 and part[1] == ":")]
    return "/".join(kept)


class ImageSetWriter:
    """Context manager writing named files into a folder, or into a `.zip` when `dest` ends with ".zip".

    Every file, and a zip as a whole, is written atomically (fileio.atomic_open): a zip appears only when the block
    ends without an error. Zip members are stored (PNG is compressed already) with fixed timestamps and
    permissions, so the same inputs added in the same order give the same bytes.
    """

    def __init__(self, dest):
        self.dest = dest
        self.is_zip = dest.lower().endswith(".zip")
        self._archive, self._zip_file = None, None

    def __enter__(self):
        if self.is_zip:
            self._zip_file = fileio.atomic_open(self.dest)
            self._archive = zipfile.ZipFile(self._zip_file.__enter__(), "w", compression=zipfile.ZIP_STORED)
        else:
            os.makedirs(self.dest, exist_ok=True)
        return self

    def add(self, name, data):
        """Store bytes `data` as `name` (a relative path with "/" separators, as safe_relative_name makes them).

        :raises ValueError: for a name that could land outside `dest` ("..", an absolute path, a drive, a backslash).
        """
        if name != safe_relative_name(name):
            raise ValueError(f"{name!r} is not a plain relative path inside {self.dest!r}")
        if self.is_zip:
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
            info.create_system = 3              # Unix, so the permission bits below mean what they say
            info.external_attr = 0o644 << 16
            self._archive.writestr(info, data)
            return
        path = os.path.join(self.dest, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fileio.write_bytes(path, data)

    def __exit__(self, exc_type, exc, traceback):
        if self.is_zip:
            self._archive.close()
            self._zip_file.__exit__(exc_type, exc, traceback)
