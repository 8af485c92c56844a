"""FID and KID as clean-fid computes them (docs/compatibility.md, "Evaluation"), for the inputs this project produces.

Images come from a sample npz (`arr_0`, uint8 [N, H, W, 3], the ADM/P2 format), a folder or zip of image files, or
an in-memory uint8 array [N, H, W, 3]. A folder or zip is listed and decoded by the training data loader's code
(image_datasets.open_image_source, decode_image), so FID against --data_dir scores the images training sees; an
unreadable image is skipped with a warning that counts them, and the results count them again at every evaluation,
also from the cache (num_reference_unreadable). All images then go through clean-fid's own
preprocessing (`ResizeDataset`, `build_resizer(mode)`) and `get_batch_features`; the distances are clean-fid's
`frechet_distance` and `kernel_distance`. The feature network comes from inception.load_feature_network.

Reference statistics file (written to the cache, and accepted back as a reference), an npz holding:
  mu                      [D]     mean of the features (dtype of the features, as clean-fid computes it)
  sigma                   [D, D]  float64 covariance of the features (np.cov, rowvar=False)
  features                [N, D]  float32 features of every reference image (KID needs them)
  num_images              N
  mode, feature_network, feature_network_sha256   how the features were made; checked when the file is read
  source, source_sha256   the reference images it was computed from, and the hash of their content
  format, format_version  "p2-diffusion-feature-statistics", 2 (version 1 listed and decoded folders as clean-fid)
An npz with only mu and sigma (clean-fid's custom statistics) is accepted for FID. Every statistics file and feature
array is checked before any distance is computed (`check_statistics`): real numbers, all finite, shapes [D], [D, D]
and [N, D]. A NaN would otherwise send scipy's sqrtm on a search of minutes for a meaningless FID. An npz is read
without pickles; a damaged one, or one holding object arrays, is an EvaluationError naming it.

Statistics of reference images are cached under a key made of the SHA-256 of their bytes, the mode, the SHA-256
of the network file and the format version, so a second run reuses them and any change to the images recomputes
them. KID subsets are drawn with a fixed seed, so a run is reproducible. Training-time evaluation loads the network
once and calls `evaluate(uint8 array [N, H, W, 3], reference, network)`.
"""

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import os
import re
import warnings
import zipfile
import zlib

import cleanfid
import numpy as np
import torch
from cleanfid import features as cleanfid_features
from cleanfid import fid as cleanfid_fid
from cleanfid.utils import ResizeDataset
from tqdm import tqdm

from .fileio import atomic_write, check_output_dir, file_sha256, write_json
from .image_datasets import UnreadableImageError, decode_image, open_image_source
from .inception import EvaluationError, download_timeout

METRICS = ("fid", "kid")
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "p2-diffusion", "eval")
KID_NUM_SUBSETS = 100  # clean-fid's kernel_distance defaults
KID_MAX_SUBSET_SIZE = 1000
KID_SEED = 0  # kernel_distance draws its subsets from numpy's global generator
STATS_FORMAT = "p2-diffusion-feature-statistics"
STATS_FORMAT_VERSION = 2
NAMED_STATISTICS = re.compile(r"^([^:/\\]+):([^:/\\]+):([^:/\\]+)$")  # clean-fid's "name:res:split"
_PYTHON_OBJECTS = "it holds Python objects, which are never unpickled; store numeric arrays"
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def check_metrics(metrics):
    """A tuple of metric names from a sequence or a comma-separated string like "fid,kid"."""
    if isinstance(metrics, str):
        metrics = [name.strip() for name in metrics.split(",") if name.strip()]
    unknown = [name for name in metrics if name not in METRICS]
    if unknown or not metrics:
        raise EvaluationError(f"metrics {metrics!r}: choose one or more of {', '.join(METRICS)}, e.g. fid,kid")
    return tuple(dict.fromkeys(metrics))


# ---------------------------------------------------------------------------------------------------------------
# Image sources and their features


