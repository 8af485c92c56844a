"""Few-step samplers (guided_diffusion/ode_samplers.py) on a closed-form ε-model, against diffusers'
DPMSolverMultistepScheduler and against EDM's Algorithms 1 and 2 written out here; exact network-evaluation counts;
per-seed noise that does not depend on the batch."""

import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from helpers import make_diffusion
from sample_tiny_model import perturb_, tiny_model_and_diffusion

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.analysis import CountingNetwork
from guided_diffusion.ode_samplers import (
    SAMPLERS,
    STEP_SCHEDULES,
    HeunChurn,
    NoiseLevels,
    network_evaluations,
    sample_loop,
    sample_loop_progressive,
    step_sigmas,
)
from guided_diffusion.sampling import SamplingOptions, generate_batch

DATA_MEAN, DATA_STD = 0.3, 0.5  # the data: every pixel independently N(0.3, 0.5²)


def log_sigma_table(diffusion):
    """log σ_j = ½·log((1 - ᾱ_j)/ᾱ_j) of the diffusion's own table, written out independently of the module."""
    alphas_cumprod = np.asarray(diffusion.alphas_cumprod)
    return 0.5 * np.log((1 - alphas_cumprod) / alphas_cumprod)


class GaussianDataEps(torch.nn.Module):
    """The exact ε-prediction E[ε | x_t] for the Gaussian data, as a network of the (un-respaced) diffusion: it takes
    VP x_t and a (fractional) timestep t, whose σ is log-interpolated between the trained timesteps.

    With x̃ = x_t/α = x_0 + σ·ε: E[x_0 | x̃] = μ + s²/(s² + σ²)·(x̃ - μ), so E[ε | x̃] = σ·(x̃ - μ)/(s² + σ²).
    :param extra: optional network whose output (tanh, scaled by 0.1) is added to ε; its last C channels are
        passed on as the variance channels of a learned-variance model.
    """

    def __init__(self, diffusion, learn_sigma=False, extra=None):
        super().__init__()
        self.log_sigmas = log_sigma_table(diffusion)
        self.learn_sigma = learn_sigma
        self.extra = extra

    def forward(self, x, t):
        timesteps = t.detach().cpu().double().numpy()
        sigma = torch.from_numpy(np.exp(np.interp(timesteps, np.arange(len(self.log_sigmas)), self.log_sigmas)))
        sigma = sigma.to(x.dtype).view(-1, 1, 1, 1)
        x_tilde = x * torch.sqrt(1 + sigma**2)
        eps = sigma * (x_tilde - DATA_MEAN) / (DATA_STD**2 + sigma**2)
        if self.extra is not None:
            out = self.extra(x, t)
            return torch.cat([eps + 0.1 * torch.tanh(out[:, :3]), out[:, 3:]], dim=1)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1) if self.learn_sigma else eps


def exact_ode_solution(x_tilde_start, sigma_start, sigma):
    """The probability-flow ODE dx̃/dσ = E[ε | x̃] for the Gaussian data, solved: x̃ - μ grows like √(s² + σ²)."""
    return DATA_MEAN + (x_tilde_start - DATA_MEAN) * math.sqrt((DATA_STD**2 + sigma**2) / (DATA_STD**2 +
                                                                                            sigma_start**2))


@pytest.fixture(scope="module")
def linear_1000():
    return make_diffusion(steps=1000, learn_sigma=False)


@pytest.mark.parametrize("sampler", ["dpm++2m", "heun"])
@pytest.mark.parametrize("schedule", STEP_SCHEDULES)
def test_error_to_the_exact_ode_solution_shrinks_at_second_order(linear_1000, sampler, schedule):
    model = GaussianDataEps(linear_1000)
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    step_counts = [32, 64, 128, 256]
    errors = []
    for steps in step_counts:
        trajectory = list(sample_loop_progressive(model, linear_1000, sampler, steps, x_T, step_schedule=schedule,
                                                  clip_denoised=False))
        at_sigma_min = trajectory[-2]  # the last step only denoises (σ_min -> 0): the ODE ends at σ_min
        sigma_max, sigma_min = math.exp(log_sigma_table(linear_1000)[-1]), at_sigma_min["sigma"]
        assert sigma_min == pytest.approx(math.exp(log_sigma_table(linear_1000)[0]), rel=1e-12)
        exact = exact_ode_solution(x_T * math.sqrt(1 + sigma_max**2), sigma_max, sigma_min)
        errors.append((at_sigma_min["sample"] - exact / math.sqrt(1 + sigma_min**2)).abs().max().item())
    slope = np.polyfit(np.log(step_counts), np.log(errors), 1)[0]
    assert -2.3 < slope < -1.7, f"errors {errors} fall with slope {slope:.2f}, not about -2"
    assert errors[-1] < 1e-2


