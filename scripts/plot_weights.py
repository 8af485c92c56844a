"""Draw the weighting schemes of the paper (Fig. 3 and Fig. A) and the weightings beside P2 (docs/weightings.md),
and print their summary statistics.

Writes to --out_dir:
  fig3_weights.png      SNR of each schedule; baseline λ_t and P2 λ'_t against SNR (log axes), per schedule
  figA_weights.png      λ'_t against t, normalised to sum 1 against t and against SNR; the paper's stages shaded
  weights.csv           t, schedule, SNR_t, and per γ: the P2 factor w_t and λ'_t
  summary.json          per schedule and γ: mean w_t, shares of total w per paper stage and per quarter of t
  schemes_weights.png   per schedule, the ε-MSE weight of every --schemes entry: raw and normalised (mean 1 over t)
                        against t, and normalised against SNR; the paper's stages shaded
  schemes.csv           schedule, t, SNR_t, and per scheme: its raw and its normalised weight
  schemes_summary.json  per schedule and scheme: mean raw weight, the normalising scale (1/mean), shares of the
                        total weight per paper stage and per quarter of t

Example:
  python scripts/plot_weights.py --out_dir figures/weights --gammas 0,0.5,1 --schedules linear,cosine
"""

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from guided_diffusion.cli import script_main  # noqa: E402
from guided_diffusion.fileio import write_csv, write_json  # noqa: E402
from guided_diffusion.gaussian_diffusion import SNR_STAGE_NAMES, snr_stage  # noqa: E402
from guided_diffusion.plotting import STAGE_COLOURS, save_figure, shade_stages  # noqa: E402
from guided_diffusion.script_util import create_gaussian_diffusion  # noqa: E402
from guided_diffusion.weighting import WEIGHTINGS, p2_lambda, weight_summary  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", required=True, help="folder for the figures and numbers")
    parser.add_argument("--gammas", default="0,0.5,1", help="comma list of γ; 0 is the baseline")
    parser.add_argument("--p2_k", type=float, default=1.0, help="k of Eq. (8)")
    parser.add_argument("--schedules", default="linear,cosine", help="comma list of noise schedules")
    parser.add_argument("--diffusion_steps", type=int, default=1000, help="T")
    parser.add_argument("--schemes", default=",".join(WEIGHTINGS),
                        help=f"comma list of --weighting values to draw side by side ({', '.join(WEIGHTINGS)})")
    parser.add_argument("--p2_gamma", type=float, default=1.0, help="γ of the p2 scheme among --schemes")
    parser.add_argument("--snr_gamma", type=float, default=5.0, help="γ of min_snr")
    parser.add_argument("--sigmoid_bias", type=float, default=-3.0, help="b of sigmoid")
    parser.add_argument("--sigma_data", type=float, default=0.5, help="σ_data of soft_min_snr and edm")
    args = parser.parse_args(argv)
    try:
        args.gammas = [float(g) for g in args.gammas.split(",")]
    except ValueError:
        parser.error(f"--gammas {args.gammas!r}: expected comma-separated numbers such as 0,0.5,1")
    args.schedules = args.schedules.split(",")
    args.schemes = args.schemes.split(",")
    unknown = [name for name in args.schemes if name not in WEIGHTINGS]
    if unknown:
        parser.error(f"--schemes: {', '.join(unknown)} unknown; use names among {', '.join(WEIGHTINGS)}")
    return args


def compute_tables(schedules, gammas, p2_k, steps):
    """{schedule: {"snr": [T], "gammas": {γ: {"w": [T], "lambda": [T], "summary": dict}}}}."""
    tables = {}
    for schedule in schedules:
        entry = {"gammas": {}}
        for gamma in gammas:
            diffusion = create_gaussian_diffusion(steps=steps, noise_schedule=schedule, p2_gamma=gamma, p2_k=p2_k)
            entry["snr"] = diffusion.snr
            entry["gammas"][gamma] = {
                "w": diffusion.p2_weight,
                "lambda": p2_lambda(diffusion),
                "summary": weight_summary(diffusion.p2_weight, diffusion.snr),
            }
        tables[schedule] = entry
    return tables


