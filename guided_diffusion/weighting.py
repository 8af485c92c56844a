"""Loss weightings as per-timestep tables of the ε-MSE (docs/weightings.md), and the paper's weight figures
(Eqs. (5), (7), (8); Fig. 3, Fig. A; docs/compatibility.md, "P2 weighting").

Every scheme is a function of SNR_t = ᾱ_t/(1 - ᾱ_t) alone, built once in float64 and looked up at each sample's t;
it multiplies the ε-MSE of the (hybrid) loss, never the VB term. Two views of P2:
- the P2 factor w_t = (k + SNR_t)^-γ that multiplies the ε-MSE of L_simple (what training_losses applies);
- the weights relative to the VLB terms L_t: the baseline λ_t = (1 - β_t)(1 - ᾱ_t)/β_t (Eq. (5)) and
  P2's λ'_t = λ_t · w_t (Eq. (8)), as the paper's figures draw them.
"""

import math
from dataclasses import dataclass

import numpy as np

WEIGHTINGS = ("p2", "min_snr", "soft_min_snr", "sigmoid", "edm", "constant")


def p2_weights(snr, gamma, k):
    """P2 (Choi et al. 2022, Eq. (8)): λ'_t/λ_t = (k + SNR_t)^-γ, already a factor of the ε-MSE; [T] float64."""
    return (k + snr) ** -gamma


def min_snr_weights(snr, gamma):
    """Min-SNR-γ (Hang et al. 2023), ε-prediction form: min(SNR_t, γ)/SNR_t; [T] float64.

    The paper clamps the x₀-MSE weight at min(SNR, γ); x̂₀ - x₀ = -(ε̂ - ε)/√SNR turns it into this ε-MSE weight.
    """
    return np.minimum(snr, gamma) / snr


def soft_min_snr_weights(snr, sigma_data):
    """Soft-min-SNR (Crowson et al. 2024, HDiT) carried to the ε-MSE: 1/(1 + σ_data²·SNR_t); [T] float64.

    HDiT weights the loss of its preconditioned network F (Karras et al. 2022) by (σ·σ_d)²/(σ² + σ_d²)², with
    σ² = 1/SNR. Since F's error is the x₀ error over c_out = σσ_d/√(σ² + σ_d²) and the x₀ error is σ times the ε
    error, the ε-MSE weight is (σσ_d)²/(σ² + σ_d²)² · (σ² + σ_d²)/(σσ_d)² · σ² = σ²/(σ² + σ_d²). On the x₀-MSE this
    is 1/(σ² + σ_d²) = 1/(1/SNR + 1/γ) with γ = 1/σ_d²: a smooth minimum of SNR and γ, hence the name.
    """
    return 1.0 / (1.0 + sigma_data**2 * snr)


def sigmoid_weights(snr, bias):
    """Sigmoid weighting (Kingma & Gao 2023) of the ε-MSE: sigmoid(b - log SNR_t); [T] float64.

    Computed as exp(-log(1 + exp(log SNR - b))), which neither overflows nor loses the tail. The paper's integral
    over log-SNR also carries the schedule's density of log-SNR; here, as for every scheme, the weight multiplies
    the ε-MSE of the timestep drawn (docs/weightings.md, "Sigmoid").
    """
    return np.exp(-np.logaddexp(0.0, np.log(snr) - bias))


def edm_weights(snr, sigma_data):
    """EDM's λ(σ) = (σ² + σ_d²)/(σσ_d)² (Karras et al. 2022, Table 1) carried to the ε-MSE: 1 + 1/(σ_d²·SNR_t).

    λ(σ) weights the x₀ (denoiser D) MSE, which is σ² = 1/SNR times the ε-MSE, so the ε weight is λ(σ)·σ²
    = 1 + σ²/σ_d²; [T] float64.
    """
    return 1.0 + 1.0 / (sigma_data**2 * snr)


