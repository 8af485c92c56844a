"""Stochastic reconstruction (paper Fig. 2, Fig. C): an exact denoiser's reconstructions drift away from the input
as SNR falls; scripts/reconstruct.py writes the grid, the numbers and the figures with a tiny random U-Net."""

import json
import os

import numpy as np
import pytest
import torch
from helpers import make_diffusion
from PIL import Image
from test_analysis import save_standin_feature_network

from guided_diffusion import analysis, perceptual

import reconstruct
from sample_tiny_model import save_tiny_checkpoint, tiny_flags

SNRS = [1e-3, 1e-2, 1e-1, 1.0, 10.0]


class MixtureOracleEps(torch.nn.Module):
    """The exact ε-prediction for data uniform over K images x_k: ε̂ = (x_t - √ᾱ E[x_0 | x_t]) / √(1-ᾱ), with the
    posterior mean E[x_0 | x_t] = Σ_k w_k x_k, w = softmax_k(-‖x_t - √ᾱ x_k‖² / (2(1-ᾱ))). Computed in float64;
    it receives original timesteps, so it reads the base process's ᾱ."""

    def __init__(self, data, base_alphas_cumprod):
        super().__init__()
        self.data = data.flatten(1).double()  # [K, D]
        self.alphas_cumprod = torch.from_numpy(np.asarray(base_alphas_cumprod, dtype=np.float64))

    def forward(self, x_t, t):
        alpha_bar = self.alphas_cumprod[t.long()].view(-1, 1)
        x = x_t.flatten(1).double()
        squared = (x**2).sum(1, keepdim=True) - 2 * alpha_bar.sqrt() * x @ self.data.T \
            + alpha_bar * (self.data**2).sum(1)
        weights = torch.softmax(-squared / (2 * (1 - alpha_bar)), dim=1)
        eps = (x - alpha_bar.sqrt() * weights @ self.data) / (1 - alpha_bar).sqrt()
        return eps.view_as(x_t).to(x_t.dtype)


@pytest.fixture(scope="module")
def feature_network(tmp_path_factory):
    path = save_standin_feature_network(tmp_path_factory.mktemp("network") / "standin.pt")
    return perceptual.load_perceptual_network(network_path=path, batch_size=32)


def test_oracle_reconstructions_drift_from_the_input_as_snr_falls(feature_network):
    images = analysis.ImageSet("", image_size=16).load(range(16))
    diffusion = make_diffusion(steps=100, learn_sigma=False)
    oracle = MixtureOracleEps(analysis.to_model_range(images), diffusion.alphas_cumprod)
    sweep = analysis.reconstruction_sweep(oracle, diffusion, images, SNRS, seed=0, batch_size=16)
    assert sweep["reconstructions"].shape == (5, 16, 16, 16, 3)
    assert [s / target for s, target in zip(sweep["snr"], SNRS)] == pytest.approx([1] * 5, rel=0.3)

    distances = analysis.reconstruction_distances(feature_network, images, sweep["reconstructions"])
    mean = distances.mean(axis=1)  # SNR ascending: distances must fall
    between_images = feature_network.distances(images[:8], images[8:])[0].mean()
    assert mean[-1] < 0.02 * between_images, "at SNR 10 the input comes back (up to the quantiser's truncation)"
    assert np.abs(sweep["reconstructions"][-1].astype(int) - images).max() <= 1
    assert all(np.diff(mean) <= 0.02 * between_images), f"distance must not grow with SNR: {mean}"
    assert mean[0] > 0.5 * between_images, "at SNR 1e-3 the reverse process draws another training image"


def test_reconstructions_do_not_depend_on_the_batch_size():
    images = analysis.ImageSet("", image_size=8).load(range(5))
    diffusion = make_diffusion(steps=100, respacing="25", learn_sigma=False)
    oracle = MixtureOracleEps(analysis.to_model_range(images), make_diffusion(steps=100).alphas_cumprod)
    one_batch = analysis.reconstruction_sweep(oracle, diffusion, images, [0.05], seed=3, batch_size=5)
    batches_of_two = analysis.reconstruction_sweep(oracle, diffusion, images, [0.05], seed=3, batch_size=2)
    other_seed = analysis.reconstruction_sweep(oracle, diffusion, images, [0.05], seed=4, batch_size=5)
    difference = np.abs(one_batch["reconstructions"].astype(int) - batches_of_two["reconstructions"])
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3  # only float rounding at a quantisation step
    assert not np.array_equal(one_batch["reconstructions"], other_seed["reconstructions"])


