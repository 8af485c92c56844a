"""Weight tables and summaries: P2 (docs/compatibility.md, "P2 weighting"; paper Eq. (A)) and the weightings beside
it (docs/weightings.md)."""

import re

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMScheduler
from helpers import assert_matches_printed, make_diffusion
from sample_tiny_model import TINY_MODEL_FLAGS, save_tiny_checkpoint

from guided_diffusion import model_loading
from guided_diffusion.checkpoint import CONFIG_FILE, check_resume_config
from guided_diffusion.gaussian_diffusion import get_named_beta_schedule
from guided_diffusion.resample import LossSecondMomentResampler, UniformSampler
from guided_diffusion.script_util import (
    build_parser,
    create_gaussian_diffusion,
    create_model_and_diffusion,
    diffusion_defaults,
    model_and_diffusion_defaults,
    parse_args,
    sample_defaults,
    train_flag_defaults,
)
from guided_diffusion.weighting import WEIGHTINGS, p2_lambda, vlb_lambda, weight_summary


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


# ---------------------------------------------------------------------------------------------------------------
# The weightings beside P2 (docs/weightings.md): each against its source's own loss, the coincidences between them,
# normalisation, respacing, the flag checks and bit-identity of the default.
# ---------------------------------------------------------------------------------------------------------------

SCHEDULE_TS = [0, 9, 99, 258, 500, 674, 900, 998]


def diffusion_for(schedule="linear", **flags):
    return create_gaussian_diffusion(steps=1000, noise_schedule=schedule, **flags)