@dataclass(frozen=True)
class LossWeighting:
    """The weighting flags: --weighting and the parameters of its schemes (docs/weightings.md).

    :param name: one of WEIGHTINGS.
    :param p2_gamma, p2_k: γ and k of P2 (Eq. (8)); γ = 0 is the baseline.
    :param snr_gamma: γ of min_snr.
    :param sigmoid_bias: b of sigmoid.
    :param sigma_data: σ_data of soft_min_snr and edm.
    :param normalize: rescale the table so that its mean over the diffusion's timesteps is 1.
    """

    name: str
    p2_gamma: float
    p2_k: float
    snr_gamma: float
    sigmoid_bias: float
    sigma_data: float
    normalize: bool

    @property
    def is_constant(self):
        """True when every raw weight is 1 (constant, or P2 with γ = 0)."""
        return self.name == "constant" or (self.name == "p2" and self.p2_gamma == 0)

    def check(self, kl_loss, xstart_target):
        """Reject unknown names, invalid values and settings that would silently have no effect (for P2 the
        reference accepts them: docs/compatibility.md, "Reference defects fixed here", rows 14 and 20).

        :param kl_loss: the loss is the VLB alone (--use_kl True), which has no MSE term to weight.
        :param xstart_target: the MSE is on x₀ (--predict_xstart True), not on ε.
        :raises ValueError: naming the flag, the value and what to do.
        """
        if self.name not in WEIGHTINGS:
            raise ValueError(f"--weighting {self.name!r} is unknown; use one of {', '.join(WEIGHTINGS)}")
        if not math.isfinite(self.p2_gamma) or self.p2_gamma < 0:
            raise ValueError(f"--p2_gamma must be a finite number >= 0 (0 = baseline), got {self.p2_gamma}")
        if self.p2_gamma > 0 and not self.p2_k > 0:
            raise ValueError(
                "--p2_k must be > 0 when --p2_gamma > 0 (k <= 0 makes the weight explode at small SNR), "
                f"got {self.p2_k}"
            )
        if self.p2_gamma > 0 and self.name != "p2":
            raise ValueError(
                f"--p2_gamma {self.p2_gamma} only applies to --weighting p2, not {self.name}; pass --p2_gamma 0 "
                "(or --weighting p2)"
            )
        _check_positive("--snr_gamma", self.snr_gamma, "min-SNR's γ; Hang et al. use 5")
        _check_positive("--sigma_data", self.sigma_data, "the data's standard deviation; 0.5 for images in [-1, 1]")
        if not math.isfinite(self.sigmoid_bias):
            raise ValueError(f"--sigmoid_bias must be a finite number, got {self.sigmoid_bias}")
        if kl_loss and self.p2_gamma > 0:
            raise ValueError(
                f"--p2_gamma {self.p2_gamma} has no effect with --use_kl True: P2 weights the MSE term, which the KL "
                "loss does not have; use --use_kl False (hybrid loss) or --p2_gamma 0"
            )
        if kl_loss and not self.is_constant:
            raise ValueError(
                f"--weighting {self.name} has no effect with --use_kl True: it weights the MSE term, which the KL loss "
                "does not have; use --use_kl False (hybrid loss) or --weighting constant"
            )
        if kl_loss and self.normalize:
            raise ValueError(
                "--normalize_weights True has no effect with --use_kl True (no MSE term to weight); "
                "use --normalize_weights False"
            )
        if xstart_target and self.name not in ("p2", "constant"):
            raise ValueError(
                f"--weighting {self.name} is defined on the ε-MSE, but --predict_xstart True trains on the x₀-MSE; "
                "use --predict_xstart False (or --weighting p2 or constant)"
            )

    def raw_table(self, snr):
        """The scheme's weight of the ε-MSE at each SNR_t, before normalisation; [T] float64."""
        snr = np.asarray(snr, dtype=np.float64)
        if self.name == "p2":
            return p2_weights(snr, self.p2_gamma, self.p2_k)
        if self.name == "min_snr":
            return min_snr_weights(snr, self.snr_gamma)
        if self.name == "soft_min_snr":
            return soft_min_snr_weights(snr, self.sigma_data)
        if self.name == "sigmoid":
            return sigmoid_weights(snr, self.sigmoid_bias)
        if self.name == "edm":
            return edm_weights(snr, self.sigma_data)
        return np.ones_like(snr)

    def table(self, snr):
        """(weights [T] float64, scale): the raw table times scale, where scale = 1/mean(raw table) with
        normalisation (the mean over the timesteps of `snr`, which uniform t draws) and 1 without.

        The loss-second-moment sampler draws t with probability p_t but multiplies each loss by 1/(T·p_t), so the
        expected weight of the ε-MSE is still the plain mean over t: the same scale makes it 1 for both samplers.
        """
        raw = self.raw_table(snr)
        if not self.normalize:
            return raw, 1.0
        scale = 1.0 / float(raw.mean())
        return raw * scale, scale

    def describe(self, weights, scale):
        """One line for the training log: the scheme, its parameters, the range and mean of `weights`, the scale."""
        parameters = {
            "p2": f"p2_gamma {self.p2_gamma:g}, p2_k {self.p2_k:g}",
            "min_snr": f"snr_gamma {self.snr_gamma:g}",
            "soft_min_snr": f"sigma_data {self.sigma_data:g}",
            "sigmoid": f"sigmoid_bias {self.sigmoid_bias:g}",
            "edm": f"sigma_data {self.sigma_data:g}",
            "constant": "all 1",
        }[self.name]
        normalised = f"normalised: raw weights x {scale:.6g}" if self.normalize else "not normalised"
        return (
            f"loss weighting {self.name} ({parameters}) of the ε-MSE; {normalised}; over the {len(weights)} "
            f"timesteps: min {weights.min():.4g}, max {weights.max():.4g}, mean {weights.mean():.4g}"
        )


def _check_positive(flag, value, meaning):
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{flag} must be a finite number > 0 ({meaning}), got {value}")


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
    # Imported here: gaussian_diffusion imports this module for its weight tables.
    from .gaussian_diffusion import SNR_STAGE_NAMES, snr_stage

    weights = np.asarray(weights, dtype=np.float64)
    total = weights.sum()
    stages = snr_stage(snr)
    quartile = (4 * np.arange(len(weights))) // len(weights)
    return {
        "mean": float(weights.mean()),
        "stage_share": {name: float(weights[stages == i].sum() / total) for i, name in enumerate(SNR_STAGE_NAMES)},
        "quartile_share": [float(weights[quartile == q].sum() / total) for q in range(4)],
    }
