"""The diffusion process and P2 weighting against the numbers of the paper and COMPAT §1, §2, §4."""

import numpy as np
import pytest
import torch

from guided_diffusion import gaussian_diffusion as gd
from helpers import OracleEpsModel, assert_matches_printed, make_diffusion

# COMPAT §1 "Verified values" (linear schedule, T = 1000, k = 1): t, ᾱ_t, SNR_t, w(γ=0.5), w(γ=1).
WEIGHT_TABLE = [
    (0, "0.999900", "9.999e3", "1.000e-2", "1.000e-4"),
    (9, "0.998105", "526.8", "4.35e-2", "1.89e-3"),
    (49, "0.971016", "33.50", "0.170", "0.0290"),
    (99, "0.897018", "8.710", "0.321", "0.103"),
    (199, "0.659039", "1.933", "0.584", "0.341"),
    (299, "0.396420", "0.657", "0.777", "0.604"),
    (499, "0.078587", "0.0853", "0.960", "0.921"),
    (699, "0.006966", "0.00702", "0.9965", "0.9930"),
    (999, "4.036e-5", "4.036e-5", "0.99998", "0.99996"),
]


@pytest.mark.parametrize("t, alpha_bar, snr, w_half, w_one", WEIGHT_TABLE)
def test_weight_table(t, alpha_bar, snr, w_half, w_one):
    half = make_diffusion(p2_gamma=0.5)
    one = make_diffusion(p2_gamma=1.0)
    assert_matches_printed(one.alphas_cumprod[t], alpha_bar)
    assert_matches_printed(one.snr[t], snr)
    assert_matches_printed(half.p2_weight[t], w_half)
    assert_matches_printed(one.p2_weight[t], w_one)


def test_weights_are_float64_and_match_eq8():
    diffusion = make_diffusion(p2_gamma=0.5, p2_k=2.0)
    assert diffusion.snr.dtype == np.float64 and diffusion.p2_weight.dtype == np.float64
    np.testing.assert_array_equal(diffusion.p2_weight, (2.0 + diffusion.snr) ** -0.5)
    # γ = 1, k = 1 gives w = 1 - ᾱ_t (Sec. 3.4).
    np.testing.assert_allclose(make_diffusion(p2_gamma=1.0).p2_weight, 1 - make_diffusion().alphas_cumprod, rtol=1e-12)


@pytest.mark.parametrize(
    "schedule, gamma, mean_weight, quartile_shares",
    [
        ("linear", 0.5, "0.8059", [".118", ".266", ".306", ".310"]),
        ("linear", 1.0, "0.7245", [".063", ".256", ".336", ".345"]),
        ("cosine", 1.0, "0.504", None),
        ("cosine", 0.5, "0.642", None),
    ],
)
def test_mean_weight_and_quartile_shares(schedule, gamma, mean_weight, quartile_shares):
    weights = make_diffusion(schedule=schedule, p2_gamma=gamma).p2_weight
    assert_matches_printed(weights.mean(), mean_weight)
    if quartile_shares:
        shares = weights.reshape(4, 250).sum(axis=1) / weights.sum()
        for share, printed in zip(shares, quartile_shares):
            assert_matches_printed(share, "0" + printed)


def test_snr_crossings():
    snr = make_diffusion().snr
    assert np.argmin(np.abs(np.log(snr))) == 258  # SNR = 1
    assert np.argmin(np.abs(np.log(snr / 1e-2))) == 674  # SNR = 1e-2
    assert (np.diff(snr) < 0).all()


def test_snr_stage_boundaries():
    snr = np.array([1e-3, 1e-2, 0.5, 1.0, 1.01, 1e3])
    np.testing.assert_array_equal(gd.snr_stage(snr), [0, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(gd.snr_stage(torch.from_numpy(snr)).numpy(), [0, 1, 1, 1, 2, 2])


class ZeroModel(torch.nn.Module):
    def __init__(self, out_channels):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, x, t):
        return torch.zeros(x.shape[0], self.out_channels, *x.shape[2:])


def test_zero_output_model_ratio_check():
    """COMPAT §1 acceptance check: weighted/unweighted mse ratios equal 1/(1+SNR_t) for γ = 1, k = 1."""
    diffusion = make_diffusion(p2_gamma=1.0, learn_sigma=True)
    t = torch.tensor([0, 10, 500, 999])
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    terms = diffusion.training_losses(ZeroModel(6), x0, t)
    ratio = (terms["mse"] / terms["mse_raw"]).numpy()
    np.testing.assert_allclose(ratio, [1.0e-4, 2.193e-3, 0.9222, 0.99996], rtol=1e-3)
    np.testing.assert_allclose(ratio, 1 / (1 + diffusion.snr[t.numpy()]), rtol=1e-6)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_gamma_zero_equals_unweighted_hybrid_loss():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 6, 3, padding=1)
    x0 = torch.rand(8, 3, 8, 8) * 2 - 1
    t = torch.randint(0, 1000, (8,))
    noise = torch.randn_like(x0)
    base = make_diffusion(p2_gamma=0.0).training_losses(lambda x, ts: model(x), x0, t, noise=noise)
    assert torch.equal(base["mse"], base["mse_raw"])
    p2 = make_diffusion(p2_gamma=1.0).training_losses(lambda x, ts: model(x), x0, t, noise=noise)
    assert torch.equal(p2["mse_raw"], base["mse_raw"])
    assert torch.equal(p2["vb"], base["vb"])  # the VB term is never weighted
    assert (p2["mse"] < p2["mse_raw"]).all()


