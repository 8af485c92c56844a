"""The diffusion process, its samplers and P2 weighting, against the paper, closed forms and the numbers of
docs/compatibility.md ("P2 weighting", "Diffusion process", "Samplers")."""

import functools

import numpy as np
import pytest
import torch

from guided_diffusion import gaussian_diffusion as gd
from helpers import assert_matches_printed, make_diffusion

# docs/compatibility.md, "P2 weighting", verified values (linear schedule, T = 1000, k = 1):
# t, ᾱ_t, SNR_t, w(γ=0.5), w(γ=1).
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


@pytest.mark.parametrize("t, alpha_bar", [(row[0], row[1]) for row in WEIGHT_TABLE])
def test_weights_are_float64_and_follow_eq8_for_other_k(t, alpha_bar):
    """k = 2, γ = 0.5: (2 + ᾱ/(1-ᾱ))^-0.5 = √((1-ᾱ)/(2-ᾱ)), evaluated at the printed ᾱ_t."""
    diffusion = make_diffusion(p2_gamma=0.5, p2_k=2.0)
    assert diffusion.snr.dtype == np.float64 and diffusion.p2_weight.dtype == np.float64
    abar = float(alpha_bar)
    assert diffusion.p2_weight[t] == pytest.approx(np.sqrt((1 - abar) / (2 - abar)), rel=2e-4)
    # γ = 1, k = 1 gives w = 1 - ᾱ_t (Sec. 3.4).
    assert make_diffusion(p2_gamma=1.0).p2_weight[t] == pytest.approx(1 - abar, rel=2e-4, abs=1e-6)


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
    """docs/compatibility.md, "P2 weighting", acceptance check: weighted/unweighted mse ratios for γ = 1, k = 1."""
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
    """With --predict_xstart a zero model's raw mse is mean(x0²), weighted by the printed w(γ=1) at t = 9, 699."""
    diffusion = make_diffusion(p2_gamma=1.0, learn_sigma=False, mean_type=gd.ModelMeanType.START_X)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    terms = diffusion.training_losses(ZeroModel(3), x0, torch.tensor([9, 699]))
    torch.testing.assert_close(terms["mse_raw"], (x0**2).mean(dim=(1, 2, 3)))
    ratio = (terms["mse"] / terms["mse_raw"]).tolist()
    assert_matches_printed(ratio[0], "1.89e-3")
    assert_matches_printed(ratio[1], "0.9930")
    assert "vb" not in terms


@pytest.mark.parametrize("steps", [100, 1000])
def test_use_kl_loss_is_the_vb_times_t(steps):
    diffusion = make_diffusion(steps=steps, loss_type=gd.LossType.RESCALED_KL)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    terms = diffusion.training_losses(ZeroModel(6), x0, torch.tensor([0, 50]))
    assert set(terms) == {"loss", "vb"}
    torch.testing.assert_close(terms["loss"], terms["vb"] * steps)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(p2_gamma=1.0, loss_type=gd.LossType.RESCALED_KL), "use_kl"),
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


def test_posterior_matches_gaussian_conditioning():
    """q(x_{t-1} | x_t, x0) against the conditional of the joint Gaussian of (x_{t-1}, x_t) given x0."""
    diffusion = make_diffusion()
    abar = LINEAR_ALPHAS_CUMPROD
    abar_prev = np.append(1.0, abar[:-1])
    gain, _, variance = _gaussian_conditional(abar, abar_prev, 0.0)
    np.testing.assert_allclose(diffusion.posterior_variance, variance, rtol=1e-6, atol=1e-12)
    assert diffusion.posterior_variance[0] == 0
    assert diffusion.posterior_log_variance_clipped[0] == diffusion.posterior_log_variance_clipped[1]
    x0, xt = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    t = torch.tensor([0, 1, 999])
    mean, _, _ = diffusion.q_posterior_mean_variance(x0, xt, t)
    for row, step in enumerate(t.tolist()):
        x0_gain = np.sqrt(abar_prev[step]) - gain[step] * np.sqrt(abar[step])  # B = x0_gain · x0 for data at x0
        torch.testing.assert_close(mean[row], float(x0_gain) * x0[row] + float(gain[step]) * xt[row])
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


# ᾱ of the linear schedule at T = 1000 from its definition (Ho et al.): β_t linear from 1e-4 to 0.02.
LINEAR_ALPHAS_CUMPROD = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
# Gaussian data, one distribution per channel: x0[:, c] ~ N(DATA_MEAN[c], DATA_STD[c]²).
DATA_MEAN = np.array([-0.4, 0.1, 0.5])
DATA_STD = np.array([0.2, 0.35, 0.5])
FIXED_LARGE, FIXED_SMALL, LEARNED_RANGE = (
    gd.ModelVarType.FIXED_LARGE,
    gd.ModelVarType.FIXED_SMALL,
    gd.ModelVarType.LEARNED_RANGE,
)


