"""Few-step samplers for the trained ε-models: DPM-Solver++(2M), its SDE variant (Lu et al. 2022) and EDM's Heun
sampler (Karras et al. 2022: Algorithm 1, deterministic; with churn, Algorithm 2).

Noise levels. A diffusion's discrete table ᾱ_j (j = 0 .. N'-1; a respaced diffusion keeps N' of the T trained steps)
gives σ_j = √((1 - ᾱ_j) / ᾱ_j), increasing in j. Between two table entries log σ is interpolated linearly in j, so
every σ in [σ_0, σ_{N'-1}] has a fractional index u; the network gets the matching fractional original timestep,
linearly interpolated between the trained timesteps timestep_map[⌊u⌋] and timestep_map[⌈u⌉] (times 1000/T with
--rescale_timesteps). On the table's own entries this is exactly the integer timestep the network was trained on;
in between, ADM's sinusoidal embedding takes the real value (as DPM-Solver's reference code does for ADM models).

Steps. `steps` = N noise levels σ_max = σ_{N'-1} > ... > σ_min = σ_0 placed by the step schedule, then σ = 0:
  time     uniform in the fractional index u (Lu et al.'s "time-uniform" on the discrete table)
  logsnr   uniform in log σ, i.e. in log-SNR = -2 log σ (Lu et al.)
  karras   σ_i = (σ_max^(1/ρ) + i/(N-1)·(σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ with ρ = 7 (Karras et al.)
The solvers run on x̃ = x / α = x_0 + σ·ε (α = 1/√(1 + σ²)), starting from x̃ = x_T·√(1 + σ_max²) for the same
x_T ~ N(0, I) the ancestral and DDIM samplers start from, and end at σ = 0, where x̃ = x. The denoiser D(x̃; σ) is
x̃ - σ·ε̂ (ε̂: the first C output channels of a learned-variance model), or the network's x̂_0 for --predict_xstart,
clamped to [-1, 1] with clip_denoised.

Churn (EDM Algorithm 2, HeunChurn): before step i, from σ_i, Heun first raises the noise to σ̂ = σ_i·(1 + γ_i),
γ_i = min(S_churn/N, √2 - 1) where S_tmin ≤ σ_i ≤ S_tmax (else 0), by adding √(σ̂² - σ_i²)·S_noise·z to x̃, and then
takes its step from σ̂ to σ_{i+1}. σ̂ lies between the table's levels, so the network gets its fractional timestep like
any other σ; above the table's top σ̂ is lowered to σ_max (the network has no timestep beyond T - 1; EDM likewise
rounds σ̂ to the levels its networks support), so the first step, at σ_max, adds no noise. With S_churn > 0 one z is
drawn per step (also where γ_i = 0, as EDM's reference code does); S_churn = 0 is Algorithm 1 and draws nothing.

Network evaluations per sample: N for DPM-Solver++(2M) and its SDE variant, 2N - 1 for Heun with or without churn
(its last step, to σ = 0, is an Euler step).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from .gaussian_diffusion import ModelMeanType

SAMPLERS = ("dpm++2m", "dpm++2m_sde", "heun")
STEP_SCHEDULES = ("time", "logsnr", "karras")
DEFAULT_STEP_SCHEDULE = {"dpm++2m": "logsnr", "dpm++2m_sde": "karras", "heun": "karras"}
DEFAULT_STEPS = {"dpm++2m": 20, "dpm++2m_sde": 20, "heun": 10}
KARRAS_RHO = 7.0


def network_evaluations(sampler, steps):
    """Network calls per sample of `sampler` with `steps` noise levels (Heun: two per step except the last)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    return 2 * steps - 1 if sampler == "heun" else steps


@dataclass(frozen=True)
class HeunChurn:
    """EDM Algorithm 2's noise increase of --sampler heun; churn = 0 (the default) is Algorithm 1.

    :param churn: S_churn, the total increase spread over the steps (γ_i = min(S_churn/N, √2 - 1)).
    :param s_tmin, s_tmax: the σ range whose steps are churned (σ as in x̃ = x_0 + σ·ε, the same as EDM's).
    :param s_noise: S_noise, the scale of the added noise (slightly above 1 offsets the denoiser's loss of detail).
    """

    churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    def __post_init__(self):
        if not self.churn >= 0:
            raise ValueError(f"--heun_churn {self.churn:g} must be >= 0 (0 = deterministic, EDM Algorithm 1)")
        if not self.s_noise > 0:
            raise ValueError(f"--heun_s_noise {self.s_noise:g} must be > 0")
        if not 0 <= self.s_tmin <= self.s_tmax:
            raise ValueError(f"--heun_s_tmin {self.s_tmin:g} and --heun_s_tmax {self.s_tmax:g} must satisfy "
                             "0 <= S_tmin <= S_tmax")

    def raised_sigma(self, sigma, steps, sigma_max):
        """σ̂ of a step from `sigma` in a run of `steps` noise levels, at most the table's top `sigma_max`."""
        if not self.churn or not self.s_tmin <= sigma <= self.s_tmax:
            return sigma
        return min(sigma * (1.0 + min(self.churn / steps, math.sqrt(2.0) - 1.0)), sigma_max)

    def identity(self):
        """The fields as run.json records them (an infinite S_tmax as "inf", which JSON has no number for)."""
        return {"churn": self.churn, "s_tmin": self.s_tmin, "s_noise": self.s_noise,
                "s_tmax": self.s_tmax if math.isfinite(self.s_tmax) else "inf"}


