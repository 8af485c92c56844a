r"""Training curves of one or more runs from their progress.csv (loss per SNR stage; FID/KID through training, paper
Fig. 4), runs overlaid, e.g. a baseline and its P2 twin.

    python scripts/plot_training.py --runs runs/ffhq_baseline:baseline runs/ffhq_p2:P2 --out_dir figures/training

--runs takes progress.csv files or the run folders holding them, each optionally followed by :LABEL (default: the
folder's name). The x axis is the number of training images seen (column `samples`).

Writes to --out_dir:
  training_losses.png   weighted ε-MSE (`mse`, × (k + SNR_t)^-γ) and unweighted ε-MSE (`mse_raw`), over all t and
                        per SNR stage (columns `*_coarse`, `*_content`, `*_cleanup`), log scale
  training_fid.png      FID and KID × 10³ at the evaluation steps (columns `fid`, `kid_x1e3`); written only when
                        some run has them
  training_summary.json / training_summary.csv   per run: rows, last step and images seen, the last value of each
                        plotted column, and the best FID with the images seen when it was reached
A run whose progress.csv lacks a column (e.g. the reference code's logs, which have no mse_raw or stage columns)
is left out of that panel only.
"""

import argparse
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from guided_diffusion.plotting import save_figure  # noqa: E402
from guided_diffusion.cli import script_main  # noqa: E402
from guided_diffusion.fileio import write_csv, write_json  # noqa: E402
from guided_diffusion.analysis import AnalysisError  # noqa: E402
from guided_diffusion.gaussian_diffusion import SNR_STAGE_BOUNDS  # noqa: E402
from guided_diffusion.logger import PROGRESS_FILE, read_progress  # noqa: E402

LOW, HIGH = SNR_STAGE_BOUNDS
LOSS_ROWS = (("mse", "weighted ε-MSE"), ("mse_raw", "unweighted ε-MSE"))
STAGE_COLUMNS = (
    ("", "all t"),
    ("_coarse", f"coarse (SNR < {LOW:g})"),
    ("_content", f"content ({LOW:g} ≤ SNR ≤ {HIGH:g})"),
    ("_cleanup", f"clean-up (SNR > {HIGH:g})"),
)
METRIC_PANELS = (("fid", "FID"), ("kid_x1e3", "KID × 10³"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="progress.csv files or run folders, each [:LABEL]")
    parser.add_argument("--out_dir", required=True, help="folder for the figures and the summary")
    parser.add_argument("--smooth", type=int, default=1, help="trailing mean over this many logged rows (losses)")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error(f"--smooth {args.smooth} must be >= 1")
    return args


def parse_run(spec):
    """"path[:label]" -> (progress.csv path, label); a path that exists as given never loses a ':' to a label."""
    path, label = spec, None
    if not os.path.exists(spec) and ":" in spec:
        path, _, label = spec.rpartition(":")
    if os.path.isdir(path):
        path = os.path.join(path, PROGRESS_FILE)
    if not os.path.isfile(path):
        raise AnalysisError(f"--runs {spec!r}: {path} does not exist; give a progress.csv or the run folder holding it")
    return path, label or os.path.basename(os.path.dirname(os.path.abspath(path)))


def progress_table(path):
    """{column: float64 [rows]} of a progress.csv; cells a row did not log are NaN."""
    try:
        rows = read_progress(path)
    except ValueError as err:
        raise AnalysisError(str(err)) from None
    if not rows:
        raise AnalysisError(f"{path} has no rows")
    columns = dict.fromkeys(key for row in rows for key in row)
    table = {column: np.array([row.get(column, math.nan) for row in rows]) for column in columns}
    if "samples" not in table:
        raise AnalysisError(f"{path} has no column 'samples' (training images seen), which is the x axis")
    return table


def valid_points(table, column):
    """(samples, values) where `column` was logged; empty arrays where the run has no such column."""
    if column not in table:
        return np.array([]), np.array([])
    keep = ~np.isnan(table[column])
    return table["samples"][keep], table[column][keep]


def trailing_mean(values, window):
    """values[i] averaged with up to window - 1 values before it."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.arange(1, len(values) + 1) - counts]) / counts


def plot_losses(runs, smooth, path):
    size = (4.5 * len(STAGE_COLUMNS), 3.6 * len(LOSS_ROWS))
    fig, axes = plt.subplots(len(LOSS_ROWS), len(STAGE_COLUMNS), figsize=size, squeeze=False)
    for row_axes, (key, what) in zip(axes, LOSS_ROWS):
        for ax, (suffix, stage) in zip(row_axes, STAGE_COLUMNS):
            for label, table in runs:
                samples, values = valid_points(table, key + suffix)
                if len(values):
                    ax.plot(samples, trailing_mean(values, smooth), label=label, linewidth=1)
            ax.set(yscale="log", xlabel="training images seen", ylabel=key + suffix, title=f"{what}: {stage}")
            if ax.has_data():
                ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_metrics(runs, path):
    fig, axes = plt.subplots(1, len(METRIC_PANELS), figsize=(5.5 * len(METRIC_PANELS), 4), squeeze=False)
    for ax, (key, name) in zip(axes[0], METRIC_PANELS):
        for label, table in runs:
            samples, values = valid_points(table, key)
            if len(values):
                ax.plot(samples, values, marker="o", label=label)
        ax.set(xlabel="training images seen", ylabel=name, title=f"{name} through training")
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def summarise(path, label, table):
    """The summary record of one run: last step and images seen, last logged value of each plotted column, best FID."""
    columns = [key + suffix for key, _ in LOSS_ROWS for suffix, _ in STAGE_COLUMNS] + [k for k, _ in METRIC_PANELS]
    record = dict(label=label, path=os.path.abspath(path), rows=len(table["samples"]),
                  last_step=int(table["step"][-1]) if "step" in table else None, last_samples=int(table["samples"][-1]))
    for column in columns:
        _, values = valid_points(table, column)
        record[f"final_{column}"] = float(values[-1]) if len(values) else None
    samples, fid = valid_points(table, "fid")
    best = int(np.argmin(fid)) if len(fid) else None
    record["best_fid"] = None if best is None else float(fid[best])
    record["best_fid_samples"] = None if best is None else int(samples[best])
    return record


def run(args):
    specs = [parse_run(spec) for spec in args.runs]
    runs = [(label, progress_table(path)) for path, label in specs]
    os.makedirs(args.out_dir, exist_ok=True)
    figures = [os.path.join(args.out_dir, "training_losses.png")]
    plot_losses(runs, args.smooth, figures[0])
    if any(len(valid_points(table, key)[1]) for _, table in runs for key, _ in METRIC_PANELS):
        figures.append(os.path.join(args.out_dir, "training_fid.png"))
        plot_metrics(runs, figures[1])
    else:
        print("no run has fid/kid_x1e3 values: training_fid.png not written")
    records = [summarise(path, label, table) for (path, label), (_, table) in zip(specs, runs)]
    write_json(os.path.join(args.out_dir, "training_summary.json"), dict(runs=records, figures=figures))
    header = list(records[0])
    write_csv(os.path.join(args.out_dir, "training_summary.csv"), header, [[r[k] for k in header] for r in records])
    for record in records:
        best = record["best_fid"]
        best = "" if best is None else f", best FID {best:.3f} at {record['best_fid_samples']} images"
        print(f"{record['label']}: {record['rows']} rows, {record['last_samples']} images seen{best}")
    print(f"wrote {', '.join(figures)} and training_summary.json/.csv")
    return records


@script_main()
def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