def _per_channel(values):
    """[C] numbers -> [1, C, 1, 1] float32 tensor."""
    return torch.as_tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


class GaussianDataEpsModel(torch.nn.Module):
    """The exact ε-predictor for the Gaussian data above (no network): with x_t = √ᾱ x0 + √(1-ᾱ) ε,
    E[ε | x_t] = √(1-ᾱ)(x_t - √ᾱ μ)/(ᾱ s² + 1 - ᾱ). It receives original timesteps (0..999).

    :param variance_output: the value of the v channels of a learned variance, or None for a fixed one.
    """

    def __init__(self, variance_output=None):
        super().__init__()
        self.variance_output = variance_output
        self.seen_timesteps = []

    def forward(self, x_t, t):
        self.seen_timesteps.append(int(t[0]))
        abar = torch.from_numpy(LINEAR_ALPHAS_CUMPROD)[t].float().view(-1, 1, 1, 1)
        mean, var = _per_channel(DATA_MEAN), _per_channel(DATA_STD**2)
        eps = (1 - abar).sqrt() * (x_t - abar.sqrt() * mean) / (abar * var + 1 - abar)
        if self.variance_output is None:
            return eps
        return torch.cat([eps, torch.full_like(eps, self.variance_output)], dim=1)


def _gaussian_conditional(abar, abar_prev, data_var, data_mean=0.0):
    """x_{t-1} given x_t under the forward process, for data x0 ~ N(data_mean, data_var), by conditioning the
    joint Gaussian of (x_{t-1}, x_t): E[x_{t-1} | x_t] = A x_t + B and Var[x_{t-1} | x_t] = V.

    abar_prev = 1 gives x0 given x_t; data_var = 0 (data_mean = x0) gives q(x_{t-1} | x_t, x0), whose V is the
    posterior variance β̃_t.
    :return: (A, B, V), numpy arrays broadcast over the arguments.
    """
    var_prev = abar_prev * data_var + 1 - abar_prev
    cov = np.sqrt(abar / abar_prev) * var_prev
    var_t = abar * data_var + 1 - abar
    gain = cov / var_t
    return gain, np.sqrt(abar_prev) * data_mean - gain * np.sqrt(abar) * data_mean, var_prev - cov**2 / var_t


def _step_coefficients(abars, j, sampler, var_type=None, v=None, eta=None):
    """One sampler step at index j on the Gaussian data, in closed form: x_{j-1} = A x_j + B + √(noise_var) z.

    Ancestral steps: the mean is E[x_{j-1} | x_j]; the variance is β_j (FIXED_LARGE), β̃_j (FIXED_SMALL) or
    β_j^f β̃_j^(1-f) with f = (v+1)/2 (LEARNED_RANGE). DDIM steps (Song et al., Eq. (12)):
    √ᾱ_{j-1} x̂0 + √(1 - ᾱ_{j-1} - σ²) ε̂ with x̂0 = E[x0 | x_j], ε̂ = E[ε | x_j] and σ² = η² β̃_j.
    No noise at j = 0. :return: (A, B, noise_var), each [C].
    """
    abar, abar_prev = abars[j], abars[j - 1] if j else 1.0
    beta = 1 - abar / abar_prev
    posterior_variance = _gaussian_conditional(abar, abar_prev, 0.0)[2]
    data_var = DATA_STD**2
    if sampler == "ancestral":
        gain, offset, _ = _gaussian_conditional(abar, abar_prev, data_var, DATA_MEAN)
        frac = {FIXED_LARGE: 1.0, FIXED_SMALL: 0.0}.get(var_type, None if v is None else (v + 1) / 2)
        noise_var = beta**frac * posterior_variance ** (1 - frac)
    else:
        xstart_gain, xstart_offset, _ = _gaussian_conditional(abar, 1.0, data_var, DATA_MEAN)
        eps_gain = np.sqrt(1 - abar) / (abar * data_var + 1 - abar)  # E[ε | x_t] = eps_gain (x_t - √ᾱ μ)
        noise_var = eta**2 * posterior_variance
        eps_coef = np.sqrt(1 - abar_prev - noise_var)
        gain = np.sqrt(abar_prev) * xstart_gain + eps_coef * eps_gain
        offset = np.sqrt(abar_prev) * xstart_offset - eps_coef * eps_gain * np.sqrt(abar) * DATA_MEAN
    return gain, offset, noise_var * (j != 0)


