"""Likelihood helpers (COMPAT §2 "vb")."""

import numpy as np
import torch

from guided_diffusion.losses import discretized_gaussian_log_likelihood, normal_kl


def test_discretized_likelihood_sums_to_one_over_bins():
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, log_scale in ((0.0, -1.0), (0.3, -3.0), (-0.99, -5.0), (1.5, 0.5)):
        means = torch.full_like(bins, mean)
        log_scales = torch.full_like(bins, log_scale)
        log_probs = discretized_gaussian_log_likelihood(bins, means=means, log_scales=log_scales)
        assert abs(log_probs.exp().sum().item() - 1) < 1e-6


def test_normal_kl_closed_form():
    m1, lv1, m2, lv2 = torch.tensor(0.3), torch.tensor(-0.2), torch.tensor(-0.1), torch.tensor(0.4)
    s1, s2 = np.exp(0.5 * -0.2), np.exp(0.5 * 0.4)
    expected = np.log(s2 / s1) + (s1**2 + 0.4**2) / (2 * s2**2) - 0.5
    assert abs(normal_kl(m1, lv1, m2, lv2).item() - expected) < 1e-6
    assert normal_kl(torch.zeros(3), torch.zeros(3), 0.0, 0.0).abs().max() == 0