def vp_draws(abar, seed=0):
    """x₀, ε, a model's ε̂, x_t and the x̂₀ that ε̂ implies, float64 [len(abar), 3, 4, 4], for the ᾱ at each row."""
    g = torch.Generator().manual_seed(seed)
    shape = (len(abar), 3, 4, 4)
    x0, eps, eps_hat = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    a = torch.as_tensor(abar, dtype=torch.float64).view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    x0_hat = (x_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
    return x0, eps, eps_hat, x_t, x0_hat


def per_sample_mse(a, b):
    return ((a - b) ** 2).mean(dim=(1, 2, 3))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_min_snr_equals_hang_et_al_x0_form_and_the_diffusers_training_scripts(schedule):
    t = np.array(SCHEDULE_TS)
    ours = diffusion_for(schedule, weighting="min_snr", snr_gamma=5.0)
    abar = ours.alphas_cumprod[t]
    x0, eps, eps_hat, _, x0_hat = vp_draws(abar)
    snr = torch.as_tensor(abar / (1 - abar))
    # Hang et al.: min(SNR, γ) times the x₀-MSE is the same loss as our weight times the ε-MSE.
    paper = torch.clamp(snr, max=5.0) * per_sample_mse(x0_hat, x0)
    torch.testing.assert_close(torch.as_tensor(ours.loss_weight[t]) * per_sample_mse(eps_hat, eps), paper,
                               rtol=1e-10, atol=0)
    # diffusers' train_text_to_image.py: compute_snr from the scheduler's ᾱ, then min(snr, γ)/snr for ε-prediction.
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                              beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[schedule])
    alpha = scheduler.alphas_cumprod[t] ** 0.5
    sigma = (1.0 - scheduler.alphas_cumprod[t]) ** 0.5
    diffusers_snr = (alpha / sigma) ** 2
    mse_loss_weights = torch.stack([diffusers_snr, 5.0 * torch.ones_like(diffusers_snr)], dim=1).min(dim=1)[0]
    mse_loss_weights = mse_loss_weights / diffusers_snr
    # diffusers keeps ᾱ in float32, where 1 - ᾱ = 1e-4 at t = 0 has about 4 correct digits.
    np.testing.assert_allclose(ours.loss_weight[t], mse_loss_weights.double().numpy(), rtol=1e-3)
    assert ours.loss_weight[t[-1]] == 1.0 and ours.loss_weight[0] < 1e-3


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_soft_min_snr_and_edm_equal_their_losses_on_the_karras_preconditioned_network(schedule, sigma_data):
    """k-diffusion's soft-min-snr (HDiT) weights the loss of F, EDM's λ(σ) that of D; both with x = x₀ + σ·n."""
    t = np.array(SCHEDULE_TS)
    soft = diffusion_for(schedule, weighting="soft_min_snr", sigma_data=sigma_data)
    edm = diffusion_for(schedule, weighting="edm", sigma_data=sigma_data)
    abar = soft.alphas_cumprod[t]
    x0, eps, eps_hat, x_t, x0_hat = vp_draws(abar, seed=1)
    sigma = torch.as_tensor(np.sqrt((1 - abar) / abar)).view(-1, 1, 1, 1)
    x = x_t / torch.as_tensor(np.sqrt(abar)).view(-1, 1, 1, 1)  # the VE view: x₀ + σ ε
    torch.testing.assert_close(x, x0 + sigma * eps, rtol=1e-12, atol=1e-12)
    s, sd = sigma.flatten(), sigma_data
    c_skip = (sd**2 / (sigma**2 + sd**2))
    c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
    f_loss = per_sample_mse((x0_hat - c_skip * x) / c_out, (x0 - c_skip * x) / c_out)
    hdit = (s * sd) ** 2 / (s**2 + sd**2) ** 2 * f_loss
    eps_mse = per_sample_mse(eps_hat, eps)
    torch.testing.assert_close(torch.as_tensor(soft.loss_weight[t]) * eps_mse, hdit, rtol=1e-9, atol=0)
    karras = (s**2 + sd**2) / (s * sd) ** 2 * per_sample_mse(x0_hat, x0)
    torch.testing.assert_close(torch.as_tensor(edm.loss_weight[t]) * eps_mse, karras, rtol=1e-9, atol=0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("bias", [-3.0, 0.0, 2.0])
def test_sigmoid_is_the_logistic_of_bias_minus_log_snr(schedule, bias):
    t = np.array(SCHEDULE_TS)
    ours = diffusion_for(schedule, weighting="sigmoid", sigmoid_bias=bias)
    abar = torch.as_tensor(ours.alphas_cumprod[t])
    log_snr = torch.log(abar) - torch.log1p(-abar)
    torch.testing.assert_close(torch.as_tensor(ours.loss_weight[t]), torch.sigmoid(bias - log_snr), rtol=1e-12,
                               atol=0)
    # The weight falls as the SNR rises, i.e. it grows with t.
    assert np.all(np.diff(ours.loss_weight) >= 0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_coincidences_stated_in_the_docs(schedule):
    def table(**flags):
        return diffusion_for(schedule, **flags).loss_weight

    p2 = table(p2_gamma=1.0, p2_k=1.0)
    np.testing.assert_allclose(table(weighting="sigmoid", sigmoid_bias=0.0), p2, rtol=1e-12)
    np.testing.assert_allclose(table(weighting="soft_min_snr", sigma_data=1.0), p2, rtol=1e-12)
    for bias in (-3.0, 2.0):  # sigmoid(b) = e^b · P2(γ = 1, k = e^b)
        np.testing.assert_allclose(table(weighting="sigmoid", sigmoid_bias=bias),
                                   np.exp(bias) * table(p2_gamma=1.0, p2_k=np.exp(bias)), rtol=1e-12)
    for sd in (0.5, 2.0):  # soft-min-SNR(σ_d) = σ_d⁻² · P2(γ = 1, k = σ_d⁻²) = sigmoid(b = -2 ln σ_d)
        soft = table(weighting="soft_min_snr", sigma_data=sd)
        np.testing.assert_allclose(soft, sd**-2 * table(p2_gamma=1.0, p2_k=sd**-2), rtol=1e-12)
        np.testing.assert_allclose(soft, table(weighting="sigmoid", sigmoid_bias=-2 * np.log(sd)), rtol=1e-12)
        # ... and a soft minimum of SNR and γ = σ_d⁻²: between half and all of min-SNR-γ's weight.
        hard = table(weighting="min_snr", snr_gamma=sd**-2)
        assert np.all(soft <= hard) and np.all(hard <= 2 * soft)
    # Normalised, schemes that agree up to a constant are the same table.
    np.testing.assert_allclose(table(weighting="soft_min_snr", sigma_data=0.5, normalize_weights=True),
                               table(p2_gamma=1.0, p2_k=4.0, normalize_weights=True), rtol=1e-12)
    # EDM with σ_d = 1 is 1 + 1/SNR = 1/ᾱ: the ε-MSE weight of the v-prediction loss.
    diffusion = diffusion_for(schedule, weighting="edm", sigma_data=1.0)
    np.testing.assert_allclose(diffusion.loss_weight, 1 / diffusion.alphas_cumprod, rtol=1e-12)
    # Constant weights: P2 with γ = 0, constant, and min-SNR once γ reaches the largest SNR.
    ones = np.ones(1000)
    np.testing.assert_array_equal(table(), ones)
    np.testing.assert_array_equal(table(weighting="constant"), ones)
    np.testing.assert_array_equal(table(weighting="min_snr", snr_gamma=float(diffusion.snr.max())), ones)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_normalised_weights_average_one_under_both_timestep_samplers(weighting):
    raw = diffusion_for(weighting=weighting)
    diffusion = diffusion_for(weighting=weighting, normalize_weights=True)
    w = diffusion.loss_weight
    assert abs(w.mean() - 1) < 1e-12
    np.testing.assert_allclose(w, raw.loss_weight / raw.loss_weight.mean(), rtol=1e-12)
    assert diffusion.loss_weight_scale == pytest.approx(1 / raw.loss_weight.mean(), rel=1e-12)
    # The loss-second-moment sampler draws t with p_t and multiplies the loss by 1/(T p_t): the expected weight of
    # the ε-MSE is again the plain mean over t, whatever p is.
    sampler = LossSecondMomentResampler(diffusion)
    t = torch.arange(1000).repeat(10)
    sampler.update_with_all_losses(t, torch.as_tensor(np.exp(-t.numpy() / 200.0)))
    p = sampler.weights().numpy()
    p = p / p.sum()
    assert p.max() / p.min() > 50  # far from uniform
    assert abs(np.sum(p * w / (1000 * p)) - 1) < 1e-12
    torch.manual_seed(0)
    drawn, importance = sampler.sample(200_000, "cpu")
    effective = torch.as_tensor(w)[drawn] * importance.double()
    assert abs(effective.mean().item() - 1) < 4 * effective.std().item() / 200_000**0.5
    drawn, importance = UniformSampler(diffusion).sample(200_000, "cpu")
    assert torch.equal(importance, torch.ones(200_000))


@pytest.mark.parametrize("spec", ["250", "ddim25", "10,5,3"])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_respaced_diffusion_carries_the_weights_of_its_original_timesteps(spec, weighting):
    base = diffusion_for(weighting=weighting, p2_gamma=0.5 if weighting == "p2" else 0.0)
    spaced = create_gaussian_diffusion(steps=1000, timestep_respacing=spec, weighting=weighting,
                                       p2_gamma=0.5 if weighting == "p2" else 0.0)
    np.testing.assert_array_equal(spaced.loss_weight, base.loss_weight[spaced.timestep_map])
    # Normalised over the timesteps this diffusion draws: its own steps.
    normalised = create_gaussian_diffusion(steps=1000, timestep_respacing=spec, weighting=weighting,
                                           p2_gamma=0.5 if weighting == "p2" else 0.0, normalize_weights=True)
    assert abs(normalised.loss_weight.mean() - 1) < 1e-12
    np.testing.assert_allclose(normalised.loss_weight * base.loss_weight[spaced.timestep_map].mean(),
                               base.loss_weight[spaced.timestep_map], rtol=1e-12)


def small_model_and_batch(**flags):
    torch.manual_seed(0)
    settings = {**model_and_diffusion_defaults(), "image_size": 16, "num_channels": 32, "num_res_blocks": 1,
                "channel_mult": "1,2", "attention_resolutions": "8", **flags}
    model, diffusion = create_model_and_diffusion(**settings)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 9, 250, 500, 777, 999])
    return diffusion.training_losses(model, x0, t, noise=noise), t, diffusion


