"""Statistics of a paired-seed study: FID and KID of resampled feature sets, and percentile bootstrap intervals.

Fast exact FID of a resample. With the reference covariance S_r fixed, tr sqrt(S_r^½ S_g S_r^½) is the sum of the
square roots of the eigenvalues of A S_r Aᵀ, where S_g = AᵀA. A resample of the n generated features X [n, D] is
given by counts c_i (how often image i was drawn, Σc = n): its mean is Σ w_i x_i with w = c/n, its covariance
S_g = Σ c_i (x_i - μ)(x_i - μ)ᵀ/(n - 1), so A has the rows √(c_i/(n - 1))·(x_i - μ) of the images drawn. Every
term therefore comes from n x n Grams computed once per feature set (G = D S_r Dᵀ and H = D Dᵀ, D = X - μ_r):
indexing, double centering with w and one eigvalsh of at most n x n per resample, instead of a D x D sqrtm.

KID of a resample: the unbiased MMD² of clean-fid's cubic kernel k(x, y) = (x·y/D + 1)³ between all the drawn images
and all the reference images (no random subsets, so a resample's value is exact), from the Gram K_gg [n, n], the
row means of K_gr and the off-diagonal mean of K_rr.

Bootstrap (two levels; percentile intervals centred on the estimate, centred_interval): each draw resamples the
seeds with replacement and, within each seed drawn, the generated images (the same image indices for every arm:
sample i of every run starts from the same noise). The intervals cover the variation from seed to seed and from
the finite sample of images; not the reference set's, and not the choice of sampler or evaluation step. With 3
seeds the seed level has only 10 distinct resamples: the intervals are
coarse, and a paired difference that wins on 3 of 3 seeds is suggestive, not proof.
"""

import dataclasses

import numpy as np
import scipy.linalg
from tqdm.auto import tqdm


