"""Perceptual distances between uint8 images [N, H, W, 3] for the paper's analyses (Sec. 3.1: Fig. 1, Fig. C).

`load_perceptual_network` picks the network: LPIPS (the paper's metric) where its weights are on this machine, the
FID Inception pool features, or any TorchScript feature network. Every network has `kind`, `name` and
`distances(anchors, *others)`; images enter as uint8, the pixels a saved image holds.
"""

import importlib.util
import os
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from . import evaluation, inception
from .analysis import AnalysisError, to_model_range

NETWORK_CHOICES = ("auto", "lpips", "inception")
LPIPS_BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}


class LpipsDistance:
    """LPIPS (Zhang et al. 2018; the paper's metric) of the `lpips` package, linear heads v0.1."""

    kind = "lpips"

    def __init__(self, net, device, batch_size):
        import lpips

        with warnings.catch_warnings():
            # lpips builds its backbone with torchvision's deprecated `pretrained=True`, which still loads it.
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            self.model = lpips.LPIPS(net=net, verbose=False).to(device).eval()
        self.name = f"LPIPS v0.1, {net} backbone ({lpips_backbone_file(net)[0]})"
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def distances(self, anchors, *others):
        """[d(anchors[k], other[k]) for k] for each `other`: float64 [N] arrays; images uint8 [N, H, W, 3]."""
        results = []
        for other in others:
            values = []
            for start in tqdm(range(0, len(anchors), self.batch_size), desc="LPIPS", leave=False):
                a = to_model_range(anchors[start : start + self.batch_size], self.device)
                b = to_model_range(other[start : start + self.batch_size], self.device)
                values.append(self.model(a, b).flatten().double().cpu().numpy())
            results.append(np.concatenate(values))
        return results


class FeatureDistance:
    """d(a, b) = ‖f(a)/‖f(a)‖ - f(b)/‖f(b)‖‖₂ in [0, 2] for a feature network f: the chord between unit feature
    vectors (a monotone function of their cosine similarity), so the features' scale does not matter.

    :param features: uint8 [N, H, W, 3] -> [N, D] features.
    """

    def __init__(self, features, kind, name):
        self.features, self.kind, self.name = features, kind, name

    def distances(self, anchors, *others):
        """[d(anchors[k], other[k]) for k] for each `other`: float64 [N] arrays; images uint8 [N, H, W, 3]."""
        features = np.asarray(self.features(np.concatenate([anchors, *others])), dtype=np.float64)
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        unit = features / np.maximum(norms, np.finfo(np.float64).tiny)
        anchor_unit = unit[: len(anchors)]
        return [
            np.linalg.norm(anchor_unit - unit[len(anchors) * k : len(anchors) * (k + 1)], axis=1)
            for k in range(1, len(others) + 1)
        ]


def torchscript_features(path, device, batch_size):
    """Features of any TorchScript network taking [N, 3, H, W] in [-1, 1] at the images' own size and returning
    a tensor whose rows are its features (any shape [N, ...], flattened)."""
    if not os.path.isfile(path):
        raise AnalysisError(f"--network_path {path!r}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.load.*")
            network = torch.jit.load(path, map_location=device).eval()
    except (RuntimeError, ValueError) as err:
        raise AnalysisError(f"--network_path {path!r} is not a TorchScript file ({str(err).splitlines()[0]})") from None

    @torch.no_grad()
    def features(images):
        rows = []
        for start in tqdm(range(0, len(images), batch_size), desc="features", leave=False):
            x = to_model_range(images[start : start + batch_size], device)
            rows.append(network(x).flatten(1).double().cpu().numpy())
        return np.concatenate(rows)

    return features


def lpips_backbone_file(net):
    """(path, url) of the torchvision ImageNet weights that LPIPS's `net` backbone loads from torch.hub's cache."""
    import torchvision  # lpips depends on it; imported here so that the other networks do without it

    weights = getattr(torchvision.models, LPIPS_BACKBONES[net]).IMAGENET1K_V1
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url)), weights.url


def lpips_missing(net):
    """None where LPIPS with `net` can be built without a download, else what is missing and how to provide it."""
    if net not in LPIPS_BACKBONES:
        raise AnalysisError(f"--lpips_net {net!r} is not one of {', '.join(LPIPS_BACKBONES)}")
    if importlib.util.find_spec("lpips") is None:
        return "LPIPS needs the package lpips (pip install lpips), which ships its linear heads"
    path, url = lpips_backbone_file(net)
    if not os.path.isfile(path):
        return f"LPIPS ({net}) needs torchvision's ImageNet backbone weights {path} (download {url} to that path)"
    return None


def load_perceptual_network(network="auto", network_path=None, inception_path=None, lpips_net="alex", device="cpu",
                            batch_size=64):
    """The perceptual distance to use: an object with `kind`, `name` and `distances(anchors, *others)`.

    :param network: "lpips", "inception" (the FID Inception pool features after clean-fid's resize, see
        inception.load_feature_network) or "auto": LPIPS where it is available without a download, else the
        Inception features.
    :param network_path: a TorchScript feature network (see `torchscript_features`); replaces `network`.
    :param inception_path: passed to inception.load_feature_network.
    """
    if network not in NETWORK_CHOICES:
        raise AnalysisError(f"--network {network!r} is not one of {', '.join(NETWORK_CHOICES)}")
    if network_path:
        if network != "auto":
            raise AnalysisError(f"pass either --network {network} or --network_path, not both")
        features = torchscript_features(network_path, device, batch_size)
        return FeatureDistance(features, "torchscript", f"TorchScript {os.path.abspath(network_path)}")
    lpips_problem = lpips_missing(lpips_net)
    if network == "lpips" or (network == "auto" and lpips_problem is None):
        if lpips_problem is not None:
            raise AnalysisError(lpips_problem)
        return LpipsDistance(lpips_net, device, batch_size)
    try:
        inception_network = inception.load_feature_network("clean", inception_path, device)
    except inception.EvaluationError as err:
        if network == "inception":
            raise AnalysisError(str(err)) from None
        raise AnalysisError(
            "no perceptual network is available on this machine. Provide one of:\n"
            f"  - --network lpips: {lpips_problem}\n"
            f"  - --network inception: {str(err).splitlines()[0]} (see --inception_path)\n"
            "  - --network_path FILE: any TorchScript network mapping [N, 3, H, W] in [-1, 1] to features"
        ) from None

    def features(images):
        return evaluation.image_features(images, inception_network, batch_size, device=device, description="Inception")

    return FeatureDistance(features, "inception", f"FID Inception pool features, {inception_network.name}")
