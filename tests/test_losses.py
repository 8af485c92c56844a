"""Likelihood helpers (docs/compatibility.md, "Diffusion process")."""

import math

import numpy as np
import pytest
import torch

from guided_diffusion.losses import discretized_gaussian_log_likelihood, normal_kl


def test_discretized_likelihood_sums_to_one_over_bins():
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, log_scale in ((0.0, -1.0), (0.3, -3.0), (-0.99, -5.0), (1.5, 0.5)):
        means = torch.full_like(bins, mean)
        log_scales = torch.full_like(bins, log_scale)
        log_probs = discretized_gaussian_log_likelihood(bins, means=means, log_scales=log_scales)
        assert abs(log_probs.exp().sum().item() - 1) < 1e-6


@pytest.mark.parametrize("pixel, std", [(0, 0.8), (100, 0.3), (140, 0.3), (200, 0.3), (255, 0.8)])
def test_discretized_likelihood_against_the_exact_normal_cdf(pixel, std):
    """The bin of a pixel value (width 2/255, the edge bins open-ended) under N(0.1, std²), from math.erf. Within
    2σ, as here, the reference's tanh approximation of the CDF is within 1e-3 of it (it is not in the far tails)."""
    x, mean = pixel / 127.5 - 1, 0.1
    cdf = lambda z: 0.5 * (1 + math.erf((z - mean) / (std * math.sqrt(2))))  # noqa: E731
    upper = 1.0 if x > 0.999 else cdf(x + 1 / 255)
    lower = 0.0 if x < -0.999 else cdf(x - 1 / 255)
    expected = math.log(max(upper - lower, 1e-12))
    log_prob = discretized_gaussian_log_likelihood(
        torch.tensor([x], dtype=torch.float64),
        means=torch.tensor([mean], dtype=torch.float64),
        log_scales=torch.tensor([math.log(std)], dtype=torch.float64),
    )
    assert log_prob.item() == pytest.approx(expected, rel=1e-3)


def test_normal_kl_closed_form():
    m1, lv1, m2, lv2 = torch.tensor(0.3), torch.tensor(-0.2), torch.tensor(-0.1), torch.tensor(0.4)
    s1, s2 = np.exp(0.5 * -0.2), np.exp(0.5 * 0.4)
    expected = np.log(s2 / s1) + (s1**2 + 0.4**2) / (2 * s2**2) - 0.5
    assert abs(normal_kl(m1, lv1, m2, lv2).item() - expected) < 1e-6
    assert normal_kl(torch.zeros(3), torch.zeros(3), 0.0, 0.0).abs().max() == 0