def test_vb_trains_only_variance_channels_and_mse_only_mean_channels():
    diffusion = make_diffusion(p2_gamma=1.0, learn_sigma=True)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    t = torch.tensor([0, 3, 400, 900])
    output = torch.randn(4, 6, 8, 8, requires_grad=True)
    terms = diffusion.training_losses(lambda x, ts: output, x0, t)

    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), output, retain_graph=True)
    assert grad_vb[:, :3].abs().sum() == 0 and grad_vb[:, 3:].abs().sum() > 0
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), output)
    assert grad_mse[:, 3:].abs().sum() == 0 and grad_mse[:, :3].abs().sum() > 0


def test_weight_applies_to_xstart_target_too():
    diffusion = make_diffusion(p2_gamma=1.0, learn_sigma=False, mean_type=gd.ModelMeanType.START_X)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    t = torch.tensor([5, 700])
    terms = diffusion.training_losses(ZeroModel(3), x0, t)
    torch.testing.assert_close(terms["mse_raw"], (x0**2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(terms["mse"], terms["mse_raw"] * torch.from_numpy(diffusion.p2_weight[[5, 700]]).float())
    assert "vb" not in terms


@pytest.mark.parametrize("loss_type, factor", [(gd.LossType.KL, 1), (gd.LossType.RESCALED_KL, 1000)])
def test_kl_losses_are_the_scaled_vb(loss_type, factor):
    diffusion = make_diffusion(loss_type=loss_type)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    terms = diffusion.training_losses(ZeroModel(6), x0, torch.tensor([0, 50]))
    torch.testing.assert_close(terms["loss"], terms["vb"] * factor)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(p2_gamma=1.0, loss_type=gd.LossType.RESCALED_KL), "use_kl"),
        (dict(p2_gamma=0.5, loss_type=gd.LossType.KL), "use_kl"),
        (dict(p2_gamma=1.0, p2_k=0.0), "p2_k"),
        (dict(p2_gamma=1.0, p2_k=-1.0), "p2_k"),
        (dict(p2_gamma=-0.5), "p2_gamma"),
        (dict(p2_gamma=float("nan")), "p2_gamma"),
    ],
)
def test_rejects_what_the_reference_silently_accepts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_diffusion(**kwargs)


def test_kl_with_gamma_zero_is_fine():
    make_diffusion(p2_gamma=0.0, loss_type=gd.LossType.RESCALED_KL)


def test_unknown_schedule_name_and_too_few_linear_steps():
    with pytest.raises(ValueError, match="sigmoid"):
        gd.get_named_beta_schedule("sigmoid", 1000)
    with pytest.raises(ValueError, match="diffusion_steps 20"):
        gd.get_named_beta_schedule("linear", 20)


