"""The outputs of a paired-seed study (scripts/ablate.py): study.md, study.csv, study.json and two figures.

study.csv, one row per line, long format:
  kind      run (one run's score), mean (an arm's mean over seeds), diff (an arm minus the baseline arm, paired)
  arm       the arm spec; seed: the seed (run rows only); step: training steps; images_seen: step x global batch
  metric    fid or kid_x1e3 (KID x 10³); value: the score, mean or mean difference
  ci_low, ci_high   the percentile bootstrap interval (mean and diff rows); wins: seeds where the arm's score is
            lower than the baseline's (diff rows); n_seeds: seeds averaged
"""

import importlib.metadata
import os

import numpy as np

from .checkpoint import read_config
from .fileio import write_csv, write_json, write_text
from .logger import read_progress
from .plotting import plt, save_figure
from .study_stats import resample_plan, summarise_metrics

METRICS = (("fid", "FID"), ("kid_x1e3", "KID x 10³"))
STAGES = ("coarse", "content", "cleanup")
MSE_TAIL = 0.25  # the unweighted ε-MSE per stage is averaged over this last fraction of the logged rows
CSV_COLUMNS = ("kind", "arm", "seed", "step", "images_seen", "metric", "value", "ci_low", "ci_high", "wins", "n_seeds")


def summarise(args, arms, runs, evaluator, baseline):
    """{step: {metric: {arm spec: summary}}} (study_stats.summarise_metrics), bootstrapping the cached features."""
    plan = resample_plan(len(args.seeds), args.num_samples, args.bootstrap_draws, args.bootstrap_seed)
    by_arm = {arm.spec: [run for run in runs if run.arm.spec == arm.spec] for arm in arms}
    steps = {}
    for step in sorted(args.eval_steps):
        terms = {spec: [evaluator.terms(run, step) for run in arm_runs] for spec, arm_runs in by_arm.items()}
        steps[step] = summarise_metrics(terms, plan, baseline, args.ci_level)
    return steps


def global_batch(run):
    """Images per step of a finished run (its config.yaml's batch_size; one rank)."""
    return int(read_config(run.log_dir)["batch_size"])


def stage_mse(run):
    """{stage: mean unweighted ε-MSE (mse_raw_<stage>) over the last MSE_TAIL of the run's progress.csv rows}."""
    rows = [row for row in read_progress(run.log_dir) if "mse_raw" in row]
    tail = rows[int(len(rows) * (1 - MSE_TAIL)):] or rows
    return {stage: float(np.mean([row[f"mse_raw_{stage}"] for row in tail if f"mse_raw_{stage}" in row] or [np.nan]))
            for stage in STAGES}


def csv_rows(summary, runs, arms, batches):
    rows = []
    for step, metrics in summary.items():
        for metric, per_arm in metrics.items():
            for arm in arms:
                row = per_arm[arm.spec]
                seen = step * batches[arm.spec]
                arm_runs = [run for run in runs if run.arm.spec == arm.spec]
                for run, value in zip(arm_runs, row["per_seed"]):
                    rows.append(["run", arm.spec, run.seed, step, seen, metric, value, None, None, None, 1])
                n = len(row["per_seed"])
                rows.append(["mean", arm.spec, None, step, seen, metric, row["mean"], row["low"], row["high"], None, n])
                if row["diff"] is not None:
                    rows.append(["diff", arm.spec, None, step, seen, metric, row["diff"], row["diff_low"],
                                 row["diff_high"], row["wins"], n])
    return rows