def diffusers_solve(scheduler, model, diffusion, x_T, noises=None):
    """Run diffusers' scheduler loop; the network gets the timestep of each of the scheduler's σ (diffusers itself
    rounds it for Karras and logSNR steps), so both solvers see the same model at the same noise levels."""
    levels_log_sigmas = log_sigma_table(diffusion)
    x = x_T
    for k, t in enumerate(scheduler.timesteps):
        sigma = float(scheduler.sigmas[k])
        timestep = np.interp(math.log(sigma), levels_log_sigmas, np.arange(len(levels_log_sigmas)))
        output = model(x, torch.full((x.shape[0],), timestep, dtype=torch.float32))
        x = scheduler.step(output, t, x, variance_noise=None if noises is None else noises[k]).prev_sample
    return x


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' own numpy 2 copy= warning
@pytest.mark.parametrize("sampler", ["dpm++2m", "dpm++2m_sde"])
@pytest.mark.parametrize("schedule", STEP_SCHEDULES)
def test_dpm_solver_equals_diffusers_on_the_same_model_schedule_and_x_T(sampler, schedule):
    """A learned-variance model of T = 50 steps (ε: the exact Gaussian-data ε plus a tiny random U-Net's output,
    whose variance channels diffusers must drop as well); time-uniform steps given to diffusers as its own timesteps."""
    unet, diffusion = tiny_model_and_diffusion(learn_sigma=True)
    model = GaussianDataEps(diffusion, extra=perturb_(unet).eval())
    steps = 8
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=50, trained_betas=diffusion.betas, solver_order=2, prediction_type="epsilon",
        algorithm_type="sde-dpmsolver++" if sampler.endswith("_sde") else "dpmsolver++",
        variance_type="learned_range", use_lu_lambdas=schedule == "logsnr", use_karras_sigmas=schedule == "karras",
    )
    if schedule == "time":
        scheduler.set_timesteps(timesteps=list(range(49, -1, -7)))  # uniform over the 50 steps, t = 0 last
    else:
        scheduler.set_timesteps(num_inference_steps=steps)
    ours = step_sigmas(NoiseLevels(diffusion), steps, schedule)
    np.testing.assert_allclose(scheduler.sigmas.numpy()[:-1], ours[:-1], rtol=3e-5)
    assert scheduler.sigmas[-1] == ours[-1] == 0

    generator = torch.Generator().manual_seed(1)
    x_T = torch.randn(2, 3, 16, 16, generator=generator)
    noises = [torch.randn(2, 3, 16, 16, generator=generator) for _ in range(steps)]
    with torch.inference_mode():
        expected = diffusers_solve(scheduler, model, diffusion, x_T, noises if sampler.endswith("_sde") else None)
        drawn = iter(noises)
        result = sample_loop(model, diffusion, sampler, steps, x_T, step_schedule=schedule, clip_denoised=False,
                             noise_fn=lambda x: next(drawn))
    assert 1 < expected.abs().max() < 10
    assert (result - expected).abs().max() < 1e-4