def test_schedules():
    linear = gd.get_named_beta_schedule("linear", 1000)
    assert linear[0] == pytest.approx(1e-4) and linear[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(gd.get_named_beta_schedule("linear", 250), np.linspace(4e-4, 0.08, 250))
    cosine = gd.get_named_beta_schedule("cosine", 1000)
    assert cosine.dtype == np.float64 and cosine.max() <= 0.999
    abar = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(np.cumprod(1 - cosine)[:500], abar(np.arange(1, 501) / 1000) / abar(0), rtol=1e-9)


def test_posterior_quantities():
    diffusion = make_diffusion(steps=100)
    b, a, a_prev = diffusion.betas, diffusion.alphas_cumprod, diffusion.alphas_cumprod_prev
    np.testing.assert_allclose(diffusion.posterior_variance, b * (1 - a_prev) / (1 - a))
    assert diffusion.posterior_log_variance_clipped[0] == diffusion.posterior_log_variance_clipped[1]
    x0, xt = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    t = torch.tensor([0, 1, 99])
    mean, _, _ = diffusion.q_posterior_mean_variance(x0, xt, t)
    c1 = torch.from_numpy(b * np.sqrt(a_prev) / (1 - a))[t].float().view(-1, 1, 1, 1)
    c2 = torch.from_numpy((1 - a_prev) * np.sqrt(1 - b) / (1 - a))[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(mean, c1 * x0 + c2 * xt)
    torch.testing.assert_close(mean[0], x0[0])  # at t = 0 the posterior mean is x0


def test_q_sample_moments():
    torch.manual_seed(0)
    diffusion = make_diffusion()
    x0 = torch.full((20000, 1, 1, 1), 0.5)
    for step in (0, 300, 999):
        xt = diffusion.q_sample(x0, torch.full((20000,), step))
        abar = diffusion.alphas_cumprod[step]
        assert xt.mean().item() == pytest.approx(0.5 * np.sqrt(abar), abs=0.02)
        assert xt.var().item() == pytest.approx(1 - abar, abs=0.03 * max(1 - abar, 1e-3) + 2e-4)


@pytest.mark.parametrize("var_type", list(gd.ModelVarType))
@pytest.mark.parametrize("sampler, eta", [("ancestral", None), ("ddim", 0.0), ("ddim", 1.0)])
def test_samplers_recover_single_data_point(var_type, sampler, eta):
    torch.manual_seed(0)
    learned = var_type in (gd.ModelVarType.LEARNED, gd.ModelVarType.LEARNED_RANGE)
    diffusion = make_diffusion(steps=100, respacing="25", var_type=var_type)
    base = make_diffusion(steps=100)
    x0 = torch.rand(1, 3, 4, 4) * 1.6 - 0.8
    model = OracleEpsModel(x0, base.alphas_cumprod, learn_sigma=learned)
    if sampler == "ancestral":
        out = diffusion.p_sample_loop(model, (2, 3, 4, 4), device="cpu")
    else:
        out = diffusion.ddim_sample_loop(model, (2, 3, 4, 4), device="cpu", eta=eta)
    torch.testing.assert_close(out, x0.expand(2, -1, -1, -1), atol=1e-4, rtol=0)


def test_progressive_yields_every_step_and_uses_noise_fn():
    diffusion = make_diffusion(steps=50, respacing="10", learn_sigma=False)
    model = OracleEpsModel(torch.zeros(1, 3, 4, 4), make_diffusion(steps=50).alphas_cumprod)
    calls = []

    def noise_fn(x):
        calls.append(tuple(x.shape))
        return torch.zeros_like(x)

    steps = list(diffusion.p_sample_loop_progressive(model, (2, 3, 4, 4), device="cpu", noise_fn=noise_fn))
    assert len(steps) == 10 and set(steps[0]) == {"sample", "pred_xstart"}
    assert len(calls) == 11 and calls[0] == (2, 3, 4, 4)  # initial x_T plus one draw per step


def test_ddim_reverse_then_forward_round_trips():
    torch.manual_seed(0)
    diffusion = make_diffusion(steps=100, respacing="ddim20")
    base = make_diffusion(steps=100)
    x0 = torch.rand(1, 3, 4, 4) * 1.6 - 0.8
    model = OracleEpsModel(x0, base.alphas_cumprod, learn_sigma=True)
    x = x0.clone()
    for i in range(diffusion.num_timesteps):
        x = diffusion.ddim_reverse_sample(model, x, torch.tensor([i]), clip_denoised=False)["sample"]
    out = diffusion.ddim_sample_loop(model, x.shape, noise=x, clip_denoised=False)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="eta"):
        diffusion.ddim_reverse_sample(model, x, torch.tensor([0]), eta=0.5)


def test_learned_range_interpolates_between_log_beta_and_posterior():
    diffusion = make_diffusion(steps=100)
    x = torch.zeros(2, 3, 2, 2)
    t = torch.tensor([10, 60])
    for v, table in ((1.0, np.log(diffusion.betas)), (-1.0, diffusion.posterior_log_variance_clipped)):
        output = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=1)
        out = diffusion.p_mean_variance(lambda *a: output, x, t)
        expected = torch.from_numpy(table[t.numpy()]).float().view(-1, 1, 1, 1).expand_as(x)
        torch.testing.assert_close(out["log_variance"], expected)


def test_calc_bpd_loop_shapes_and_total():
    diffusion = make_diffusion(steps=40)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    out = diffusion.calc_bpd_loop(ZeroModel(6), x0)
    assert out["vb"].shape == (2, 40) and out["mse"].shape == (2, 40) and out["xstart_mse"].shape == (2, 40)
    assert torch.isfinite(out["total_bpd"]).all()
    # ADM's column order: column 0 is t = T-1, whose KL is tiny for this zero model; the last column is the
    # t = 0 decoder term, far larger.
    assert (out["vb"][:, -1] > 10 * out["vb"][:, 0]).all()
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(dim=1) + out["prior_bpd"])
    assert (out["prior_bpd"] >= 0).all()


def test_learned_variance_needs_twice_the_channels():
    with pytest.raises(ValueError, match="learn_sigma"):
        make_diffusion().training_losses(ZeroModel(3), torch.zeros(1, 3, 4, 4), torch.tensor([1]))
