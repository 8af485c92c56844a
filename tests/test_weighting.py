"""Weight tables and summaries (docs/compatibility.md, "P2 weighting"; paper Eq. (A))."""

import numpy as np

from guided_diffusion.weighting import p2_lambda, vlb_lambda, weight_summary
from helpers import assert_matches_printed, make_diffusion


def test_vlb_lambda_matches_snr_form_of_eq_a():
    diffusion = make_diffusion()
    snr = diffusion.snr
    # Eq. (A): λ_t = SNR(t)(1 + SNR(t-1)) / ((1 + SNR(t))(SNR(t-1) - SNR(t))) for t >= 1.
    expected = snr[1:] * (1 + snr[:-1]) / ((1 + snr[1:]) * (snr[:-1] - snr[1:]))
    np.testing.assert_allclose(vlb_lambda(diffusion)[1:], expected, rtol=1e-8)
    # λ'_t/λ_t is the P2 factor: the printed w(γ=1) at t = 9 and 699 (docs/compatibility.md, "P2 weighting").
    ratio = p2_lambda(make_diffusion(p2_gamma=1.0)) / vlb_lambda(diffusion)
    assert_matches_printed(ratio[9], "1.89e-3")
    assert_matches_printed(ratio[699], "0.9930")


def test_summary_numbers_of_the_compatibility_doc():
    half = weight_summary(make_diffusion(p2_gamma=0.5).p2_weight, make_diffusion().snr)
    one = weight_summary(make_diffusion(p2_gamma=1.0).p2_weight, make_diffusion().snr)
    assert_matches_printed(half["mean"], "0.8059")
    assert_matches_printed(one["mean"], "0.7245")
    for share, printed in zip(one["quartile_share"], ["0.063", "0.256", "0.336", "0.345"]):
        assert_matches_printed(share, printed)
    assert abs(sum(one["stage_share"].values()) - 1) < 1e-12
    # SNR > 1 for t < 259 and SNR < 1e-2 for t >= 674: the stage shares are sums over those ranges.
    w = make_diffusion(p2_gamma=1.0).p2_weight
    assert abs(one["stage_share"]["cleanup"] - w[:259].sum() / w.sum()) < 1e-12
    assert abs(one["stage_share"]["coarse"] - w[674:].sum() / w.sum()) < 1e-12