@pytest.mark.parametrize("flags", [
    {},
    {"weighting": "p2", "p2_gamma": 0.0},
    {"p2_gamma": 1.0, "learn_sigma": True, "rescale_learned_sigmas": True},
    {"weighting": "p2", "p2_gamma": 0.5, "p2_k": 2.0, "noise_schedule": "cosine"},
])
def test_p2_flags_give_the_losses_of_the_code_before_the_other_weightings(flags):
    """The loss is mse_raw times float32((k + SNR_t)^-γ) (plus the unweighted vb), bit for bit, with SNR_t from the
    betas as the code before the other weightings computed it."""
    terms, t, diffusion = small_model_and_batch(**flags)
    betas = get_named_beta_schedule(flags.get("noise_schedule", "linear"), 1000)
    alphas_cumprod = np.cumprod(1.0 - betas)
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    table = (flags.get("p2_k", 1.0) + snr) ** -flags.get("p2_gamma", 0.0)
    np.testing.assert_array_equal(diffusion.loss_weight, table)  # float64, bit for bit
    factor = torch.as_tensor(table)[t].float()
    expected = factor * terms["mse_raw"] + terms.get("vb", 0.0)
    assert torch.equal(terms["loss"], expected)
    if not flags.get("p2_gamma"):
        assert torch.equal(terms["loss"], terms["mse_raw"])


def test_other_weightings_weight_only_the_mse_and_scale_it_by_the_table():
    base, t, _ = small_model_and_batch(learn_sigma=True, rescale_learned_sigmas=True)
    for weighting in ("min_snr", "soft_min_snr", "sigmoid", "edm"):
        terms, _, _ = small_model_and_batch(learn_sigma=True, rescale_learned_sigmas=True, weighting=weighting,
                                         normalize_weights=True)
        table = diffusion_for(weighting=weighting, normalize_weights=True).loss_weight
        assert torch.equal(terms["mse_raw"], base["mse_raw"]) and torch.equal(terms["vb"], base["vb"])
        assert torch.equal(terms["loss"], torch.as_tensor(table)[t].float() * base["mse_raw"] + base["vb"])