def source_kind(source):
    """What a samples/reference argument is: "array", "folder", "zip", "npz_images", "npz_statistics" or "named"
    (clean-fid statistics "name:res:split", e.g. "ffhq:256:trainval70k")."""
    if isinstance(source, np.ndarray):
        return "array"
    source = os.fspath(source)
    if os.path.isdir(source):
        return "folder"
    if os.path.isfile(source):
        extension = os.path.splitext(source)[1].lower()
        if extension == ".zip":
            return "zip"
        if extension == ".npz":
            return _npz_kind(source)
        raise EvaluationError(f"{source}: expected a folder of images, a .zip of images or an .npz file")
    if NAMED_STATISTICS.match(source):
        return "named"
    raise EvaluationError(f"{source}: no such file or folder (nor clean-fid statistics like ffhq:256:trainval70k)")


def _npz_kind(path):
    with open_npz(path) as data:
        keys = data.files
    # An ADM reference batch holds arr_0 and TensorFlow-evaluator mu/sigma: its images are what clean-fid can use.
    if "arr_0" in keys:
        return "npz_images"
    if "mu" in keys and "sigma" in keys:
        return "npz_statistics"
    raise EvaluationError(
        f"{path} holds {keys}: expected images under arr_0 (uint8 [N, H, W, 3], as image_sample.py writes) or "
        "statistics mu and sigma (as evaluate.py caches them)"
    )


def load_npz_images(path):
    """arr_0 of a sample npz: uint8 [N, H, W, 3]."""
    with open_npz(path) as data:
        return check_images(npz_array(data, "arr_0", path), f"{path} (arr_0)")


@contextlib.contextmanager
def open_npz(path):
    """np.load of an npz, never unpickling; a file numpy cannot open as one is an EvaluationError naming it."""
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        # numpy takes any file that is neither zip nor .npy for a pickle, and advises allow_pickle: never here.
        reason = "neither a zip archive nor .npy data" if "pickle" in str(err) else str(err)
        raise EvaluationError(f"{path} is not a readable npz file (damaged, truncated or another format: {reason})")
    with data:
        yield data


def save_features(path, features):
    """Write the features [N, D] of one image set as an npz holding the array "features" (atomically)."""
    atomic_write(path, lambda file: np.savez(file, features=features))


def load_features(path):
    """The features [N, D] save_features wrote to `path`; an unreadable file is an EvaluationError naming it."""
    with open_npz(path) as data:
        return npz_array(data, "features", path)


