"""scripts/perceptual_distance.py (paper Fig. 1): noisy copies of one image are close at high SNR and as far apart
as copies of different images at low SNR; the outputs name the network."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from helpers import save_standin_inception
from test_analysis import save_standin_feature_network

from guided_diffusion import inception, perceptual

import perceptual_distance



def run(out_dir, *flags):
    return perceptual_distance.main(["--out_dir", str(out_dir), "--image_size", "16", "--seed", "1", *flags])


def test_same_image_is_closer_at_high_snr_and_both_converge_at_low_snr(tmp_path):
    network_path = save_standin_feature_network(tmp_path / "standin.pt")
    snrs, same, different = run(tmp_path, "--num_triplets", "6", "--snrs_per_decade", "1", "--network_path",
                                network_path)
    assert np.allclose(snrs, 10.0 ** np.arange(-4, 5)) and same.shape == different.shape == (9, 6)
    same_mean, different_mean = same.mean(axis=1), different.mean(axis=1)
    assert same_mean[-1] < 0.1 * different_mean[-1], "at SNR 1e4 noisy copies of one image are nearly equal"
    assert abs(same_mean[0] - different_mean[0]) < 0.05 * different_mean[-1], "at SNR 1e-4 the content is gone"
    assert same_mean[0] > 10 * same_mean[-1]

    record = json.loads((tmp_path / "perceptual_distance.json").read_text())
    assert record["network"] == f"TorchScript {network_path}" and record["network_kind"] == "torchscript"
    assert record["num_triplets"] == 6 and np.allclose(record["same"], same)
    assert all(i != j for i, j in record["pairs"])
    with open(tmp_path / "perceptual_distance.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and float(rows[0]["different_mean"]) == pytest.approx(different_mean[0], rel=1e-9)
    with open(tmp_path / "perceptual_distance.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # Reproducible: the same seed gives the same pairs and noise.
    again = run(tmp_path / "again", "--num_triplets", "6", "--snrs_per_decade", "1", "--network_path", network_path)
    assert np.array_equal(again[1], same) and np.array_equal(again[2], different)


def test_inception_features_go_through_evaluation(tmp_path):
    standin = save_standin_inception(tmp_path / "inception.pt")
    run(tmp_path, "--num_triplets", "3", "--snr_min", "1e-2", "--snr_max", "1e2", "--network", "inception",
        "--inception_path", standin)
    record = json.loads((tmp_path / "perceptual_distance.json").read_text())
    assert record["network_kind"] == "inception"
    assert record["network"] == f"FID Inception pool features, TorchScript {os.path.abspath(standin)}"
    assert record["same_mean"][-1] < record["different_mean"][-1]


def test_no_network_available_fails_with_one_message_listing_the_options(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def unavailable(*args, **kwargs):
        raise inception.EvaluationError("the Inception network for FID/KID is not available: offline")

    monkeypatch.setattr(inception, "load_feature_network", unavailable)
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--num_triplets", "2")
    message = str(exit_info.value.code)
    assert message.startswith("perceptual_distance.py: error: no perceptual network is available")
    assert perceptual.lpips_missing("alex") in message and "--network_path FILE" in message
    assert not os.path.exists(tmp_path / "perceptual_distance.json")
