"""The weighting schemes of the paper as per-timestep tables (Eqs. (5), (7), (8); Fig. 3, Fig. A;
docs/compatibility.md, "P2 weighting").

Two views of the same weights:
- the P2 factor w_t = (k + SNR_t)^-γ that multiplies the ε-MSE of L_simple (what training_losses applies);
- the weights relative to the VLB terms L_t: the baseline λ_t = (1 - β_t)(1 - ᾱ_t)/β_t (Eq. (5)) and
  P2's λ'_t = λ_t · w_t (Eq. (8)), as the paper's figures draw them.
"""

import numpy as np

from .gaussian_diffusion import SNR_STAGE_NAMES, snr_stage


def vlb_lambda(diffusion):
    """Baseline weights λ_t = (1 - β_t)(1 - ᾱ_t)/β_t of L_simple relative to the VLB terms; [T] float64."""
    return (1.0 - diffusion.betas) * (1.0 - diffusion.alphas_cumprod) / diffusion.betas


def p2_lambda(diffusion):
    """P2 weights λ'_t = λ_t/(k + SNR_t)^γ (Eq. (8)); [T] float64."""
    return vlb_lambda(diffusion) * diffusion.p2_weight


def weight_summary(weights, snr):
    """Mean weight and the shares of total weight per paper stage and per quarter of t.

    :param weights: [T] weights indexed by t.
    :param snr: [T] SNR_t.
    :return: dict with 'mean', 'stage_share' ({coarse, content, cleanup} -> share) and 'quartile_share' ([4]).
    """
    weights = np.asarray(weights, dtype=np.float64)
    total = weights.sum()
    stages = snr_stage(snr)
    quartile = (4 * np.arange(len(weights))) // len(weights)
    return {
        "mean": float(weights.mean()),
        "stage_share": {name: float(weights[stages == i].sum() / total) for i, name in enumerate(SNR_STAGE_NAMES)},
        "quartile_share": [float(weights[quartile == q].sum() / total) for q in range(4)],
    }