def npz_array(data, key, path):
    """data[key] of an open npz; an object array (never unpickled) or a damaged member is an EvaluationError."""
    try:
        return data[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        if "pickle" in str(err):
            reason = _PYTHON_OBJECTS
        else:
            reason = f"damaged or truncated: {err}"
        raise EvaluationError(f"{path}: array {key!r} cannot be read ({reason})") from None


def check_npz_images(path):
    """Refuse a sample npz whose arr_0 is not uint8 images [N, H, W, 3] from its header alone: nothing is loaded, so
    a wrong or damaged SAMPLES file fails before the reference side is computed."""
    with open_npz(path) as data:
        try:
            with data.zip.open("arr_0.npy") as member:
                read_header = _NPY_HEADER_READERS.get(np.lib.format.read_magic(member))
                if read_header is None:
                    return  # a newer header version: checked when the images are read
                shape, _, dtype = read_header(member)
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
            raise EvaluationError(f"{path}: array 'arr_0' cannot be read (damaged or truncated: {err})") from None
    if dtype.hasobject:
        raise EvaluationError(f"{path}: array 'arr_0' cannot be read ({_PYTHON_OBJECTS})")
    check_image_layout(dtype, shape, f"{path} (arr_0)")


def check_images(images, what):
    if not isinstance(images, np.ndarray):
        raise EvaluationError(f"{what}: expected uint8 images [N, H, W, 3], got {type(images).__name__}")
    check_image_layout(images.dtype, images.shape, what)
    return images


def check_image_layout(dtype, shape, what):
    """Refuse what is not uint8 images [N>0, H, W, 3], from the dtype and shape of an array or of an npy header."""
    if dtype != np.uint8 or len(shape) != 4:
        raise EvaluationError(f"{what}: expected uint8 images [N, H, W, 3], got {dtype} array of shape {shape}")
    if shape[-1] != 3 or shape[0] == 0:
        raise EvaluationError(f"{what}: expected RGB images [N>0, H, W, 3], got shape {shape}")


def _describe_array(value):
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__


class ArrayResizeDataset(ResizeDataset):
    """clean-fid's ResizeDataset over in-memory uint8 images [N, H, W, 3] instead of files: the same resizer and
    the same conversion to a float tensor [3, 299, 299] in [0, 255] (in legacy_tensorflow mode: [3, H, W])."""

    def __init__(self, images, mode):
        super().__init__(files=images, mode=mode)

    def __getitem__(self, index):
        return self.to_tensor(self.files[index])

    def to_tensor(self, pixels):
        """uint8 [H, W, 3] -> clean-fid's resized float tensor, as ResizeDataset.__getitem__ makes it from a file."""
        resized = self.fn_resize(self.custom_image_tranform(pixels))
        # As ResizeDataset: ToTensor scales uint8 to [0, 1], undone by * 255, and leaves float32 as it is.
        if resized.dtype == np.uint8:
            return self.transforms(np.array(resized)) * 255
        return self.transforms(resized)


class SourceResizeDataset(ArrayResizeDataset):
    """The images of a folder or zip, listed and decoded as the training data loader does (image_datasets), then
    preprocessed as ArrayResizeDataset. Item: (tensor or None, name, error or None); None for an unreadable file."""

    def __init__(self, source, mode):
        super().__init__(source.names, mode)
        self.source = source

    def __getitem__(self, index):
        name = self.source.names[index]
        try:
            image = decode_image(self.source.read(name))
        except UnreadableImageError as err:
            return None, name, str(err)
        return self.to_tensor(np.asarray(image)), name, None


def _readable_batch(items):
    """DataLoader collate_fn of SourceResizeDataset: (stacked tensors of the readable images or None,
    [(name, error)] of the unreadable ones)."""
    tensors = [tensor for tensor, _, _ in items if tensor is not None]
    skipped = [(name, error) for tensor, name, error in items if tensor is None]
    return (torch.stack(tensors) if tensors else None), skipped


def open_folder_or_zip(path):
    """The training data loader's source of a folder or zip (`.names`, `.read(name)`), or EvaluationError."""
    try:
        return open_image_source(os.fspath(path))
    except (ValueError, FileNotFoundError) as err:
        raise EvaluationError(f"{path}: {err}") from None


def unreadable_count(source, kind, num_readable):
    """How many listed images of a folder or zip reference were skipped as unreadable: listed minus the
    `num_readable` its statistics were computed from (also when they come from the cache). None for other kinds."""
    if kind not in ("folder", "zip") or num_readable is None:
        return None
    return len(open_folder_or_zip(source).names) - num_readable


def image_source_kind(source):
    """source_kind of a source that must hold images ("array", "folder", "zip" or "npz_images")."""
    kind = source_kind(source)
    if kind in ("npz_statistics", "named"):
        raise EvaluationError(f"{source} holds statistics, not images: it can only be the reference")
    return kind


def image_features(source, network, batch_size=64, num_workers=0, device="cpu", description="features"):
    """Features [N, D] float32 of the images in `source`: an npz/folder/zip path or a uint8 array [N, H, W, 3]."""
    kind = image_source_kind(source)
    if kind in ("array", "npz_images"):
        images = check_images(source, "image array") if kind == "array" else load_npz_images(source)
        loader = torch.utils.data.DataLoader(
            ArrayResizeDataset(images, network.mode), batch_size=batch_size, shuffle=False, num_workers=num_workers
        )
        return np.concatenate(
            [cleanfid_fid.get_batch_features(batch, network.model, device) for batch in tqdm(loader, description)]
        )
    # A folder or zip: the images training would read, decoded as training decodes them.
    loader = torch.utils.data.DataLoader(
        SourceResizeDataset(open_folder_or_zip(source), network.mode),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_readable_batch,
    )
    features, skipped = [], []
    for batch, unreadable in tqdm(loader, description):
        skipped += unreadable
        if batch is not None:
            features.append(cleanfid_fid.get_batch_features(batch, network.model, device))
    if skipped:
        listed = "; ".join(f"{name} ({error})" for name, error in skipped[:5])
        warnings.warn(f"{source}: skipped {len(skipped)} unreadable image(s): {listed}", RuntimeWarning, stacklevel=2)
    if not features:
        raise EvaluationError(f"{source}: none of its {len(skipped)} image(s) is readable")
    return np.concatenate(features)


# ---------------------------------------------------------------------------------------------------------------
# Statistics, their files and their cache


@dataclasses.dataclass
class FeatureStatistics:
    """Summary of the features [N, D] of one image set, as clean-fid computes it: mu [D], sigma [D, D], and the
    features themselves (KID needs them; None where a statistics file holds only mu and sigma)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None
    num_images: int | None

    @classmethod
    def from_features(cls, features, source):
        """Statistics of features [N, D] that the network computed from the images of `source` (for the message)."""
        if not np.isfinite(features).all():
            raise EvaluationError(
                f"the feature network gave NaN or infinite features for {source}: is the network file damaged?"
            )
        return cls(
            mu=np.mean(features, axis=0),
            sigma=np.cov(features, rowvar=False),
            features=features,
            num_images=len(features),
        )


def check_statistics(stats, source):
    """Refuse statistics that would give a meaningless FID or KID, or hang scipy's sqrtm (a NaN sigma): mu [D],
    sigma [D, D] and features [N, D] (where present) must hold finite real numbers.

    :param source: where they come from (a file, clean-fid's "name:res:split"), for the message.
    :raises EvaluationError: naming `source`, the array and what is wrong with it.
    """
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "features": stats.features}
    for name, array in arrays.items():
        if array is not None and not (isinstance(array, np.ndarray) and array.dtype.kind in "fiu"):
            raise EvaluationError(f"{source}: {name} is a {_describe_array(array)}, not an array of real numbers")
    mu, sigma, features = stats.mu, stats.sigma, stats.features
    if mu.ndim != 1 or len(mu) == 0:
        raise EvaluationError(f"{source}: mu has shape {list(mu.shape)}, expected [D] (the mean of D-d features)")
    dim = len(mu)
    if sigma.shape != (dim, dim):
        raise EvaluationError(f"{source}: sigma has shape {list(sigma.shape)}, expected [{dim}, {dim}] (mu is [{dim}])")
    if features is not None and (features.ndim != 2 or features.shape[1] != dim):
        raise EvaluationError(f"{source}: features has shape {list(features.shape)}, expected [N, {dim}]")
    for name, array in arrays.items():
        if array is not None and not np.isfinite(array).all():
            bad = int(array.size - np.isfinite(array).sum())
            raise EvaluationError(
                f"{source}: {name} holds {bad} NaN or infinite value(s) of {array.size}; the statistics are broken: "
                "compute them again from the reference images"
            )


def save_statistics(path, stats, network, source, source_sha256):
    """Write `stats` in the statistics file format of the module docstring (atomically)."""
    fields = dict(
        mu=stats.mu,
        sigma=stats.sigma,
        features=stats.features,
        num_images=stats.num_images,
        mode=network.mode,
        feature_network=network.name,
        feature_network_sha256=network.sha256,
        source=str(source),
        source_sha256=source_sha256,
        format=STATS_FORMAT,
        format_version=STATS_FORMAT_VERSION,
    )
    atomic_write(path, lambda file: np.savez(file, **fields))


def load_statistics(path, network, need_features):
    """FeatureStatistics from a statistics npz, refused where it was made with another mode or network."""
    with open_npz(path) as data:
        fields = {key: npz_array(data, key, path) for key in data.files}
    expected = {"mode": network.mode, "feature_network_sha256": network.sha256}
    made_with = {key: str(fields[key]) for key in expected if key in fields}
    if any(made_with[key] != expected[key] for key in made_with):
        network_name = str(fields["feature_network"]) if "feature_network" in fields else "?"
        raise EvaluationError(
            f"{path} was computed in mode {made_with.get('mode', '?')} with the network {network_name}, not in "
            f"mode {network.mode} with {network.name}: pass the --mode and --inception_path it was made with, "
            "or the reference images instead"
        )
    features = fields.get("features")
    num_images = fields.get("num_images", None if features is None else len(features))
    if num_images is not None:
        if np.ndim(num_images) != 0 or np.asarray(num_images).dtype.kind not in "iu":
            raise EvaluationError(f"{path}: num_images is {num_images!r}, expected an integer")
        num_images = int(num_images)
    stats = FeatureStatistics(mu=fields["mu"], sigma=fields["sigma"], features=features, num_images=num_images)
    check_statistics(stats, path)
    if need_features and stats.features is None:
        raise EvaluationError(
            f"{path} holds mu and sigma but no features, which KID needs: pass the reference images instead, or "
            "--metrics fid"
        )
    return stats


def content_sha256(path):
    """SHA-256 of what a reference holds: the bytes of a file (npz, zip) or, for a folder, the relative names and
    bytes of the image files training lists. Names, sizes and modification times alone could miss a rewritten image."""
    if not os.path.isdir(path):
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in tqdm(open_folder_or_zip(path).names, f"hashing {path}", leave=False):
        digest.update(os.path.relpath(file, path).encode() + b"\0" + file_sha256(file).encode())
    return digest.hexdigest()


def cache_file_for(reference, reference_sha256, network, cache_dir):
    """Cache path of the statistics of reference images, keyed by their content hash, the mode and the network."""
    key_text = f"{STATS_FORMAT_VERSION}|{network.mode}|{network.sha256}|{reference_sha256}"
    key = hashlib.sha256(key_text.encode()).hexdigest()
    stem = os.path.splitext(os.path.basename(os.path.normpath(reference)))[0]
    return os.path.join(cache_dir, f"{stem}-{network.mode}-{key[:16]}.npz")


def reference_statistics(
    reference, network, need_features, cache_dir=DEFAULT_CACHE_DIR, batch_size=64, num_workers=0, device="cpu"
):
    """(FeatureStatistics, info) of the reference: images (through the cache), a statistics file, or clean-fid's
    named statistics. info: reference_kind, reference_statistics_file, reference_cache_hit."""
    kind = source_kind(reference)
    info = dict(reference_kind=kind, reference_statistics_file=None, reference_cache_hit=None)
    if kind == "named":
        return _named_statistics(reference, network, need_features), info
    if kind == "npz_statistics":
        info["reference_statistics_file"] = os.path.abspath(reference)
        return load_statistics(reference, network, need_features), info
    if kind == "array":
        features = image_features(reference, network, batch_size, num_workers, device, "reference")
        return FeatureStatistics.from_features(features, "the reference images"), info
    reference_sha256 = content_sha256(reference)
    cache_file = cache_file_for(reference, reference_sha256, network, cache_dir)
    info["reference_statistics_file"] = os.path.abspath(cache_file)
    info["reference_cache_hit"] = os.path.isfile(cache_file)
    if info["reference_cache_hit"]:
        return load_statistics(cache_file, network, need_features), info
    check_output_dir(cache_dir, "the statistics cache folder")  # before the features, not after
    description = f"reference {os.path.basename(os.path.normpath(reference))}"
    stats = FeatureStatistics.from_features(
        image_features(reference, network, batch_size, num_workers, device, description), reference
    )
    os.makedirs(cache_dir, exist_ok=True)
    save_statistics(cache_file, stats, network, os.path.abspath(reference), reference_sha256)
    return stats, info


def _named_statistics(spec, network, need_features):
    """clean-fid's precomputed statistics "name:res:split" through its own lookup (get_reference_statistics), which
    downloads them into its package folder; offline they must already be there."""
    name, res, split = NAMED_STATISTICS.match(spec).groups()
    stats_dir = os.path.join(os.path.dirname(cleanfid.__file__), "stats")
    # clean-fid's file names (features.get_reference_statistics), for the message only.
    fid_file = f"{name}_{network.mode}_{split}_{'na' if split == 'custom' else res}.npz".lower()
    needed = [fid_file, fid_file.replace(".npz", "_kid.npz")] if need_features else [fid_file]
    lookup = dict(name=name, res=res, mode=network.mode, split=split)
    try:
        with download_timeout():
            mu, sigma = cleanfid_features.get_reference_statistics(**lookup, metric="FID")
            features = cleanfid_features.get_reference_statistics(**lookup, metric="KID") if need_features else None
    except OSError as err:
        raise EvaluationError(
            f"clean-fid statistics {spec} (mode {network.mode}) are not in clean-fid's cache and could not be "
            f"downloaded ({getattr(err, 'reason', err)}): put {' and '.join(needed)} into {stats_dir}, or pass "
            "the reference images instead"
        ) from None
    except (ValueError, EOFError, zipfile.BadZipFile) as err:
        raise EvaluationError(
            f"clean-fid statistics {spec}: a file among {', '.join(needed)} in {stats_dir} is unreadable ({err}); "
            "delete it and provide it again"
        ) from None
    stats = FeatureStatistics(
        mu=mu, sigma=sigma, features=features, num_images=None if features is None else len(features)
    )
    check_statistics(stats, f"clean-fid statistics {spec}")
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def frechet_inception_distance(sample_stats, reference_stats):
    """FID: clean-fid's frechet_distance between the two Gaussians (mu, sigma)."""
    return float(
        cleanfid_fid.frechet_distance(sample_stats.mu, sample_stats.sigma, reference_stats.mu, reference_stats.sigma)
    )


def kernel_inception_distance(sample_features, reference_features, seed=KID_SEED):
    """KID: clean-fid's kernel_distance (unbiased MMD², cubic polynomial kernel, averaged over random subsets), with
    its subsets drawn from a fixed seed so a run is reproducible; numpy's global generator is restored after."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(
            cleanfid_fid.kernel_distance(
                sample_features,
                reference_features,
                num_subsets=KID_NUM_SUBSETS,
                max_subset_size=KID_MAX_SUBSET_SIZE,
            )
        )
    finally:
        np.random.set_state(state)


def evaluate(samples, reference, network, *args, **kwargs):
    """FID and/or KID of `samples` (npz/folder/zip path or uint8 [N, H, W, 3]) against `reference` (the same kinds,
    a statistics npz, or clean-fid's "name:res:split"). Returns the results dict evaluate.py writes as JSON; a
    metric not asked for is None. Further arguments: those of evaluate_with_features."""
    return evaluate_with_features(samples, reference, network, *args, **kwargs)[0]


def evaluate_with_features(
    samples,
    reference,
    network,
    metrics=METRICS,
    cache_dir=DEFAULT_CACHE_DIR,
    batch_size=64,
    num_workers=0,
    device="cpu",
):
    """evaluate(), also returning the samples' features: (results dict, features float32 [N, D]), for statistics
    that need the images one by one (sweeps.paired_differences)."""
    metrics = check_metrics(metrics)
    if image_source_kind(samples) == "npz_images":  # a wrong SAMPLES argument fails before the reference side
        check_npz_images(samples)
    loader_options = dict(batch_size=batch_size, num_workers=num_workers, device=device)
    reference_stats, info = reference_statistics(reference, network, "kid" in metrics, cache_dir, **loader_options)
    sample_features = image_features(samples, network, description="samples", **loader_options)
    if sample_features.shape[1] != reference_stats.mu.shape[0]:
        raise EvaluationError(
            f"the reference {reference} has {reference_stats.mu.shape[0]}-d features but the network "
            f"{network.name} gives {sample_features.shape[1]}-d ones: they come from different networks"
        )
    _check_counts(len(sample_features), reference_stats.num_images)
    sample_stats = FeatureStatistics.from_features(sample_features, _describe_source(samples))
    results = dict(
        fid=None,
        kid=None,
        kid_x1e3=None,
        num_samples=len(sample_features),
        num_reference=reference_stats.num_images,
        num_reference_unreadable=unreadable_count(reference, info["reference_kind"], reference_stats.num_images),
        mode=network.mode,
        feature_network=network.name,
        feature_network_sha256=network.sha256,
        feature_dim=int(sample_features.shape[1]),
        samples=_describe_source(samples),
        reference=_describe_source(reference),
        **info,
        metrics=list(metrics),
        clean_fid_version=importlib.metadata.version("clean-fid"),
    )
    if "fid" in metrics:
        results["fid"] = frechet_inception_distance(sample_stats, reference_stats)
    if "kid" in metrics:
        results["kid"] = kernel_inception_distance(sample_features, reference_stats.features)
        results["kid_x1e3"] = results["kid"] * 1e3
        results.update(
            kid_num_subsets=KID_NUM_SUBSETS,
            kid_subset_size=min(len(sample_features), len(reference_stats.features), KID_MAX_SUBSET_SIZE),
            kid_seed=KID_SEED,
        )
    return results, sample_features


def _check_counts(num_samples, num_reference):
    # np.cov of one image is NaN, and KID's unbiased estimate divides by (subset size - 1).
    for what, count in (("samples", num_samples), ("reference", num_reference)):
        if count is not None and count < 2:
            raise EvaluationError(f"the {what} hold {count} image(s): FID and KID need at least 2 on each side")


def _describe_source(source):
    if isinstance(source, np.ndarray):
        return f"array {list(source.shape)}"
    return os.path.abspath(source) if os.path.exists(source) else str(source)


def save_results_json(results, path):
    """Write the results dict as JSON (atomically)."""
    write_json(path, results)
