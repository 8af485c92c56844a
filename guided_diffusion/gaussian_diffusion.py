"""Gaussian diffusion with P2 weighting (paper Eqs. (2)-(8); docs/compatibility.md, "P2 weighting",
"Diffusion process" and "Samplers").

Keeps the ADM public API (method names, arguments and returned dicts) so that code written against
openai/guided-diffusion or the P2 code runs unchanged. Every per-timestep quantity is computed once, in float64,
at construction and indexed by t afterwards.
"""

import collections
import enum
import functools
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import mean_flat
from .weighting import LossWeighting, p2_weights

# SNR boundaries of the paper's three stages (Sec. 3.1): coarse < 1e-2 <= content <= 1 < clean-up.
SNR_STAGE_BOUNDS = (1e-2, 1.0)
SNR_STAGE_NAMES = ("coarse", "content", "cleanup")


def snr_stage(snr):
    """Index of the paper's stage (0 coarse, 1 content, 2 clean-up) for each SNR value (array or tensor)."""
    low, high = SNR_STAGE_BOUNDS
    if isinstance(snr, torch.Tensor):
        return (snr >= low).long() + (snr > high).long()
    snr = np.asarray(snr)
    return (snr >= low).astype(np.int64) + (snr > high).astype(np.int64)


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """β_1..β_T in float64 for "linear" (Ho et al., scaled to T) or "cosine" (Nichol & Dhariwal).

    See docs/compatibility.md, "Diffusion process".
    """
    if num_diffusion_timesteps < 1:
        raise ValueError(f"--diffusion_steps must be >= 1, got {num_diffusion_timesteps}")
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        if scale * 0.02 >= 1:
            raise ValueError(
                f"--diffusion_steps {num_diffusion_timesteps} is too few for the linear schedule, whose last beta "
                f"would be {scale * 0.02:g} >= 1; use more than 20 steps or --noise_schedule cosine"
            )
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(num_diffusion_timesteps, lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"--noise_schedule {schedule_name!r} is unknown; use 'linear' or 'cosine'")


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Betas that discretise a continuous ᾱ(u), u in [0, 1]: β_i = min(1 - ᾱ((i+1)/T)/ᾱ(i/T), max_beta)."""
    T = num_diffusion_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return np.array(betas, dtype=np.float64)


class ModelMeanType(enum.Enum):
    """What the network predicts (--predict_xstart)."""

    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # ε


class ModelVarType(enum.Enum):
    """How the reverse-process variance is chosen (--learn_sigma, --sigma_small)."""

    FIXED_SMALL = enum.auto()  # σ̃²_t, the posterior variance
    FIXED_LARGE = enum.auto()  # β_t (σ̃²_1 at t = 0)
    LEARNED_RANGE = enum.auto()  # interpolation between log β_t and log σ̃²_t (IDDPM)


class LossType(enum.Enum):
    """The training objective (--use_kl, --rescale_learned_sigmas)."""

    MSE = enum.auto()  # ε (or x0) MSE, plus the VB term when the variance is learned
    RESCALED_MSE = enum.auto()  # the same with the VB term scaled by T/1000
    RESCALED_KL = enum.auto()  # the variational bound times T


class GaussianDiffusion:
    """A discrete-time Gaussian diffusion with T steps and a loss weighting (P2 by default; docs/weightings.md).

    :param betas: [T] float64 noise schedule β_1..β_T.
    :param model_mean_type: a ModelMeanType.
    :param model_var_type: a ModelVarType.
    :param loss_type: a LossType.
    :param rescale_timesteps: feed t·1000/T to the model instead of t.
    :param p2_gamma: γ of Eq. (8); 0 gives the baseline weighting.
    :param p2_k: k of Eq. (8); must be > 0 when γ > 0.
    :param weighting: the weight of the ε-MSE, one of weighting.WEIGHTINGS ("p2" uses p2_gamma and p2_k).
    :param snr_gamma: γ of "min_snr".
    :param sigmoid_bias: b of "sigmoid".
    :param sigma_data: σ_data of "soft_min_snr" and "edm".
    :param normalize_weights: rescale the weights to mean 1 over this diffusion's timesteps.
    :param alphas_cumprod: optional [T] ᾱ table that `betas` discretises; respacing passes the base process's
        values so that ᾱ and SNR of a respaced step are bit-identical to those of its original timestep.
    """

    def __init__(
        self,
        *,
        betas,
        model_mean_type,
        model_var_type,
        loss_type,
        rescale_timesteps=False,
        p2_gamma=0.0,
        p2_k=1.0,
        weighting="p2",
        snr_gamma=5.0,
        sigmoid_bias=-3.0,
        sigma_data=0.5,
        normalize_weights=False,
        alphas_cumprod=None,
    ):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps
        self.p2_gamma = float(p2_gamma)
        self.p2_k = float(p2_k)
        self.loss_weighting = LossWeighting(
            name=weighting, p2_gamma=self.p2_gamma, p2_k=self.p2_k, snr_gamma=float(snr_gamma),
            sigmoid_bias=float(sigmoid_bias), sigma_data=float(sigma_data), normalize=bool(normalize_weights),
        )
        self.loss_weighting.check(kl_loss=loss_type == LossType.RESCALED_KL,
                                  xstart_target=model_mean_type == ModelMeanType.START_X)

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas < 1).all()):
            raise ValueError("betas must be a 1-D array with every value in (0, 1)")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = (
            np.cumprod(alphas, axis=0) if alphas_cumprod is None else np.asarray(alphas_cumprod, dtype=np.float64)
        )
        if self.alphas_cumprod.shape != betas.shape:
            raise ValueError(f"alphas_cumprod shape {self.alphas_cumprod.shape} != betas shape {betas.shape}")
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0), Eq. (2)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value (β_1 for a 1-step chain).
        first_variance = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first_variance, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

        # Eq. (4) and Eq. (8): SNR_t and the P2 factor λ'_t/λ_t = (k + SNR_t)^-γ, float64
        # (docs/compatibility.md, "P2 weighting"); loss_weight is the chosen scheme's factor of the ε-MSE, which
        # with the default flags is p2_weight (docs/weightings.md).
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        self.p2_weight = p2_weights(self.snr, self.p2_gamma, self.p2_k)
        self.loss_weight, self.loss_weight_scale = self.loss_weighting.table(self.snr)

        # Derived tables used by the samplers, precomputed so that every lookup is a cached device table.
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.log_betas = np.log(betas)
        # FIXED_LARGE: β_t, except the first step keeps σ̃²_1 for a better decoder likelihood.
        self.fixed_large_variance = np.append(first_variance, betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self._device_tables = {}

    # ------------------------------------------------------------------ forward process

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log variance of q(x_t | x_0), each broadcast to x_start's shape."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I) (Eq. (2)).

        :param x_start: [N, C, H, W] clean data in [-1, 1].
        :param t: [N] integer timesteps (0-based).
        :param noise: optional ε of the same shape.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {tuple(x_start.shape)} != x_t shape {tuple(x_t.shape)}")
        posterior_mean = (
            self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
            + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t
        )
        posterior_variance = self._extract("posterior_variance", t, x_t.shape)
        posterior_log_variance_clipped = self._extract("posterior_log_variance_clipped", t, x_t.shape)
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    # ------------------------------------------------------------------ reverse process

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Apply the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        :param model: callable (x [N, C, H, W], t [N]) -> [N, C or 2C, H, W].
        :param x: [N, C, H, W] x_t.
        :param t: [N] integer timesteps.
        :param clip_denoised: clamp the x_0 prediction to [-1, 1].
        :param denoised_fn: optional function applied to the x_0 prediction before clamping.
        :return: dict with 'mean', 'variance', 'log_variance', 'pred_xstart', each [N, C, H, W].
        """
        model_output, model_var_values = self._split_output(
            model(x, self._scale_timesteps(t), **(model_kwargs or {})), x
        )
        if model_var_values is not None:  # LEARNED_RANGE
            min_log = self._extract("posterior_log_variance_clipped", t, x.shape)
            max_log = self._extract("log_betas", t, x.shape)
            frac = (model_var_values + 1) / 2  # v in [-1, 1] -> [0, 1]
            model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            model_variance = self._extract("fixed_large_variance", t, x.shape)
            model_log_variance = self._extract("fixed_large_log_variance", t, x.shape)
        else:
            model_variance = self._extract("posterior_variance", t, x.shape)
            model_log_variance = self._extract("posterior_log_variance_clipped", t, x.shape)

        if self.model_mean_type == ModelMeanType.EPSILON:
            pred_xstart = self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output)
        else:
            pred_xstart = model_output
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    def _split_output(self, model_output, x):
        """Split a [N, 2C, ...] output into the mean part and the variance part v when the variance is learned.

        :return: ([N, C, ...] mean output, [N, C, ...] v in [-1, 1] or None for a fixed variance).
        """
        if self.model_var_type != ModelVarType.LEARNED_RANGE:
            return model_output, None
        C = x.shape[1]
        if model_output.shape != (x.shape[0], 2 * C, *x.shape[2:]):
            raise ValueError(
                f"a learned variance needs {2 * C} output channels, the model gave {tuple(model_output.shape)}; "
                "check --learn_sigma"
            )
        return torch.split(model_output, C, dim=1)

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart
        ) / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape)

    def _scale_timesteps(self, t):
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the mean by σ²·∇_x log p(y | x_t) (Sohl-Dickstein et al.; ADM)."""
        gradient = cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Score-based conditioning for DDIM (Song et al.): ε -= √(1-ᾱ_t)·∇_x log p(y | x_t), applied to the x̂₀
        that ε is recomputed from as x̂₀ += √(1/ᾱ_t - 1)·√(1-ᾱ_t)·∇ (the same update; x̂₀ exactly for a zero
        gradient)."""
        gradient = cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {}))
        coefficient = self._extract("sqrt_recipm1_alphas_cumprod", t, x.shape) * self._extract(
            "sqrt_one_minus_alphas_cumprod", t, x.shape
        )
        out = dict(p_mean_var)
        out["pred_xstart"] = p_mean_var["pred_xstart"] + coefficient * gradient
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    def p_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, noise_fn=None
    ):
        """One ancestral step x_t -> x_{t-1} (docs/compatibility.md, "Samplers").

        :param noise_fn: callable x -> standard normal noise shaped like x (default torch.randn_like);
            per-sample generators plug in here.
        :return: dict with 'sample' (x_{t-1}) and 'pred_xstart', each [N, C, H, W].
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        noise = (noise_fn or torch.randn_like)(x)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))  # no noise at t == 0
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        noise_fn=None,
    ):
        """Ancestral sampling from x_T ~ N(0, I) down to x_0; returns the final [N, C, H, W] sample."""
        return _last_sample(
            self.p_sample_loop_progressive(
                model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress, noise_fn
            )
        )

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        noise_fn=None,
    ):
        """Yield p_sample's dict at every step from t = T-1 down to 0."""
        return self._sample_loop_progressive(
            self.p_sample, model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress,
            noise_fn,
        )

    def ddim_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, eta=0.0, noise_fn=None
    ):
        """One DDIM step x_t -> x_{t-1} (Song et al.; docs/compatibility.md, "Samplers"). The learned variance is
        unused.

        :param eta: 0 for deterministic DDIM, 1 for ancestral-equivalent noise.
        :return: dict with 'sample' and 'pred_xstart'.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        # ε is recomputed from the (possibly clipped) x0 prediction.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.shape)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        if eta:
            mean_pred = mean_pred + nonzero_mask * sigma * (noise_fn or torch.randn_like)(x)
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0):
        """One deterministic DDIM inversion step x_t -> x_{t+1} (needs eta == 0)."""
        if eta != 0.0:
            raise ValueError(f"reverse DDIM is only defined for eta 0, got eta={eta}")
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x.shape)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        noise_fn=None,
    ):
        """DDIM sampling from x_T down to x_0; returns the final [N, C, H, W] sample."""
        return _last_sample(
            self.ddim_sample_loop_progressive(
                model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress, eta, noise_fn
            )
        )

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        noise_fn=None,
    ):
        """Yield ddim_sample's dict at every step from t = T-1 down to 0."""
        return self._sample_loop_progressive(
            functools.partial(self.ddim_sample, eta=eta), model, shape, noise, clip_denoised, denoised_fn, cond_fn,
            model_kwargs, device, progress, noise_fn,
        )

    def _sample_loop_progressive(
        self, step, model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress, noise_fn
    ):
        """The loop both samplers share: x_T, then one `step` (p_sample or ddim_sample) per t = T-1 down to 0,
        without gradients. x_T is `noise` if given, else drawn on `device` by `noise_fn` (default torch.randn).

        :return: a generator of `step`'s dicts ('sample' x_{t-1} and 'pred_xstart'), one per step.
        """
        if noise is not None:
            img = noise
        elif device is None:
            raise ValueError("pass either `noise` or `device` to the sampling loop")
        elif noise_fn is not None:
            img = noise_fn(torch.empty(*shape, device=device))
        else:
            img = torch.randn(*shape, device=device)
        indices = range(self.num_timesteps - 1, -1, -1)
        for i in tqdm(indices, desc="denoising", leave=False) if progress else indices:
            t = torch.full((shape[0],), i, device=img.device, dtype=torch.long)
            with torch.no_grad():
                out = step(
                    model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                    model_kwargs=model_kwargs, noise_fn=noise_fn,
                )
            yield out
            img = out["sample"]

    # ------------------------------------------------------------------ losses

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """The VLB term L_{t-1} in bits per dimension: KL for t > 0, decoder NLL at t = 0.

        See docs/compatibility.md, "Diffusion process".

        :return: dict with 'output' ([N] bits/dim) and 'pred_xstart'.
        """
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        output = torch.where(t == 0, decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample training losses with the loss weighting (P2's Eq. (8) by default; docs/weightings.md).

        The MSE term is multiplied by loss_weight[t] ((k + SNR_t)^-γ for P2); the VB term of a learned variance is
        never weighted, and it sees the mean prediction detached so it trains only the variance channels (the hybrid
        loss of IDDPM).

        :param model: callable (x_t [N, C, H, W], t [N]) -> [N, C or 2C, H, W].
        :param x_start: [N, C, H, W] data in [-1, 1].
        :param t: [N] integer timesteps.
        :return: dict of [N] tensors: 'loss'; with MSE losses also 'mse' (weighted), 'mse_raw' (unweighted)
            and, for a learned variance, 'vb'.
        """
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        terms = {}
        if self.loss_type == LossType.RESCALED_KL:
            terms["vb"] = self._vb_terms_bpd(
                model=model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False, model_kwargs=model_kwargs
            )["output"]
            terms["loss"] = terms["vb"] * self.num_timesteps
            return terms

        model_output, model_var_values = self._split_output(model(x_t, self._scale_timesteps(t), **model_kwargs), x_t)
        if model_var_values is not None:
            # The VB term sees a frozen mean, so it only trains the variance.
            frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(
                model=lambda *args, r=frozen_out: r, x_start=x_start, x_t=x_t, t=t, clip_denoised=False
            )["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # Divide by 1000 for equivalence with the initial IDDPM implementation (T/1000 = 1 at T = 1000).
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        target = noise if self.model_mean_type == ModelMeanType.EPSILON else x_start
        if model_output.shape != target.shape:
            raise ValueError(f"model output shape {tuple(model_output.shape)} != target shape {tuple(target.shape)}")
        terms["mse_raw"] = mean_flat((target - model_output) ** 2)
        terms["mse"] = self._extract("loss_weight", t, terms["mse_raw"].shape) * terms["mse_raw"]
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, [N]."""
        batch_size = x_start.shape[0]
        t = torch.full((batch_size,), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / math.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None, noise_fn=None, on_step=None):
        """The full variational bound in bits per dimension, term by term.

        :param noise_fn: callable x -> standard normal noise shaped like x, one draw per timestep (default
            torch.randn_like); per-sample generators plug in here.
        :param on_step: None, or callable() run after each timestep (a progress bar).
        :return: dict with 'total_bpd' [N], 'prior_bpd' [N], and 'vb', 'xstart_mse', 'mse', each [N, T] with
            column j holding timestep T-1-j (the order the loop visits them, as in ADM).
        """
        device = x_start.device
        batch_size = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for t in list(range(self.num_timesteps))[::-1]:
            t_batch = torch.full((batch_size,), t, device=device, dtype=torch.long)
            noise = (noise_fn or torch.randn_like)(x_start)
            x_t = self.q_sample(x_start=x_start, t=t_batch, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(
                    model, x_start=x_start, x_t=x_t, t=t_batch, clip_denoised=clip_denoised, model_kwargs=model_kwargs
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
            if on_step is not None:
                on_step()

        vb, xstart_mse, mse = (torch.stack(terms, dim=1) for terms in (vb, xstart_mse, mse))
        prior_bpd = self._prior_bpd(x_start)
        total_bpd = vb.sum(dim=1) + prior_bpd
        return {"total_bpd": total_bpd, "prior_bpd": prior_bpd, "vb": vb, "xstart_mse": xstart_mse, "mse": mse}

    # ------------------------------------------------------------------ helpers

    def _extract(self, table_name, timesteps, broadcast_shape):
        """This diffusion's [T] float64 table `table_name` at `timesteps`, as float32 broadcastable to
        `broadcast_shape`. Each table is copied to a device once and cached there (the tables never change after
        construction), so a step does no host-to-device copy."""
        key = (table_name, timesteps.device)
        table = self._device_tables.get(key)
        if table is None:
            table = self._device_tables[key] = torch.as_tensor(getattr(self, table_name)).to(timesteps.device)
        return table[timesteps].float().view(-1, *([1] * (len(broadcast_shape) - 1))).expand(broadcast_shape)


def _last_sample(steps):
    """The 'sample' of the last dict a progressive sampling loop yields."""
    return collections.deque(steps, maxlen=1).pop()["sample"]
