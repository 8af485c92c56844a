"""guided_diffusion/analysis.py: images, noise levels, reverse process from t, perceptual networks and their lookup."""

import os

import numpy as np
import pytest
import torch
import torchvision
from helpers import OracleEpsModel, make_diffusion, save_standin_inception

from guided_diffusion import analysis, inception, perceptual
from guided_diffusion.image_datasets import DEMO_DATASET





class StandInFeatures(torch.nn.Module):
    """Two random convolutions: [N, 3, H, W] in [-1, 1] -> a [N, 16, H/2, W/2] feature map."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))))


def save_standin_feature_network(path):
    """A fixed-seed StandInFeatures as TorchScript, for --network_path; returns `path` as str."""
    torch.manual_seed(0)
    torch.jit.script(StandInFeatures().eval()).save(str(path))
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# Images


def test_image_set_reads_the_demo_set_and_npz_by_index(tmp_path):
    demo = analysis.ImageSet("")
    assert demo.path == DEMO_DATASET and len(demo) == 2031 and demo.image_size == 32
    images = demo.load([5, 0, 5])
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images[0], images[2]) and not np.array_equal(images[0], images[1])

    np.savez(tmp_path / "samples.npz", arr_0=images)
    from_npz = analysis.ImageSet(str(tmp_path / "samples.npz"), image_size=16)
    assert len(from_npz) == 3
    small = from_npz.load([1])
    assert small.shape == (1, 16, 16, 3)
    assert np.array_equal(small, analysis.ImageSet("", image_size=16).load([0]))
    with pytest.raises(analysis.AnalysisError, match="holds 3 images; image index 3 does not exist"):
        from_npz.load([3])


def test_to_model_range_is_the_loaders_scaling():
    images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    x = analysis.to_model_range(images)
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32
    # image_datasets' batches: astype(float32) / 127.5 - 1, then NHWC -> NCHW.
    expected = torch.from_numpy(images.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    assert torch.equal(x, expected) and x.min() == -1 and x.max() == 1


# ---------------------------------------------------------------------------------------------------------------
# Noise levels


def test_perturb_to_snr_gives_the_asked_snr():
    x_start = torch.full((1, 3, 2, 2), 0.5)
    noise = torch.full((1, 3, 2, 2), -2.0)
    for snr in (1e-3, 1.0, 250.0):
        alpha_bar = snr / (1 + snr)
        assert alpha_bar / (1 - alpha_bar) == pytest.approx(snr)
        expected = alpha_bar**0.5 * 0.5 - 2 * (1 - alpha_bar) ** 0.5
        assert torch.allclose(analysis.perturb_to_snr(x_start, snr, noise), torch.full_like(x_start, expected))


def test_snr_grid_and_parse_snrs():
    grid = analysis.snr_grid(1e-4, 1e4, 2)
    assert len(grid) == 17 and grid[0] == pytest.approx(1e-4) and grid[-1] == pytest.approx(1e4)
    assert grid[8] == pytest.approx(1.0) and grid[9] == pytest.approx(10**0.5)
    assert analysis.parse_snrs("10,1e-3").tolist() == [10.0, 1e-3]
    for bad in ("1,x", "1,-1", "0"):
        with pytest.raises(analysis.AnalysisError, match="--snrs"):
            analysis.parse_snrs(bad)


def test_timestep_nearest_snr_on_a_respaced_diffusion():
    base = make_diffusion(steps=1000)
    spaced = make_diffusion(steps=1000, respacing="250")
    for target in (1e-3, 1e-2, 0.1, 1.0, 10.0):
        index, snr = analysis.timestep_nearest_snr(spaced, target)
        t = analysis.original_timestep(spaced, index)
        assert snr == base.snr[t]  # the respaced step's SNR is its original timestep's, bit for bit
        log_gaps = np.abs(np.log(spaced.snr) - np.log(target))
        assert log_gaps[index] == log_gaps.min()
    # A target equal to a table value finds that step.
    assert analysis.timestep_nearest_snr(base, base.snr[417]) == (417, base.snr[417])
    assert analysis.original_timestep(base, 417) == 417


# ---------------------------------------------------------------------------------------------------------------
# Reverse process from an intermediate step


def test_denoise_from_runs_step_plus_one_evaluations_and_an_exact_oracle_recovers_x0():
    diffusion = make_diffusion(steps=100, respacing="20", learn_sigma=False)
    images = analysis.ImageSet("", image_size=8).load([0, 1])
    x_start = analysis.to_model_range(images)
    counting = analysis.CountingNetwork(OracleEpsModel(x_start, make_diffusion(steps=100).alphas_cumprod))
    step = 11
    x_t = diffusion.q_sample(x_start, torch.full((2,), step), noise=torch.randn_like(x_start))
    x_0 = analysis.denoise_from(counting, diffusion, x_t, step)
    assert counting.rows == 2 * (step + 1)
    assert torch.allclose(x_0, x_start, atol=1e-4)
    counting.rows = 0
    x_0 = analysis.denoise_from(counting, diffusion, x_t, step, use_ddim=True)
    assert counting.rows == 2 * (step + 1)
    assert torch.allclose(x_0, x_start, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Perceptual networks


@pytest.fixture
def images():
    return analysis.ImageSet("", image_size=16).load(range(6))


def test_feature_distance_is_the_chord_between_unit_features(images):
    scale = np.linspace(1, 3, 6)[:, None]

    def features(batch):
        return batch.reshape(len(batch), -1).astype(np.float64) + 1.0

    network = perceptual.FeatureDistance(features, "test", "pixels")
    same, other = network.distances(images[:3], images[:3], images[3:])
    assert np.array_equal(same, np.zeros(3))
    f = features(images)
    unit = f / np.linalg.norm(f, axis=1, keepdims=True)
    assert np.allclose(other, np.linalg.norm(unit[:3] - unit[3:], axis=1))
    scaled = perceptual.FeatureDistance(lambda batch: features(batch) * np.tile(scale[: len(batch) // 2], (2, 1)),
                                        "test", "scaled")
    assert np.allclose(scaled.distances(images[:3], images[3:])[0], other)


def test_torchscript_network_path(tmp_path, images):
    path = save_standin_feature_network(tmp_path / "standin.pt")
    network = perceptual.load_perceptual_network(network_path=path, batch_size=4)
    assert network.kind == "torchscript" and network.name == f"TorchScript {path}"
    same, other = network.distances(images[:3], images[:3], images[3:])
    assert np.allclose(same, 0) and (other > 0.05).all() and (other <= 2).all()
    with pytest.raises(analysis.AnalysisError, match="either --network lpips or --network_path"):
        perceptual.load_perceptual_network("lpips", network_path=path)
    with pytest.raises(analysis.AnalysisError, match="no such file"):
        perceptual.load_perceptual_network(network_path=str(tmp_path / "missing.pt"))
    with pytest.raises(analysis.AnalysisError, match="not one of auto, lpips, inception"):
        perceptual.load_perceptual_network("vgg")


@pytest.fixture
def empty_hub(monkeypatch, tmp_path):
    """torch.hub's cache is an empty folder: no LPIPS backbone weights."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))


