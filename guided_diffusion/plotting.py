"""Figure helpers shared by the analysis scripts: the paper's SNR stages as shaded bands, atomic PNG writing."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from .fileio import atomic_write  # noqa: E402
from .gaussian_diffusion import SNR_STAGE_BOUNDS  # noqa: E402

STAGE_COLOURS = {"coarse": "#dde8f5", "content": "#f7e3c8", "cleanup": "#e4e4e4"}


def shade_stages(ax):
    """Shade the coarse (SNR < 1e-2), content (1e-2..1) and clean-up (> 1) stages on an axis whose x is SNR."""
    low, high = SNR_STAGE_BOUNDS
    ax.axvspan(1e-30, low, color=STAGE_COLOURS["coarse"], zorder=0, label="coarse")
    ax.axvspan(low, high, color=STAGE_COLOURS["content"], zorder=0, label="content")
    ax.axvspan(high, 1e30, color=STAGE_COLOURS["cleanup"], zorder=0, label="clean-up")


def save_figure(fig, path, dpi=120):
    """Write a matplotlib figure as PNG (atomically)."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def plot_distance_curves(snrs, curves, title, path, ylabel="perceptual distance"):
    """A PNG of distance curves against SNR (log axis), the paper's stages shaded.

    :param snrs: [S] SNRs.
    :param curves: (label, values [S, K], colour) per curve; drawn as the mean over K ± one standard deviation.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    shade_stages(ax)
    for label, values, colour in curves:
        mean, std = values.mean(axis=1), values.std(axis=1)
        ax.fill_between(snrs, mean - std, mean + std, color=colour, alpha=0.2)
        ax.plot(snrs, mean, color=colour, marker=".", label=label)
    ax.set(xscale="log", xlim=(snrs.min() / 1.5, snrs.max() * 1.5), xlabel="SNR of x_t", ylabel=ylabel)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_metrics_against_nfe(rows, path, title):
    """A PNG of FID and KID × 10³ against network evaluations per image (log axis), one line per sampler.

    :param rows: dicts with "sampler", "network_evaluations_per_image", "fid" and "kid_x1e3" (None: not computed).
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    samplers = list(dict.fromkeys(row["sampler"] for row in rows))
    for ax, key, name in ((axes[0], "fid", "FID"), (axes[1], "kid_x1e3", "KID × 10³")):
        for sampler in samplers:
            points = sorted((row["network_evaluations_per_image"], row[key]) for row in rows
                            if row["sampler"] == sampler and row[key] is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=sampler)
        ax.set(xscale="log", xlabel="network evaluations per image", ylabel=name, title=f"{name} against evaluations")
        # Ticks at the budgets themselves, as plain numbers (a log axis writes 2×10¹); of two close ones (Heun's 19
        # beside 20) only the larger.
        ticks = []
        for evaluations in sorted({row["network_evaluations_per_image"] for row in rows}, reverse=True):
            if not ticks or evaluations * 1.1 <= ticks[-1]:
                ticks.append(evaluations)
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