def compute_scheme_tables(args):
    """{schedule: {"snr": [T], "schemes": {label: {"raw": [T], "normalised": [T], "summary": dict}}}}: the ε-MSE
    weights that training with `--weighting <scheme>` and these parameters uses."""
    parameters = {"p2_k": args.p2_k, "snr_gamma": args.snr_gamma, "sigmoid_bias": args.sigmoid_bias,
                  "sigma_data": args.sigma_data}
    tables = {}
    for schedule in args.schedules:
        entry = {"schemes": {}}
        for name in args.schemes:
            diffusion = create_gaussian_diffusion(
                steps=args.diffusion_steps, noise_schedule=schedule, weighting=name,
                p2_gamma=args.p2_gamma if name == "p2" else 0.0, normalize_weights=True, **parameters)
            raw = diffusion.loss_weight / diffusion.loss_weight_scale
            entry["snr"] = diffusion.snr
            entry["schemes"][scheme_label(diffusion.loss_weighting)] = {
                "raw": raw,
                "normalised": diffusion.loss_weight,
                "summary": {**weight_summary(raw, diffusion.snr), "normalising_scale": diffusion.loss_weight_scale},
            }
        tables[schedule] = entry
    return tables


def scheme_label(weighting):
    """A scheme's name and parameters, e.g. "min_snr γ=5"."""
    return {
        "p2": f"p2 γ={weighting.p2_gamma:g} k={weighting.p2_k:g}",
        "min_snr": f"min_snr γ={weighting.snr_gamma:g}",
        "soft_min_snr": f"soft_min_snr σ_d={weighting.sigma_data:g}",
        "sigmoid": f"sigmoid b={weighting.sigmoid_bias:g}",
        "edm": f"edm σ_d={weighting.sigma_data:g}",
        "constant": "constant",
    }[weighting.name]


def shade_stages_over_t(ax, snr):
    """Shade the paper's stages on an axis whose x is t (the SNR falls with t, so each stage is one interval)."""
    stages = snr_stage(snr)
    for index, name in enumerate(SNR_STAGE_NAMES):
        ts = (stages == index).nonzero()[0]
        if len(ts):
            ax.axvspan(ts.min() - 0.5, ts.max() + 0.5, color=STAGE_COLOURS[name], zorder=0)


def plot_schemes(tables, path):
    plot_views(
        {schedule: (entry["snr"], [(label, values["raw"], values["normalised"])
                                   for label, values in entry["schemes"].items()])
         for schedule, entry in tables.items()},
        path, "weight of the ε-MSE", "weight / its mean over t", log_normalised=True,
    )


def write_scheme_numbers(tables, out_dir):
    labels = list(next(iter(tables.values()))["schemes"])
    header = ["schedule", "t", "snr"] + [f"{label} {kind}" for label in labels for kind in ("raw", "normalised")]
    rows = [
        [schedule, t, float(snr)]
        + [float(entry["schemes"][label][kind][t]) for label in labels for kind in ("raw", "normalised")]
        for schedule, entry in tables.items()
        for t, snr in enumerate(entry["snr"])
    ]
    write_csv(os.path.join(out_dir, "schemes.csv"), header, rows)
    summary = {
        schedule: {label: values["summary"] for label, values in entry["schemes"].items()}
        for schedule, entry in tables.items()
    }
    write_json(os.path.join(out_dir, "schemes_summary.json"), summary)
    return summary


def print_scheme_summary(summary):
    print(f"\n{'schedule':<9} {'scheme (weight of the ε-MSE)':<26} {'mean w':>9} {'scale':>9}   "
          f"{'coarse':>7} {'content':>7} {'cleanup':>7}")
    for schedule, per_scheme in summary.items():
        for label, s in per_scheme.items():
            stages = s["stage_share"]
            print(
                f"{schedule:<9} {label:<26} {s['mean']:9.4g} {s['normalising_scale']:9.4g}   "
                f"{stages['coarse']:7.3f} {stages['content']:7.3f} {stages['cleanup']:7.3f}"
            )


def gamma_label(gamma):
    return "baseline (γ=0)" if gamma == 0 else f"P2 γ={gamma:g}"