def edm_algorithm_2(denoiser, sigmas, x_T, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, noises=None):
    """Karras et al. 2022, Algorithm 2, as printed (s(t) = 1, σ(t) = t; S_churn = 0 is Algorithm 1): x_0 ~ N(0, t_0²)
    is given as x_T·√(1 + t_0²) for the VP prior, ε_i ~ N(0, S_noise²·I) as S_noise·noises[i]; t̂_i is kept at most
    t_0, the largest σ the network has a timestep for. Returns x_N."""
    n = len(sigmas) - 1
    x = x_T * math.sqrt(1 + sigmas[0] ** 2)
    for i in range(n):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= t_cur <= s_tmax else 0.0
        t_hat = min(t_cur + gamma * t_cur, sigmas[0])
        x_hat = x if noises is None else x + math.sqrt(t_hat**2 - t_cur**2) * s_noise * noises[i]
        d_cur = (x_hat - denoiser(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if t_next != 0:
            d_prime = (x_next - denoiser(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x


def edm_denoiser(model, diffusion):
    """D(x̃; σ) = x̃ - σ·ε(x̃·α, t(σ)), t(σ) the fractional index of σ in the diffusion's log σ table."""
    log_sigmas = log_sigma_table(diffusion)

    def denoiser(x_tilde, sigma):
        timestep = np.interp(math.log(sigma), log_sigmas, np.arange(len(log_sigmas)))
        t = torch.full((x_tilde.shape[0],), timestep, dtype=x_tilde.dtype)
        return x_tilde - sigma * model(x_tilde / math.sqrt(1 + sigma**2), t)[:, :3]

    return denoiser


def karras_sigmas(diffusion, steps, rho=7):
    """EDM's step discretisation between the diffusion's own σ_max and σ_min, then 0."""
    log_sigmas = log_sigma_table(diffusion)
    sigma_min, sigma_max = math.exp(log_sigmas[0]), math.exp(log_sigmas[-1])
    return [(sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
            for i in range(steps)] + [0.0]


def no_noise(x):
    raise AssertionError("deterministic Heun drew noise")


def test_heun_equals_edm_algorithm_1_on_karras_steps():
    unet, diffusion = tiny_model_and_diffusion(learn_sigma=True, diffusion_steps=1000)
    model = GaussianDataEps(diffusion, extra=perturb_(unet).eval())
    steps = 6
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = edm_algorithm_2(edm_denoiser(model, diffusion), karras_sigmas(diffusion, steps), x_T)
        result = sample_loop(model, diffusion, "heun", steps, x_T, step_schedule="karras", clip_denoised=False,
                             noise_fn=no_noise)
    assert 1 < expected.abs().max() < 10
    assert (result - expected).abs().max() < 1e-4


@pytest.mark.parametrize("churn", [
    HeunChurn(churn=1.2, s_tmin=0.05, s_tmax=50.0, s_noise=1.003),  # γ = 0.2 on σ = 13, 2.4, 0.26; not 157, 51, 0.01
    HeunChurn(churn=10.0, s_noise=1.007),  # γ capped at √2 - 1 on every step; at σ_max, σ̂ is kept at σ_max
])
def test_heun_with_churn_equals_edm_algorithm_2_with_the_same_noise(linear_1000, churn):
    """Float64 on the exact Gaussian-data ε model of the 1000-step linear schedule (σ from 157 down to 0.01)."""
    model, steps = GaussianDataEps(linear_1000), 6
    generator = torch.Generator().manual_seed(3)
    x_T = torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64)
    noises = [torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64) for _ in range(steps)]
    expected = edm_algorithm_2(edm_denoiser(model, linear_1000), karras_sigmas(linear_1000, steps), x_T,
                               churn.churn, churn.s_tmin, churn.s_tmax, churn.s_noise, noises)
    drawn = iter(noises)
    result = sample_loop(model, linear_1000, "heun", steps, x_T, step_schedule="karras", clip_denoised=False,
                         noise_fn=lambda x: next(drawn), heun_churn=churn)
    assert next(drawn, None) is None, "one draw per step"
    deterministic = sample_loop(model, linear_1000, "heun", steps, x_T, step_schedule="karras", clip_denoised=False)
    assert (expected - deterministic).abs().max() > 0.05, "the churn should change the samples"
    assert (result - expected).abs().max() < 1e-5


@pytest.mark.parametrize("sampler, churn", [(sampler, HeunChurn()) for sampler in SAMPLERS] +
                         [("heun", HeunChurn(churn=1.0))])
def test_network_evaluations_are_exact(sampler, churn):
    """Counted network calls per image: the steps for DPM-Solver++, two per step except the last for Heun (also with
    churn)."""
    unet, diffusion = tiny_model_and_diffusion()
    for steps in (1, 2, 5):
        counting = CountingNetwork(unet.eval())
        with torch.inference_mode():
            sample_loop(counting, diffusion, sampler, steps, torch.randn(3, 3, 16, 16), heun_churn=churn)
        assert counting.rows / 3 == network_evaluations(sampler, steps)
        assert network_evaluations(sampler, steps) == (2 * steps - 1 if sampler == "heun" else steps)


def test_respaced_model_steps_on_its_own_table_and_gets_original_timesteps():
    """A respaced diffusion (10 of T = 50 steps, rescaled timesteps): the noise levels span its own ᾱ, and the
    network gets original timesteps (× 1000/50), fractional between the kept ones."""
    diffusion = make_diffusion(steps=50, respacing="10", learn_sigma=False)
    diffusion.rescale_timesteps = True
    seen = []

    def network(x, t):
        seen.append(t[0].item())
        return torch.zeros_like(x)

    sample_loop(network, diffusion, "dpm++2m", 4, torch.randn(1, 3, 4, 4), step_schedule="time")
    kept = diffusion.timestep_map  # [0, 5, 11, ..., 49]
    # time-uniform over the 10 kept steps: fractional indices 9, 6, 3, 0
    expected = [kept[9], kept[6], kept[3], kept[0]]
    assert seen == pytest.approx([t * 1000 / 50 for t in expected], rel=1e-6)
    levels = NoiseLevels(diffusion)
    between = math.sqrt(levels.sigma_at(np.array(4.0)) * levels.sigma_at(np.array(5.0)))  # log-midpoint
    assert levels.timestep(float(between)) == pytest.approx((kept[4] + kept[5]) / 2 * 1000 / 50)
    sigmas = step_sigmas(levels, 5, "karras")
    np.testing.assert_allclose(sigmas[[0, 4]], np.exp(log_sigma_table(diffusion)[[-1, 0]]), rtol=1e-12)


def test_predict_xstart_models_and_clipping():
    """A network predicting x_0 is used as the denoiser directly; clip_denoised clamps it to [-1, 1]."""
    diffusion = make_diffusion(steps=50, learn_sigma=False, mean_type=gd.ModelMeanType.START_X)

    def constant(x, t):
        return torch.full_like(x, 0.25)

    def too_far(x, t):
        return torch.full_like(x, 3.0)

    result = sample_loop(constant, diffusion, "heun", 3, torch.randn(1, 3, 4, 4))
    assert torch.allclose(result, torch.full((1, 3, 4, 4), 0.25), atol=1e-6)
    assert sample_loop(too_far, diffusion, "dpm++2m", 3, torch.randn(1, 3, 4, 4)).max() == 1.0
    assert sample_loop(too_far, diffusion, "dpm++2m", 3, torch.randn(1, 3, 4, 4), clip_denoised=False).max() == 3.0


def test_bad_names_and_step_counts_are_refused(linear_1000):
    with pytest.raises(ValueError, match="--sampler 'euler' is not one of dpm"):
        network_evaluations("euler", 10)
    with pytest.raises(ValueError, match="--step_schedule 'cosine' is not one of time, logsnr, karras"):
        step_sigmas(NoiseLevels(linear_1000), 10, "cosine")
    with pytest.raises(ValueError, match="--steps 0 must be >= 1"):
        step_sigmas(NoiseLevels(linear_1000), 0, "time")
    with pytest.raises(ValueError, match="--heun_churn 40 is for --sampler heun, not dpm"):
        sample_loop(GaussianDataEps(linear_1000), linear_1000, "dpm++2m", 3, torch.randn(1, 3, 4, 4),
                    heun_churn=HeunChurn(churn=40))
    for churn, message in ((lambda: HeunChurn(churn=-1), "--heun_churn -1 must be >= 0"),
                           (lambda: HeunChurn(churn=1, s_noise=0), "--heun_s_noise 0 must be > 0"),
                           (lambda: HeunChurn(churn=1, s_tmin=2, s_tmax=1), "--heun_s_tmin 2 and --heun_s_tmax 1 must")):
        with pytest.raises(ValueError, match=message):
            churn()


@pytest.fixture(scope="module")
def tiny_class_cond():
    model, diffusion = tiny_model_and_diffusion(class_cond=True)
    return perturb_(model).eval(), diffusion


@pytest.mark.parametrize("stochastic, deterministic", [
    ({"sampler": "dpm++2m_sde"}, {"sampler": "dpm++2m"}),
    ({"sampler": "heun", "heun_churn": HeunChurn(churn=2.0)}, {"sampler": "heun"}),
])
def test_stochastic_samples_are_reproducible_per_seed_across_batch_sizes(tiny_class_cond, stochastic, deterministic):
    """Class-conditional, SDE or Heun with churn: sample i depends only on (seed, i), whether drawn in batches of 1, 3
    or 4."""
    model, diffusion = tiny_class_cond
    options = SamplingOptions(image_size=16, class_cond=True, seed=5, steps=4, **stochastic)

    def samples(batches):
        results = [generate_batch(model, diffusion, indices, options, "cpu") for indices in batches]
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])

    whole, labels = samples([[0, 1, 2, 3]])
    assert whole.std() > 20, "the perturbed model should give non-trivial samples"
    for batches in ([[0], [1], [2], [3]], [[0, 1, 2], [3]]):
        images, other_labels = samples(batches)
        assert np.array_equal(labels, other_labels)
        # The network is not bitwise batch-invariant (guided_diffusion/sampling.py): a pixel may move one level.
        difference = np.abs(images.astype(int) - whole.astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-2
    ode = SamplingOptions(image_size=16, class_cond=True, seed=5, steps=4, **deterministic)
    assert (generate_batch(model, diffusion, [0, 1, 2, 3], ode, "cpu")[0] != whole).mean() > 0.2, "noise is added"