def cubic_kernel(x, y):
    """clean-fid's KID kernel (x·y/D + 1)³ of features x [n, D], y [m, D]; [n, m] float64."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


@dataclasses.dataclass
class ReferenceTerms:
    """What every resample's FID and KID share: the reference's mu [D], sigma [D, D], tr sigma, features [m, D]
    and the off-diagonal mean of its kernel matrix (float64)."""

    mu: np.ndarray
    sigma: np.ndarray
    trace_sigma: float
    features: np.ndarray
    kernel_mean: float

    @classmethod
    def from_statistics(cls, stats):
        """From evaluation.FeatureStatistics holding the reference features."""
        features = np.asarray(stats.features, dtype=np.float64)
        kernel = cubic_kernel(features, features)
        m = len(features)
        kernel_mean = (kernel.sum() - np.trace(kernel)) / (m * (m - 1))
        sigma = np.asarray(stats.sigma, dtype=np.float64)
        return cls(mu=np.asarray(stats.mu, dtype=np.float64), sigma=sigma, trace_sigma=float(np.trace(sigma)),
                   features=features, kernel_mean=float(kernel_mean))


class FeatureSetTerms:
    """The n x n Grams of one generated feature set X [n, D] against the reference, for fid(counts), kid(counts)."""

    def __init__(self, features, reference):
        x = np.asarray(features, dtype=np.float64)
        d = x - reference.mu
        self.n = len(x)
        self.reference = reference
        self.covariance_gram = d @ reference.sigma @ d.T  # G [n, n]
        self.gram = d @ d.T  # H [n, n]
        self.kernel = cubic_kernel(x, x)  # K_gg [n, n]
        self.cross_kernel_mean = cubic_kernel(x, reference.features).mean(axis=1)  # [n]

    def fid(self, counts=None):
        """FID of the resample drawing image i counts[i] times (None: every image once)."""
        counts = np.ones(self.n) if counts is None else np.asarray(counts, dtype=np.float64)
        drawn = np.flatnonzero(counts)
        c = counts[drawn]
        w = c / self.n
        h = self.gram[np.ix_(drawn, drawn)]
        mean_term = w @ h @ w
        trace_generated = (c @ np.diag(h) - self.n * mean_term) / (self.n - 1)
        g = self.covariance_gram[np.ix_(drawn, drawn)]
        r = g @ w
        centred = g - r[:, None] - r[None, :] + w @ r
        root_c = np.sqrt(c)
        # LAPACK's divide-and-conquer driver: several times faster than numpy's eigvalsh at n ~ 300-500.
        eigenvalues = scipy.linalg.eigh(root_c[:, None] * centred * root_c[None, :] / (self.n - 1),
                                        eigvals_only=True, driver="evd")
        root_trace = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
        return float(mean_term + trace_generated + self.reference.trace_sigma - 2.0 * root_trace)

    def kid(self, counts=None):
        """Unbiased MMD² (cubic kernel) of the resample against all reference images."""
        c = np.ones(self.n) if counts is None else np.asarray(counts, dtype=np.float64)
        generated = (c @ self.kernel @ c - c @ np.diag(self.kernel)) / (self.n * (self.n - 1))
        return float(generated + self.reference.kernel_mean - 2.0 * (c @ self.cross_kernel_mean) / self.n)


@dataclasses.dataclass
class ResamplePlan:
    """seed_picks [B, S]: the seed positions of each draw; counts [B, S, n]: the image counts within each (None: no
    image level)."""

    seed_picks: np.ndarray
    counts: np.ndarray | None

    @property
    def draws(self):
        return len(self.seed_picks)


def resample_plan(num_seeds, num_images, draws, seed):
    """A ResamplePlan from `seed` (fixed: reruns give the same intervals); num_images 0 resamples seeds only."""
    rng = np.random.default_rng(seed)
    seed_picks = rng.integers(0, num_seeds, size=(draws, num_seeds))
    counts = None
    if num_images:
        counts = rng.multinomial(num_images, np.full(num_images, 1.0 / num_images), size=(draws, num_seeds))
    return ResamplePlan(seed_picks, counts)


def bootstrap_values(metrics, plan, progress=None):
    """Per draw and position, each arm's metric of the seed drawn there on the images drawn there.

    :param metrics: {arm: callable(seed position, counts [n] or None) -> float}.
    :param progress: a tqdm label to show the draws done, or None for no bar.
    :return: {arm: [B, S] float64}; mean over axis 1 is the draw's mean over seeds.
    """
    values = {arm: np.empty(plan.seed_picks.shape) for arm in metrics}
    draws = plan.seed_picks if progress is None else tqdm(plan.seed_picks, progress, unit="draw", dynamic_ncols=True)
    for b, picks in enumerate(draws):
        for k, seed in enumerate(picks):
            counts = None if plan.counts is None else plan.counts[b, k]
            for arm, metric in metrics.items():
                values[arm][b, k] = metric(seed, counts)
    return values


def percentile_interval(draws, level):
    """The central `level` percentile interval (low, high) of bootstrap draws [B]."""
    low, high = np.quantile(np.asarray(draws), [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high)


def centred_interval(draws, point, level):
    """percentile_interval of the draws moved so that their mean is the point estimate `point`.

    A resample repeats some images and leaves others out, so its FID is biased upward (fewer distinct images make
    a noisier covariance); the plain percentile interval would then lie above the FID of the full set. Moving the
    draws by their bias keeps their spread and centres the interval on the estimate reported.
    """
    draws = np.asarray(draws, dtype=np.float64)
    return percentile_interval(draws - (draws.mean() - point), level)


def summarise_step(point, values, baseline, level):
    """Per arm at one eval step: mean over seeds with its interval, and the paired difference to `baseline`
    (centred_interval: bootstrap percentile intervals centred on the estimates).

    :param point: {arm: [S] the metric of each seed's full feature set}.
    :param values: {arm: [B, S] bootstrap values} (bootstrap_values).
    :return: {arm: {"mean", "low", "high", "per_seed", "diff", "diff_low", "diff_high", "wins"}}; wins counts the
        seeds on which the arm's metric is lower than the baseline's (None for the baseline itself).
    """
    summary = {}
    for arm, per_seed in point.items():
        per_seed = np.asarray(per_seed, dtype=np.float64)
        low, high = centred_interval(values[arm].mean(axis=1), per_seed.mean(), level)
        row = {"mean": float(per_seed.mean()), "low": low, "high": high, "per_seed": per_seed.tolist(),
                   "diff": None, "diff_low": None, "diff_high": None, "wins": None}
        if arm != baseline:
            differences = per_seed - np.asarray(point[baseline])
            diff_low, diff_high = centred_interval((values[arm] - values[baseline]).mean(axis=1),
                                                   differences.mean(), level)
            row.update(diff=float(differences.mean()), diff_low=diff_low, diff_high=diff_high,
                       wins=int((differences < 0).sum()))
        summary[arm] = row
    return summary


METRIC_SCALES = {"fid": ("fid", 1.0), "kid_x1e3": ("kid", 1e3)}  # reported metric: (FeatureSetTerms method, scale)


def summarise_metrics(terms, plan, baseline, level, progress=None):
    """summarise_step of FID and of KID × 10³ for every arm, from the same resamples.

    :param terms: {arm: [FeatureSetTerms of each seed]}, the seeds in the plan's positions.
    :param progress: a label for the draws' progress bars (one per metric), or None for none.
    :return: {"fid": {arm: summary}, "kid_x1e3": {arm: summary}}.
    """
    found = {}
    for metric, (method, scale) in METRIC_SCALES.items():
        point = {arm: [getattr(t, method)() * scale for t in ts] for arm, ts in terms.items()}
        functions = {arm: _metric_of_seed(ts, method, scale) for arm, ts in terms.items()}
        label = None if progress is None else f"{progress} {metric}"
        found[metric] = summarise_step(point, bootstrap_values(functions, plan, label), baseline, level)
    return found


def _metric_of_seed(terms, method, scale):
    return lambda seed, counts: getattr(terms[seed], method)(counts) * scale