def plot_fig3(tables, path):
    fig, axes = plt.subplots(1, 1 + len(tables), figsize=(5 * (1 + len(tables)), 4))
    for schedule, entry in tables.items():
        axes[0].plot(entry["snr"], label=schedule)
    axes[0].set(yscale="log", xlabel="t", ylabel="SNR(t)", title="SNR of the schedules")
    axes[0].legend()
    for ax, (schedule, entry) in zip(axes[1:], tables.items()):
        shade_stages(ax)
        for gamma, values in entry["gammas"].items():
            ax.plot(entry["snr"], values["lambda"], label=gamma_label(gamma))
        ax.set(xscale="log", yscale="log", xlabel="SNR(t)", ylabel="weight λ'_t", title=f"{schedule} schedule")
        ax.set_xlim(entry["snr"].min(), entry["snr"].max())
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_fig_a(tables, path):
    plot_views(
        {schedule: (entry["snr"], [(gamma_label(gamma), values["lambda"], values["lambda"] / values["lambda"].sum())
                                   for gamma, values in entry["gammas"].items()])
         for schedule, entry in tables.items()},
        path, "λ'_t", "λ'_t / Σλ'", log_normalised=False,
    )


def plot_views(rows, path, ylabel, normalised_ylabel, log_normalised):
    """One row of three panels per schedule: each curve raw against t, normalised against t, and normalised against
    SNR, with the paper's stages shaded.

    :param rows: {schedule: (snr [T], [(label, raw [T], normalised [T])])}.
    """
    fig, axes = plt.subplots(len(rows), 3, figsize=(15, 4 * len(rows)), squeeze=False)
    yscale = "log" if log_normalised else "linear"
    for row, (schedule, (snr, curves)) in zip(axes, rows.items()):
        shade_stages_over_t(row[0], snr)
        shade_stages_over_t(row[1], snr)
        shade_stages(row[2])
        for label, raw, normalised in curves:
            row[0].plot(raw, label=label)
            row[1].plot(normalised, label=label)
            row[2].plot(snr, normalised, label=label)
        row[0].set(yscale="log", xlabel="t", ylabel=ylabel, title=f"{schedule}: raw")
        row[1].set(yscale=yscale, xlabel="t", ylabel=normalised_ylabel, title=f"{schedule}: normalised")
        row[2].set(xscale="log", yscale=yscale, xlabel="SNR(t)", ylabel=normalised_ylabel,
                   title=f"{schedule}: normalised vs SNR")
        row[2].set_xlim(snr.min(), snr.max())
        for ax in row:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_numbers(tables, out_dir):
    gammas = list(next(iter(tables.values()))["gammas"])
    header = ["schedule", "t", "snr"] + [f"w_gamma{g:g}" for g in gammas] + [f"lambda_gamma{g:g}" for g in gammas]
    rows = [
        [schedule, t, float(snr)]
        + [float(entry["gammas"][g]["w"][t]) for g in gammas]
        + [float(entry["gammas"][g]["lambda"][t]) for g in gammas]
        for schedule, entry in tables.items()
        for t, snr in enumerate(entry["snr"])
    ]
    write_csv(os.path.join(out_dir, "weights.csv"), header, rows)
    summary = {
        schedule: {f"{gamma:g}": values["summary"] for gamma, values in entry["gammas"].items()}
        for schedule, entry in tables.items()
    }
    write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary


def print_summary(summary):
    print(f"{'schedule':<9} {'gamma':>5} {'mean w':>8}   {'coarse':>7} {'content':>7} {'cleanup':>7}   quartile shares")
    for schedule, per_gamma in summary.items():
        for gamma, s in per_gamma.items():
            stages = s["stage_share"]
            quartiles = " ".join(f"{q:.3f}" for q in s["quartile_share"])
            print(
                f"{schedule:<9} {gamma:>5} {s['mean']:8.4f}   {stages['coarse']:7.3f} {stages['content']:7.3f} "
                f"{stages['cleanup']:7.3f}   {quartiles}"
            )


@script_main()
def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    tables = compute_tables(args.schedules, args.gammas, args.p2_k, args.diffusion_steps)
    plot_fig3(tables, os.path.join(args.out_dir, "fig3_weights.png"))
    plot_fig_a(tables, os.path.join(args.out_dir, "figA_weights.png"))
    summary = write_numbers(tables, args.out_dir)
    print_summary(summary)
    scheme_tables = compute_scheme_tables(args)
    plot_schemes(scheme_tables, os.path.join(args.out_dir, "schemes_weights.png"))
    print_scheme_summary(write_scheme_numbers(scheme_tables, args.out_dir))
    print(f"wrote {args.out_dir}/fig3_weights.png, figA_weights.png, weights.csv, summary.json, "
          "schemes_weights.png, schemes.csv, schemes_summary.json")


if __name__ == "__main__":
    main()