SAMPLER_CASES = [
    ("ancestral", FIXED_LARGE, None, None),
    ("ancestral", FIXED_SMALL, None, None),
    ("ancestral", LEARNED_RANGE, 0.0, None),
    ("ancestral", LEARNED_RANGE, 0.5, None),
    ("ddim", FIXED_LARGE, None, 0.0),
    ("ddim", LEARNED_RANGE, 0.5, 1.0),  # DDIM ignores a learned variance
]


def _step_fn(diffusion, sampler, eta):
    if sampler == "ancestral":
        return diffusion.p_sample
    return functools.partial(diffusion.ddim_sample, eta=eta)


@pytest.mark.parametrize("sampler, var_type, v, eta", SAMPLER_CASES)
def test_one_step_has_the_closed_form_mean_and_noise_scale(sampler, var_type, v, eta):
    diffusion = make_diffusion(respacing="50", var_type=var_type)
    abars = LINEAR_ALPHAS_CUMPROD[diffusion.timestep_map]
    model = GaussianDataEpsModel(v if var_type == LEARNED_RANGE else None)
    step = _step_fn(diffusion, sampler, eta)
    x_t = torch.linspace(-1.5, 1.5, 12).view(1, 3, 2, 2).repeat(4, 1, 1, 1)
    t = torch.tensor([0, 1, 25, 49])
    without_noise = step(model, x_t, t, clip_denoised=False, noise_fn=torch.zeros_like)["sample"]
    unit_noise = step(model, x_t, t, clip_denoised=False, noise_fn=torch.ones_like)["sample"]
    for row, j in enumerate(t.tolist()):
        gain, offset, noise_var = _step_coefficients(abars, j, sampler, var_type, v, eta)
        expected_mean = _per_channel(gain) * x_t[row] + _per_channel(offset)
        torch.testing.assert_close(without_noise[row], expected_mean[0], rtol=1e-4, atol=1e-5)
        noise_scale = (unit_noise - without_noise)[row]
        expected_scale = _per_channel(np.sqrt(noise_var))[0].expand_as(noise_scale)
        torch.testing.assert_close(noise_scale, expected_scale, rtol=1e-4, atol=1e-6)


def _chain_moments(abars, **step_options):
    """Per-channel mean and variance of x_0 after the closed-form steps j = T'-1..0 from x_T ~ N(0, I)."""
    mean, var = np.zeros(3), np.ones(3)
    for j in reversed(range(len(abars))):
        gain, offset, noise_var = _step_coefficients(abars, j, **step_options)
        mean, var = gain * mean + offset, gain**2 * var + noise_var
    return mean, var


LOOP_CASES = [case for case in SAMPLER_CASES if case[2] != 0.5] + [("ddim", FIXED_LARGE, None, 1.0)]


@pytest.mark.parametrize("sampler, var_type, v, eta", LOOP_CASES)
def test_sampling_loops_draw_the_data_distribution(sampler, var_type, v, eta):
    """4000 samples of Gaussian data through 50 respaced steps: the final mean and std per channel are those of the
    closed-form chain, within 5 standard errors, and that chain is close to the data's (μ, s)."""
    torch.manual_seed(0)
    diffusion = make_diffusion(respacing="50", var_type=var_type)
    abars = LINEAR_ALPHAS_CUMPROD[diffusion.timestep_map]
    model = GaussianDataEpsModel(v if var_type == LEARNED_RANGE else None)
    loop = diffusion.p_sample_loop if sampler == "ancestral" else functools.partial(diffusion.ddim_sample_loop, eta=eta)
    samples = loop(model, (4000, 3, 2, 2), device="cpu", clip_denoised=False).double()

    mean, var = _chain_moments(abars, sampler=sampler, var_type=var_type, v=v, eta=eta)
    np.testing.assert_allclose(mean, DATA_MEAN, atol=0.01)  # the chain is a fair discretisation of the data
    np.testing.assert_allclose(np.sqrt(var), DATA_STD, rtol=0.25)
    count = samples[:, 0].numel()
    assert (np.abs(samples.mean(dim=(0, 2, 3)).numpy() - mean) < 5 * np.sqrt(var / count)).all()
    assert (np.abs(samples.std(dim=(0, 2, 3)).numpy() / np.sqrt(var) - 1) < 5 / np.sqrt(2 * count)).all()


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_progressive_loops_visit_every_step_once_in_order(sampler):
    diffusion = make_diffusion(respacing="10", learn_sigma=False)
    model = GaussianDataEpsModel()
    calls = []

    def noise_fn(x):
        calls.append(tuple(x.shape))
        return torch.randn_like(x)

    progressive = diffusion.ddim_sample_loop_progressive if sampler == "ddim" else diffusion.p_sample_loop_progressive
    steps = list(progressive(model, (2, 3, 4, 4), device="cpu", noise_fn=noise_fn, progress=True))
    assert len(steps) == 10 and all(set(step) == {"sample", "pred_xstart"} for step in steps)
    assert model.seen_timesteps == sorted(diffusion.timestep_map, reverse=True)
    # x_T, then one draw per ancestral step (t = 0 included, so per-sample streams stay aligned); DDIM with
    # η = 0 draws nothing after x_T.
    assert calls == [(2, 3, 4, 4)] * (11 if sampler == "ancestral" else 1)
    with pytest.raises(ValueError, match="noise"):
        next(progressive(model, (2, 3, 4, 4)))