# ---------------------------------------------------------------------------------------------------------------
# The script


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("run") / "ema_0.9999_000010.pt"))


def run_script(checkpoint, out_dir, *flags, **model_flags):
    return reconstruct.main(tiny_flags(**model_flags) + ["--model_path", checkpoint, "--out_dir", str(out_dir), *flags])


def read_png(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_script_writes_the_grid_numbers_and_figures(checkpoint, tmp_path, feature_network, capsys):
    network_path = feature_network.name.split(" ", 1)[1]
    sweep = run_script(checkpoint, tmp_path, "--num_images", "3", "--grid_rows", "2", "--snrs", "10,1e-2,1",
                       "--batch_size", "2", "--network_path", network_path)
    grid = read_png(tmp_path / "reconstruction_grid.png")
    assert grid.shape == (2 * 18 + 2, 4 * 18 + 2, 3)  # 2 rows × (3 SNRs + the input), 16 px tiles, 2 px borders
    inputs = analysis.ImageSet("", image_size=16).load(range(3))
    for row in range(2):
        top = 2 + 18 * row
        assert np.array_equal(grid[top : top + 16, 2 + 18 * 3 : 2 + 18 * 3 + 16], inputs[row])
        for column in range(3):
            tile = grid[top : top + 16, 2 + 18 * column : 2 + 18 * column + 16]
            assert np.array_equal(tile, sweep["reconstructions"][column, row])

    with np.load(tmp_path / "reconstructions.npz") as arrays:
        assert arrays["reconstructions"].shape == (3, 3, 16, 16, 3)
        assert np.array_equal(arrays["inputs"], inputs)
        assert arrays["target_snr"].tolist() == [1e-2, 1, 10]  # lowest SNR first
        assert np.all(np.diff(arrays["snr"]) > 0) and np.all(np.diff(arrays["step"]) < 0)
    record = json.loads((tmp_path / "distances.json").read_text())
    assert record["network"] == feature_network.name and record["network_kind"] == "torchscript"
    assert [r["target_snr"] for r in record["per_snr"]] == [1e-2, 1, 10]
    assert all(len(r["values"]) == 3 for r in record["per_snr"])
    assert len((tmp_path / "distances.csv").read_text().splitlines()) == 1 + 3
    for figure in ("reconstruction_figure.png", "distance_vs_snr.png"):
        assert read_png(tmp_path / figure).shape[0] > 100
    assert "target SNR 0.01" in capsys.readouterr().out


def test_script_honours_respacing_and_ddim_and_batch_size(checkpoint, tmp_path):
    common = ["--num_images", "3", "--snrs", "0.1,3", "--network", "none", "--seed", "7"]
    ddim = run_script(checkpoint, tmp_path / "ddim", *common, "--use_ddim", "True", timestep_respacing="10")
    respaced = make_diffusion(steps=50, respacing="10")
    assert all(t in respaced.timestep_map for t in ddim["timestep"])
    assert ddim["step"] == [analysis.timestep_nearest_snr(respaced, s)[0] for s in (0.1, 3)]
    assert not os.path.exists(tmp_path / "ddim" / "distances.json")

    batched = run_script(checkpoint, tmp_path / "a", *common, "--batch_size", "3")
    one_by_one = run_script(checkpoint, tmp_path / "b", *common, "--batch_size", "1")
    difference = np.abs(batched["reconstructions"].astype(int) - one_by_one["reconstructions"])
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_script_refuses_bad_input_with_one_message(checkpoint, tmp_path):
    for flags, message in (
        (["--out_dir", str(tmp_path)], "--model_path is required"),
        (["--model_path", checkpoint, "--out_dir", str(tmp_path), "--class_cond", "True"], "unconditional models"),
        (["--model_path", checkpoint, "--out_dir", str(tmp_path), "--snrs", "1,zero"], "--snrs '1,zero'"),
        (["--model_path", checkpoint, "--out_dir", str(tmp_path), "--num_images", "9999", "--network", "none"],
         "holds only 2031 images"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            reconstruct.main(tiny_flags() + flags)
        assert str(exit_info.value.code).startswith("reconstruct.py: error:") and message in str(exit_info.value.code)