NO_CHURN = HeunChurn()


class NoiseLevels:
    """The σ table of a (respaced) diffusion and the network timestep of any σ between its entries.

    :param diffusion: a GaussianDiffusion or SpacedDiffusion; its alphas_cumprod [N'] and, when respaced, its
        timestep_map (original timesteps) and original_num_steps.
    """

    def __init__(self, diffusion):
        alphas_cumprod = np.asarray(diffusion.alphas_cumprod, dtype=np.float64)
        self.log_sigmas = 0.5 * np.log((1.0 - alphas_cumprod) / alphas_cumprod)  # [N'], increasing
        self.indices = np.arange(len(alphas_cumprod), dtype=np.float64)
        self.timesteps = np.asarray(getattr(diffusion, "timestep_map", self.indices), dtype=np.float64)
        if diffusion.rescale_timesteps:
            self.timesteps = self.timesteps * (1000.0 / getattr(diffusion, "original_num_steps", len(self.indices)))
        self.sigma_min = float(np.exp(self.log_sigmas[0]))
        self.sigma_max = float(np.exp(self.log_sigmas[-1]))

    def sigma_at(self, u):
        """σ at fractional table indices `u` (array, 0 .. N'-1): log σ interpolated linearly."""
        return np.exp(np.interp(u, self.indices, self.log_sigmas))

    def timestep(self, sigma):
        """The (fractional) network timestep of noise level `sigma` (float in [σ_min, σ_max])."""
        u = np.interp(math.log(sigma), self.log_sigmas, self.indices)
        return float(np.interp(u, self.indices, self.timesteps))


def step_sigmas(levels, steps, schedule):
    """Noise levels of a sampling run: float64 [steps + 1], σ_max first, σ_min at index steps - 1, then 0.

    :param levels: NoiseLevels of the diffusion.
    :param schedule: one of STEP_SCHEDULES.
    """
    if steps < 1:
        raise ValueError(f"--steps {steps} must be >= 1")
    ramp = np.linspace(0.0, 1.0, steps)
    if schedule == "time":
        sigmas = levels.sigma_at((1.0 - ramp) * levels.indices[-1])
    elif schedule == "logsnr":
        sigmas = np.exp(np.log(levels.sigma_max) + ramp * (np.log(levels.sigma_min) - np.log(levels.sigma_max)))
    elif schedule == "karras":
        top, bottom = levels.sigma_max ** (1 / KARRAS_RHO), levels.sigma_min ** (1 / KARRAS_RHO)
        sigmas = (top + ramp * (bottom - top)) ** KARRAS_RHO
    else:
        raise ValueError(f"--step_schedule {schedule!r} is not one of {', '.join(STEP_SCHEDULES)}")
    # Ends pinned to the table, so float rounding never asks for a σ outside it.
    sigmas[0] = levels.sigma_max
    if steps > 1:
        sigmas[-1] = levels.sigma_min
    return np.append(sigmas, 0.0)


class Denoiser:
    """D(x̃; σ): the network's x̂_0 for x̃ = x_0 + σ·ε, in the dtype of x̃.

    :param model: callable (x [B, C, H, W], t float [B], **model_kwargs) -> [B, C or 2C, H, W].
    :param diffusion: supplies the noise levels, the output layout (learned variance) and ε vs. x_0 prediction.
    """

    def __init__(self, model, diffusion, clip_denoised=True, model_kwargs=None):
        self.model = model
        self.diffusion = diffusion
        self.levels = NoiseLevels(diffusion)
        self.clip_denoised = clip_denoised
        self.model_kwargs = model_kwargs or {}

    def __call__(self, x_tilde, sigma):
        alpha = 1.0 / math.sqrt(1.0 + sigma**2)
        x = x_tilde * alpha
        t_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        t = torch.full((x.shape[0],), self.levels.timestep(sigma), device=x.device, dtype=t_dtype)
        output, _ = self.diffusion._split_output(self.model(x, t, **self.model_kwargs), x)
        output = output.to(x_tilde.dtype)
        if self.diffusion.model_mean_type == ModelMeanType.EPSILON:
            pred_xstart = x_tilde - sigma * output
        else:
            pred_xstart = output
        return pred_xstart.clamp(-1, 1) if self.clip_denoised else pred_xstart


