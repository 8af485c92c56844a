"""What the sweep scripts (scripts/sweep_schedules.py, scripts/sweep_samplers.py) share: sample one configuration into
its resumable folder and score it, count its network evaluations, and write the table as md, csv and json."""

import os

from . import evaluation
from .analysis import CountingNetwork
from .fileio import write_csv, write_json, write_text
from .sampling import generate_batch, sample_to_folder


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
    :return: dict with the table fields num_samples, fid, kid, kid_x1e3, samples (npz path), feature_network.
    """
    result = sample_to_folder(model, diffusion, options, num_samples=args.num_samples, batch_size=args.batch_size,
                              sample_dir=sample_dir, identity=identity, device=device)
    metrics = evaluation.evaluate(result.npz_path, args.reference, network, metrics=args.metrics,
                                  cache_dir=args.cache_dir, batch_size=args.batch_size, device=str(device))
    evaluation.save_results_json(metrics, os.path.splitext(result.npz_path)[0] + "_metrics.json")
    return {"num_samples": result.num_samples, "fid": metrics["fid"], "kid": metrics["kid"],
            "kid_x1e3": metrics["kid_x1e3"], "samples": result.npz_path, "feature_network": metrics["feature_network"]}


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
