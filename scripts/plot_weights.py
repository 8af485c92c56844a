"""Draw the weighting schemes of the paper (Fig. 3 and Fig. A) and print their summary statistics.

Writes to --out_dir:
  fig3_weights.png   SNR of each schedule; baseline λ_t and P2 λ'_t against SNR (log axes), per schedule
  figA_weights.png   λ'_t against t, normalised to sum 1 against t and against SNR
  weights.csv        t, schedule, SNR_t, and per γ: the P2 factor w_t and λ'_t
  summary.json       per schedule and γ: mean w_t, shares of total w per paper stage and per quarter of t

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
from guided_diffusion.plotting import save_figure, shade_stages  # noqa: E402
from guided_diffusion.script_util import create_gaussian_diffusion  # noqa: E402
from guided_diffusion.weighting import p2_lambda, weight_summary  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", required=True, help="folder for the figures and numbers")
    parser.add_argument("--gammas", default="0,0.5,1", help="comma list of γ; 0 is the baseline")
    parser.add_argument("--p2_k", type=float, default=1.0, help="k of Eq. (8)")
    parser.add_argument("--schedules", default="linear,cosine", help="comma list of noise schedules")
    parser.add_argument("--diffusion_steps", type=int, default=1000, help="T")
    args = parser.parse_args(argv)
    try:
        args.gammas = [float(g) for g in args.gammas.split(",")]
    except ValueError:
        parser.error(f"--gammas {args.gammas!r}: expected comma-separated numbers such as 0,0.5,1")
    args.schedules = args.schedules.split(",")
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
    fig, axes = plt.subplots(len(tables), 3, figsize=(15, 4 * len(tables)), squeeze=False)
    for row, (schedule, entry) in zip(axes, tables.items()):
        shade_stages(row[2])
        for gamma, values in entry["gammas"].items():
            normalised = values["lambda"] / values["lambda"].sum()
            row[0].plot(values["lambda"], label=gamma_label(gamma))
            row[1].plot(normalised, label=gamma_label(gamma))
            row[2].plot(entry["snr"], normalised, label=gamma_label(gamma))
        row[0].set(yscale="log", xlabel="t", ylabel="λ'_t", title=f"{schedule}: unnormalised")
        row[1].set(xlabel="t", ylabel="λ'_t / Σλ'", title=f"{schedule}: normalised")
        row[2].set(xscale="log", xlabel="SNR(t)", ylabel="λ'_t / Σλ'", title=f"{schedule}: normalised vs SNR")
        row[2].set_xlim(entry["snr"].min(), entry["snr"].max())
        for ax in row:
            ax.legend(fontsize=8)
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
    print(f"wrote {args.out_dir}/fig3_weights.png, figA_weights.png, weights.csv, summary.json")


if __name__ == "__main__":
    main()
