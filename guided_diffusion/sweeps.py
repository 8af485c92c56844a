"""What the sweep scripts (scripts/sweep_schedules.py, scripts/sweep_samplers.py) share: sample one configuration into
its resumable folder and score it (keeping its Inception features), count its network evaluations, compare
configurations image by image (paired bootstrap), and write the tables as md, csv and json."""

import os

from . import evaluation
from .analysis import CountingNetwork
from .fileio import write_csv, write_json, write_text
from .sampling import generate_batch, sample_to_folder
from .study_stats import FeatureSetTerms, ReferenceTerms, resample_plan, summarise_metrics

PAIRED_LEVEL = 0.95  # central interval of the paired differences


def flag_defaults(num_samples):
    """The flags every sweep script takes, with their defaults: the checkpoint, the outputs, the sampling run shared by
    all configurations (a schedule or a sampler at a budget) and the scoring, as scripts/evaluate.py scores."""
    return dict(
        model_path="",               # checkpoint (U-Net state_dict: ema_*.pt, model*.pt)
        out_dir="",                  # folder for the samples, table and figure (required)
        reference="",                # reference images or statistics for FID/KID (see scripts/evaluate.py; required)
        num_samples=num_samples,     # samples per configuration
        batch_size=16,               # samples per forward pass
        clip_denoised=True,
        seed=0,                      # the same for every configuration
        precision="fp32",            # fp32, or bf16 / fp16 autocast of the network
        metrics="fid,kid",
        mode="clean",                # clean-fid preprocessing mode
        inception_path="",           # clean-fid's inception-2015-12-05.pt (offline machines)
        cache_dir=evaluation.DEFAULT_CACHE_DIR,  # reference statistics cache
    )


def sample_and_score(model, diffusion, identity, options, sample_dir, args, network, device):
    """Sample args.num_samples images into `sample_dir` (resuming) and score them against args.reference.

    :param args: the sweep's flags: num_samples, batch_size, reference, metrics, cache_dir.
    :param network: the feature network (inception.load_feature_network).
    :return: dict with the table fields num_samples, fid, kid, kid_x1e3, samples (npz path), features (npz path of
        the samples' features [N, D], float32, under the key "features"; paired_differences reads it),
        feature_network.
    """
    result = sample_to_folder(model, diffusion, options, num_samples=args.num_samples, batch_size=args.batch_size,
                              sample_dir=sample_dir, identity=identity, device=device)
    metrics, features = evaluation.evaluate_with_features(result.npz_path, args.reference, network,
                                                          metrics=args.metrics, cache_dir=args.cache_dir,
                                                          batch_size=args.batch_size, device=str(device))
    stem = os.path.splitext(result.npz_path)[0]
    evaluation.save_results_json(metrics, stem + "_metrics.json")
    evaluation.save_features(stem + "_features.npz", features)
    return {"num_samples": result.num_samples, "fid": metrics["fid"], "kid": metrics["kid"],
            "kid_x1e3": metrics["kid_x1e3"], "samples": result.npz_path, "features": stem + "_features.npz",
            "feature_network": metrics["feature_network"]}


def paired_differences(rows, baseline, reference_stats, draws, seed=0):
    """FID and KID × 10³ of each row minus the baseline row's, with paired bootstrap intervals over the images.

    Sample i of every configuration starts from the same x_T, so the images of two configurations are pairs. Each
    bootstrap draw takes n image indices with replacement and scores every configuration on those same indices
    (study_stats: exact FID and KID of a resample); the interval is the central PAIRED_LEVEL percentile interval of
    the drawn differences, centred on the difference of the full sets. It covers the finite sample of images
    (their x_T), not the reference set's finiteness nor other training runs.

    :param rows: table rows (sample_and_score) with "features"; rows[baseline] is the baseline.
    :param reference_stats: evaluation.FeatureStatistics of the reference with its features.
    :return: one dict per row: fid, fid_diff, fid_diff_low, fid_diff_high and the same for kid_x1e3 (the
        baseline's differences are None); FID and KID are the exact values of the full feature sets.
    """
    reference = ReferenceTerms.from_statistics(reference_stats)
    terms = {i: [FeatureSetTerms(evaluation.load_features(row["features"]), reference)] for i, row in enumerate(rows)}
    sizes = {ts[0].n for ts in terms.values()}
    if len(sizes) != 1:
        raise ValueError(f"paired configurations hold different numbers of samples {sorted(sizes)}")
    plan = resample_plan(1, sizes.pop(), draws, seed)  # one "seed": image resampling only
    found = [{} for _ in rows]
    for metric, summary in summarise_metrics(terms, plan, baseline, PAIRED_LEVEL, progress="paired").items():
        for i, row in summary.items():
            found[i].update({metric: row["mean"], f"{metric}_diff": row["diff"], f"{metric}_diff_low": row["diff_low"],
                             f"{metric}_diff_high": row["diff_high"]})
    return found


def network_evaluations_per_image(model, diffusion, options, device="cpu"):
    """Network calls per image of the sampler, counted: sample 0 is generated again (in memory) through a wrapper
    that counts the images each call evaluates."""
    counting = CountingNetwork(model)
    generate_batch(counting, diffusion, [0], options, device)
    return counting.rows


def markdown_table(rows, columns):
    def cell(value):
        if value is None:
            return "–"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_tables(out_dir, stem, rows, columns, **header):
    """Write <stem>.md (the `columns`), <stem>.csv and <stem>.json (every field, after `header`); returns the md text."""
    table = markdown_table(rows, columns)
    write_text(os.path.join(out_dir, f"{stem}.md"), table)
    write_csv(os.path.join(out_dir, f"{stem}.csv"), list(rows[0]), [list(row.values()) for row in rows])
    write_json(os.path.join(out_dir, f"{stem}.json"), dict(header, rows=rows))
    return table
