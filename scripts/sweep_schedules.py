r"""Sample one checkpoint with several respacing schedules and evaluate each (paper Table 4).

    python scripts/sweep_schedules.py --model_path runs/ffhq_p2/ema_0.9999_100000.pt \
        --schedules 250 130,60,60 60,130,60 500 --num_samples 10000 --reference data/ffhq256 --out_dir sweep

A schedule is a --timestep_respacing value: "250" (uniform), "130,60,60" (steps given to each third of the
process; more near t = 0 first), "ddim50", ... Schedules are separated by spaces, their sections by commas.
Every schedule samples with the same --seed, so sample i starts from the same x_T in each. The model and diffusion
flags come from --config, else the config.yaml beside the checkpoint, then the command line (as in image_sample.py).

Writes to --out_dir:
  samples_<schedule>[_ddim]/   the samples of each schedule (image_sample.py's resumable folder layout)
  sweep.md, sweep.csv, sweep.json   one row per schedule: steps, network evaluations per image (counted), FID, KID
  sweep_fid.png                FID and KID × 10³ per schedule
FID and KID are clean-fid's against --reference (see scripts/evaluate.py; --inception_path passes through).
"""

import copy
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from guided_diffusion import dist_util, inception, sweeps  # noqa: E402
from guided_diffusion.plotting import save_figure  # noqa: E402
from guided_diffusion.analysis import AnalysisError  # noqa: E402
from guided_diffusion.cli import script_main  # noqa: E402
from guided_diffusion.model_loading import checkpoint_parser, load_model_and_diffusion, parse_checkpoint_args  # noqa: E402,E501
from guided_diffusion.respace import space_timesteps  # noqa: E402
from guided_diffusion.sampling import SamplingOptions  # noqa: E402

TABLE_COLUMNS = ("schedule", "sampler", "steps", "network_evaluations_per_image", "num_samples", "fid", "kid_x1e3")


def sweep_defaults():
    return dict(
        sweeps.flag_defaults(num_samples=10000),  # the paper's 10k samples per schedule
        use_ddim=False,              # DDIM over each schedule's steps instead of ancestral sampling
        ddim_eta=0.0,
    )


def parse_args(argv=None):
    parser = checkpoint_parser(__doc__, sweep_defaults())
    parser.add_argument("--schedules", nargs="+", default=["250", "130,60,60", "60,130,60", "500"],
                        help="respacing schedules, space-separated (default: Table 4's)")
    return parse_checkpoint_args(parser, argv)


def check_args(args):
    for flag in ("model_path", "out_dir", "reference"):
        if not getattr(args, flag):
            raise AnalysisError(f"--{flag} is required")
    for schedule in args.schedules:
        space_timesteps(args.diffusion_steps, schedule)  # a bad schedule fails here, before any sampling


def sample_schedule(args, schedule, network):
    """Sample and evaluate one schedule; returns its table row (dict)."""
    schedule_args = copy.copy(args)
    schedule_args.timestep_respacing = schedule
    model, diffusion, identity = load_model_and_diffusion(schedule_args)
    options = SamplingOptions(image_size=args.image_size, class_cond=args.class_cond, use_ddim=args.use_ddim,
                              ddim_eta=args.ddim_eta, clip_denoised=args.clip_denoised, precision=args.precision,
                              seed=args.seed, num_classes=model.num_classes or 0)
    sampler = "ddim" if args.use_ddim else "ancestral"
    folder = f"samples_{schedule.replace(',', '-')}" + ("_ddim" if args.use_ddim else "")
    sample_dir = os.path.join(args.out_dir, folder)
    scores = sweeps.sample_and_score(model, diffusion, identity, options, sample_dir, args, network, dist_util.dev())
    return dict(schedule=schedule, sampler=sampler, steps=diffusion.num_timesteps,
                network_evaluations_per_image=network_evaluations_per_image(model, diffusion, options), **scores)


def network_evaluations_per_image(model, diffusion, options):
    """Counted network calls per image; ancestral and DDIM sampling make one call per respaced step."""
    return sweeps.network_evaluations_per_image(model, diffusion, options, dist_util.dev())


def plot(rows, path):
    labels = [row["schedule"] for row in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, name in ((axes[0], "fid", "FID"), (axes[1], "kid_x1e3", "KID × 10³")):
        values = [row[key] if row[key] is not None else 0.0 for row in rows]
        bars = ax.bar(range(len(rows)), values)
        ax.bar_label(bars, labels=[f"{v:.2f}" if row[key] is not None else "–" for v, row in zip(values, rows)],
                     fontsize=8)
        ax.set_xticks(range(len(rows)), labels)
        ax.set(xlabel="respacing schedule", ylabel=name, title=f"{name} per sampling schedule")
    fig.suptitle(f"{rows[0]['num_samples']} samples each, {rows[0]['sampler']} sampler", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def run(args):
    check_args(args)
    network = inception.load_feature_network(args.mode, args.inception_path or None, str(dist_util.dev()))
    os.makedirs(args.out_dir, exist_ok=True)
    rows = [sample_schedule(args, schedule, network) for schedule in args.schedules]
    table = sweeps.write_tables(args.out_dir, "sweep", rows, TABLE_COLUMNS, model_path=os.path.abspath(args.model_path),
                                reference=args.reference, seed=args.seed)
    plot(rows, os.path.join(args.out_dir, "sweep_fid.png"))
    print(table + f"wrote {args.out_dir}/sweep.md, sweep.csv, sweep.json, sweep_fid.png")
    return rows


@script_main()
def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