def markdown(summary, arms, baseline, args, batches):
    level = f"{args.ci_level:.0%}"
    n = len(args.seeds)

    def interval(value, low, high):
        return "–" if value is None else f"{value:.4g} [{low:.4g}, {high:.4g}]"

    def table(steps, with_step):
        head = (["step", "images seen"] if with_step else []) + [
            "arm", f"FID mean [{level} CI]", f"KID x 10³ mean [{level} CI]", f"ΔFID vs {baseline} [{level} CI]",
            f"ΔKID x 10³ vs {baseline} [{level} CI]", "FID wins"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for step in steps:
            for arm in arms:
                fid, kid = summary[step]["fid"][arm.spec], summary[step]["kid_x1e3"][arm.spec]
                cells = ([str(step), str(step * batches[arm.spec])] if with_step else []) + [
                    f"`{arm.spec}`", interval(fid["mean"], fid["low"], fid["high"]),
                    interval(kid["mean"], kid["low"], kid["high"]), interval(fid["diff"], fid["diff_low"],
                                                                            fid["diff_high"]),
                    interval(kid["diff"], kid["diff_low"], kid["diff_high"]),
                    "–" if fid["wins"] is None else f"{fid['wins']}/{n}"]
                lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    final = max(summary)
    return (
        f"# Study: {len(arms)} arms x {n} seeds, {args.max_steps} steps\n\n"
        f"Base config `{args.base_config}`; evaluation: {args.num_samples} samples per run and step, sampler "
        f"{args.sampler} ({args.sampler_steps} steps), sample seed {args.sample_seed}, the same for every arm. "
        f"Means over seeds with {level} percentile bootstrap intervals ({args.bootstrap_draws} draws, seed "
        f"{args.bootstrap_seed}; seeds and images resampled). Δ: the arm minus `{baseline}` on the same seeds "
        "(lower is better); wins: seeds on which the arm's FID is lower.\n\n"
        f"## At step {final}\n\n{table([final], False)}\n## Every evaluation step\n\n{table(sorted(summary), True)}"
    )


def plot_fid(summary, arms, batches, path, title):
    """FID against images seen per arm, the bootstrap interval as a band."""
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = sorted(summary)
    for arm in arms:
        rows = [summary[step]["fid"][arm.spec] for step in steps]
        seen = [step * batches[arm.spec] for step in steps]
        line = ax.plot(seen, [r["mean"] for r in rows], marker="o", label=arm.spec)[0]
        ax.fill_between(seen, [r["low"] for r in rows], [r["high"] for r in rows], color=line.get_color(), alpha=0.2)
    ax.set(xlabel="images seen", ylabel="FID", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_stage_mse(mse, arms, path, title):
    """Unweighted ε-MSE per SNR stage, one bar per arm (mean over seeds, whiskers: the lowest and highest seed)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(arms)
    for a, arm in enumerate(arms):
        values = np.array([[per_run[stage] for stage in STAGES] for per_run in mse[arm.spec]])
        centre = values.mean(axis=0)
        x = np.arange(len(STAGES)) + (a - (len(arms) - 1) / 2) * width
        ax.bar(x, centre, width, label=arm.spec,
               yerr=[centre - values.min(axis=0), values.max(axis=0) - centre], capsize=2)
    ax.set_xticks(np.arange(len(STAGES)), ["coarse\nSNR < 1e-2", "content\n1e-2..1", "clean-up\nSNR > 1"])
    ax.set(yscale="log", ylabel="unweighted ε-MSE", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_report(args, arms, runs, summary, evaluations, baseline):
    """Write study.md, .csv, .json, study_fid.png and study_mse.png into args.out_dir; returns the md text."""
    batches = {arm.spec: global_batch(next(run for run in runs if run.arm.spec == arm.spec)) for arm in arms}
    text = markdown(summary, arms, baseline, args, batches)
    out = args.out_dir
    write_text(os.path.join(out, "study.md"), text)
    write_csv(os.path.join(out, "study.csv"), list(CSV_COLUMNS), csv_rows(summary, runs, arms, batches))
    mse = {run.name: stage_mse(run) for run in runs}
    versions = {name: importlib.metadata.version(name) for name in ("torch", "clean-fid", "numpy", "scipy")}
    write_json(os.path.join(out, "study.json"), {
        "config": vars(args), "baseline": baseline, "versions": versions,
        "arms": [{"spec": arm.spec, "slug": arm.slug, "flags": arm.flags} for arm in arms],
        "runs": [{"run": run.name, "arm": run.arm.spec, "seed": run.seed, "log_dir": run.log_dir,
                  "stage_mse": mse[run.name], "evaluations": [e for e in evaluations if e["run"] == run.name]}
                 for run in runs],
        "steps": {str(step): metrics for step, metrics in summary.items()},
    })
    title = f"{len(args.seeds)} seeds, {args.num_samples} samples, {args.ci_level:.0%} bootstrap band"
    plot_fid(summary, arms, batches, os.path.join(out, "study_fid.png"), title)
    by_arm = {arm.spec: [mse[run.name] for run in runs if run.arm.spec == arm.spec] for arm in arms}
    plot_stage_mse(by_arm, arms, os.path.join(out, "study_mse.png"),
                   f"last {MSE_TAIL:.0%} of training, {len(args.seeds)} seeds (whiskers: min..max)")
    return text