@pytest.mark.parametrize("flags, message", [
    ({"weighting": "min-snr"}, "--weighting 'min-snr' is unknown; use one of " + ", ".join(WEIGHTINGS)),
    ({"weighting": "min_snr", "snr_gamma": 0.0}, "--snr_gamma must be a finite number > 0"),
    ({"weighting": "min_snr", "snr_gamma": float("nan")}, "--snr_gamma must be a finite number > 0"),
    ({"weighting": "edm", "sigma_data": -0.5}, "--sigma_data must be a finite number > 0"),
    ({"weighting": "sigmoid", "sigmoid_bias": float("inf")}, "--sigmoid_bias must be a finite number"),
    ({"weighting": "min_snr", "use_kl": True}, "--weighting min_snr has no effect with --use_kl True"),
    ({"normalize_weights": True, "use_kl": True}, "--normalize_weights True has no effect with --use_kl True"),
    ({"p2_gamma": 1.0, "use_kl": True}, "--p2_gamma 1.0 has no effect with --use_kl True"),
    ({"weighting": "min_snr", "p2_gamma": 1.0}, "--p2_gamma 1.0 only applies to --weighting p2, not min_snr"),
    ({"weighting": "sigmoid", "predict_xstart": True}, "--weighting sigmoid is defined on the ε-MSE"),
])
def test_bad_weighting_flags_are_named(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        create_gaussian_diffusion(**flags)


def test_weightings_without_effect_on_a_kl_or_x0_loss_are_allowed_where_they_are_constant():
    create_gaussian_diffusion(weighting="constant", use_kl=True)
    create_gaussian_diffusion(weighting="p2", use_kl=True)
    create_gaussian_diffusion(weighting="constant", predict_xstart=True, normalize_weights=True)
    create_gaussian_diffusion(p2_gamma=1.0, predict_xstart=True, normalize_weights=True)


def test_config_files_take_the_weighting_flags(tmp_path):
    config = tmp_path / "weights.yaml"
    config.write_text("weighting: soft_min_snr\nsigma_data: 0.25\nnormalize_weights: true\n")
    parser = build_parser(model_and_diffusion_defaults(), "test")
    args = parse_args(parser, ["--config", str(config), "--noise_schedule", "cosine"])
    diffusion = create_gaussian_diffusion(
        steps=args.diffusion_steps, **{k: getattr(args, k) for k in diffusion_defaults() if k != "diffusion_steps"})
    assert diffusion.loss_weighting.name == "soft_min_snr" and diffusion.loss_weighting.sigma_data == 0.25
    assert abs(diffusion.loss_weight.mean() - 1) < 1e-12
    config.write_text("weighting: sigmoid\nsigmoid_bias: high\n")
    with pytest.raises(ValueError, match="sigmoid_bias: 'high' is not a valid float"):
        parse_args(parser, ["--config", str(config)])


WEIGHTING_FLAGS = ("weighting", "snr_gamma", "sigmoid_bias", "sigma_data", "normalize_weights")


def test_a_config_saved_before_the_weighting_flags_loads_with_its_p2_weighting(tmp_path):
    save_tiny_checkpoint(str(tmp_path / "ema_0.99_000010.pt"))
    old = {k: v for k, v in {**train_flag_defaults(), **TINY_MODEL_FLAGS, "p2_gamma": 1.0}.items()
           if k not in WEIGHTING_FLAGS}
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(old))
    parser = model_loading.checkpoint_parser("test", sample_defaults())
    args = model_loading.parse_checkpoint_args(parser, ["--model_path", str(tmp_path / "ema_0.99_000010.pt")])
    _, diffusion, _ = model_loading.load_model_and_diffusion(args)
    assert (diffusion.loss_weighting.name, diffusion.p2_gamma, diffusion.loss_weighting.normalize) == ("p2", 1.0, False)
    np.testing.assert_array_equal(diffusion.loss_weight, diffusion.p2_weight)
    # A resume with the defaults of the new flags is the run it was.
    now = {**old, **{k: diffusion_defaults()[k] for k in WEIGHTING_FLAGS}}
    defaults = train_flag_defaults()
    assert check_resume_config(old, now, frozenset(), source="state000010.pt", step=10, defaults=defaults) == []
    # ... and one with another weighting is refused, though the old config never named one.
    with pytest.raises(ValueError, match="--weighting 'p2' in the checkpoint vs 'min_snr' now"):
        check_resume_config(old, {**now, "weighting": "min_snr", "p2_gamma": 0.0}, frozenset(),
                            source="state000010.pt", step=10, defaults=defaults)