def test_lpips_without_its_weights_names_what_is_missing(empty_hub, tmp_path):
    problem = perceptual.lpips_missing("alex")
    if perceptual.importlib.util.find_spec("lpips") is None:
        assert "pip install lpips" in problem
    else:
        expected = os.path.join(str(tmp_path / "hub"), "checkpoints", "alexnet-owt-7be5be79.pth")
        assert expected in problem and "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in problem
    with pytest.raises(analysis.AnalysisError) as error:
        perceptual.load_perceptual_network("lpips")
    assert str(error.value) == problem
    with pytest.raises(analysis.AnalysisError, match="--lpips_net 'resnet'"):
        perceptual.load_perceptual_network("lpips", lpips_net="resnet")


@pytest.fixture
def standin_lpips_backbone(monkeypatch, tmp_path):
    """torch.hub's cache (under TORCH_HOME) holds a randomly initialised AlexNet under the name of torchvision's
    ImageNet weights, so LPIPS builds without a download; its linear heads are the real ones shipped with lpips."""
    pytest.importorskip("lpips")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    path, _ = perceptual.lpips_backbone_file("alex")
    os.makedirs(os.path.dirname(path))
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), path)
    return path


def test_lpips_distance_is_zero_for_identical_images_symmetric_and_grows_with_difference(standin_lpips_backbone):
    images = analysis.ImageSet("", image_size=32).load(range(8))
    network = perceptual.load_perceptual_network("auto", batch_size=3)  # LPIPS is preferred where it is available
    assert network.kind == "lpips" and standin_lpips_backbone in network.name
    noise = np.random.default_rng(0).integers(-8, 9, size=images[:4].shape)
    slightly_changed = np.clip(images[:4].astype(np.int64) + noise, 0, 255).astype(np.uint8)
    same, forward, slight = network.distances(images[:4], images[:4], images[4:], slightly_changed)
    assert np.allclose(same, 0, atol=1e-6)
    (reverse,) = network.distances(images[4:], images[:4])
    assert np.allclose(forward, reverse, rtol=1e-5, atol=1e-7)
    assert (slight > 1e-4).all() and (forward > slight).all()


def test_auto_falls_back_to_inception_then_fails_listing_every_option(empty_hub, monkeypatch, tmp_path, images):
    standin = inception.load_feature_network("clean", save_standin_inception(tmp_path / "inception.pt"))
    monkeypatch.setattr(inception, "load_feature_network", lambda *args, **kwargs: standin)
    network = perceptual.load_perceptual_network("auto", batch_size=4)
    assert network.kind == "inception" and standin.name in network.name
    same, other = network.distances(images[:2], images[:2], images[2:4])
    assert np.allclose(same, 0, atol=1e-6) and (other > 0).all()

    def unavailable(*args, **kwargs):
        raise inception.EvaluationError("the Inception network for FID/KID is not available: offline")

    monkeypatch.setattr(inception, "load_feature_network", unavailable)
    with pytest.raises(analysis.AnalysisError) as error:
        perceptual.load_perceptual_network("auto")
    message = str(error.value)
    assert message.startswith("no perceptual network is available")
    for option in ("--network lpips: " + perceptual.lpips_missing("alex"), "--network inception: the Inception",
                   "--network_path FILE"):
        assert option in message
    with pytest.raises(analysis.AnalysisError, match="^the Inception network for FID/KID is not available"):
        perceptual.load_perceptual_network("inception")