def sample_loop_progressive(
    model,
    diffusion,
    sampler,
    steps,
    noise,
    step_schedule=None,
    clip_denoised=True,
    model_kwargs=None,
    noise_fn=None,
    heun_churn=NO_CHURN,
):
    """Run `sampler` from x_T = `noise`; yields {"sample": x at the step's σ, "sigma", "pred_xstart"} per step.

    :param noise: [B, C, H, W] x_T ~ N(0, I); the solver computes in its dtype.
    :param step_schedule: one of STEP_SCHEDULES; None = DEFAULT_STEP_SCHEDULE[sampler].
    :param noise_fn: callable x -> standard normal noise like x (default torch.randn_like), for the SDE sampler
        (called once per step except the last) and Heun with churn (once per step); per-sample generators plug in here.
    :param heun_churn: HeunChurn of the heun sampler; the default (no churn) is the only one other samplers take.
    """
    network_evaluations(sampler, steps)  # checks the name
    if heun_churn.churn and sampler != "heun":
        raise ValueError(f"--heun_churn {heun_churn.churn:g} is for --sampler heun, not {sampler}")
    denoise = Denoiser(model, diffusion, clip_denoised, model_kwargs)
    sigmas = step_sigmas(denoise.levels, steps, step_schedule or DEFAULT_STEP_SCHEDULE[sampler])
    start = noise * math.sqrt(1.0 + sigmas[0] ** 2)
    noise_fn = noise_fn or torch.randn_like
    if sampler == "heun":
        steps = _heun_steps(denoise, sigmas, start, heun_churn, noise_fn)
    else:
        steps = _dpm_solver_steps(denoise, sigmas, start, noise_fn if sampler == "dpm++2m_sde" else None)
    for sigma, x_tilde, pred_xstart in steps:
        yield {"sample": x_tilde / math.sqrt(1.0 + sigma**2), "sigma": sigma, "pred_xstart": pred_xstart}


def sample_loop(model, diffusion, sampler, steps, noise, **kwargs):
    """The final sample [B, C, H, W] of sample_loop_progressive (same arguments)."""
    final = None
    for final in sample_loop_progressive(model, diffusion, sampler, steps, noise, **kwargs):
        pass
    return final["sample"]


def _dpm_solver_steps(denoise, sigmas, x_tilde, noise_fn):
    """DPM-Solver++(2M) (noise_fn None) or its SDE variant on x̃; yields (σ_next, x̃, x̂_0) per step.

    With ρ = σ_next/σ (h = log ρ⁻¹ the step in λ = -log σ) and D the x̂_0 estimate, the first-order step is
    x̃ ← D + ρ·(x̃ - D) (ODE) or x̃ ← ρ²·x̃ + (1 - ρ²)·D + σ_next·√(1 - ρ²)·z (SDE); after the first step D becomes
    D_i + (D_i - D_{i-1})/(2r) with r = h_{i-1}/h_i (the multistep second-order correction), except on the last
    step, to σ = 0, where x̃ = D_i.
    """
    previous, previous_h = None, None
    last = len(sigmas) - 2
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        pred_xstart = denoise(x_tilde, sigma)
        if i == last:
            yield sigma_next, pred_xstart, pred_xstart
            return
        h = math.log(sigma / sigma_next)
        estimate = pred_xstart
        if previous is not None:
            estimate = pred_xstart + (pred_xstart - previous) * (h / (2.0 * previous_h))
        ratio = sigma_next / sigma
        if noise_fn is None:
            x_tilde = estimate + ratio * (x_tilde - estimate)
        else:
            x_tilde = (ratio**2) * x_tilde + (1.0 - ratio**2) * estimate
            x_tilde = x_tilde + sigma_next * math.sqrt(-math.expm1(-2.0 * h)) * noise_fn(x_tilde)
        previous, previous_h = pred_xstart, h
        yield sigma_next, x_tilde, pred_xstart


def _heun_steps(denoise, sigmas, x_tilde, churn, noise_fn):
    """EDM Algorithm 2 on x̃ (s(t) = 1, σ(t) = t), Algorithm 1 without churn: raise the noise from σ to σ̂ (module
    docstring), then Euler from σ̂ with slope d = (x̃ - D)/σ̂ and the trapezoidal correction with the slope at the new
    point, except on the last step, to σ = 0."""
    steps = len(sigmas) - 1
    for i in range(steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if churn.churn:
            raised = churn.raised_sigma(sigma, steps, denoise.levels.sigma_max)
            x_tilde = x_tilde + math.sqrt(raised**2 - sigma**2) * churn.s_noise * noise_fn(x_tilde)
            sigma = raised
        pred_xstart = denoise(x_tilde, sigma)
        slope = (x_tilde - pred_xstart) / sigma
        euler = x_tilde + (sigma_next - sigma) * slope
        if sigma_next > 0:
            slope_next = (euler - denoise(euler, sigma_next)) / sigma_next
            euler = x_tilde + (sigma_next - sigma) * 0.5 * (slope + slope_next)
        x_tilde = euler
        yield sigma_next, x_tilde, pred_xstart