def test_ddim_reverse_step_is_the_closed_form_and_round_trips():
    # DDIM inversion is exact only in the limit of small steps (its error is first order in the step size:
    # 0.18 at 50 steps, 0.04 at 250 on this data), hence 250 steps.
    diffusion = make_diffusion(respacing="250", learn_sigma=False)
    abars = LINEAR_ALPHAS_CUMPROD[diffusion.timestep_map]
    model = GaussianDataEpsModel()
    torch.manual_seed(0)
    x0 = _per_channel(DATA_MEAN) + _per_channel(DATA_STD) * torch.randn(16, 3, 2, 2)
    x = x0
    for j in range(diffusion.num_timesteps - 1):
        x_next = diffusion.ddim_reverse_sample(model, x, torch.full((16,), j), clip_denoised=False)["sample"]
        # x_{t+1} = √ᾱ_{t+1} x̂0 + √(1-ᾱ_{t+1}) ε̂ with x̂0 = E[x0 | x_t] and ε̂ = E[ε | x_t] (Song et al.).
        xstart_gain, xstart_offset, _ = _gaussian_conditional(abars[j], 1.0, DATA_STD**2, DATA_MEAN)
        xstart = _per_channel(xstart_gain) * x + _per_channel(xstart_offset)
        eps = (1 - abars[j]) ** 0.5 * (x - abars[j] ** 0.5 * _per_channel(DATA_MEAN)) / _per_channel(
            abars[j] * DATA_STD**2 + 1 - abars[j]
        )
        torch.testing.assert_close(x_next, abars[j + 1] ** 0.5 * xstart + (1 - abars[j + 1]) ** 0.5 * eps)
        x = x_next
    assert (x - x0).abs().mean() > 0.5  # x_T is far from the data ...
    out = diffusion.ddim_sample_loop(model, x.shape, noise=x, clip_denoised=False)
    torch.testing.assert_close(out, x0, atol=0.05, rtol=0)  # ... and deterministic DDIM brings it back
    with pytest.raises(ValueError, match="eta"):
        diffusion.ddim_reverse_sample(model, x, torch.tensor([0]), eta=0.5)

def test_learned_range_interpolates_between_log_beta_and_posterior():
    diffusion = make_diffusion(steps=100)
    t = np.array([10, 60])
    betas = np.linspace(1e-3, 0.2, 100)[t]  # the linear schedule scaled to T = 100
    abar = np.cumprod(1 - np.linspace(1e-3, 0.2, 100))
    posterior_variance = _gaussian_conditional(abar[t], abar[t - 1], 0.0)[2]
    x = torch.zeros(2, 3, 2, 2)
    for v, variance in ((1.0, betas), (-1.0, posterior_variance), (0.0, np.sqrt(betas * posterior_variance))):
        output = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=1)
        out = diffusion.p_mean_variance(lambda *a: output, x, torch.from_numpy(t))
        expected = torch.from_numpy(np.log(variance)).float().view(-1, 1, 1, 1).expand_as(x)
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
    # Prior term: KL(N(√ᾱ_T x0, 1-ᾱ_T) || N(0, 1)) = ½(ᾱ_T x0² - ᾱ_T - log(1-ᾱ_T)) per dimension, in bits.
    abar = np.prod(1 - np.linspace(25e-4, 0.5, 40))  # the linear schedule scaled to T = 40
    prior = 0.5 * (abar * x0.double() ** 2 - abar - np.log(1 - abar)).mean(dim=(1, 2, 3)) / np.log(2)
    torch.testing.assert_close(out["prior_bpd"].double(), prior, rtol=1e-4, atol=1e-9)


def test_learned_variance_needs_twice_the_channels():
    with pytest.raises(ValueError, match="learn_sigma"):
        make_diffusion().training_losses(ZeroModel(3), torch.zeros(1, 3, 4, 4), torch.tensor([1]))
