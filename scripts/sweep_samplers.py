r"""Sample one checkpoint with several samplers at several budgets of network evaluations and score each: FID/KID
against network evaluations per image (NFE), all with the same seeds.

    python scripts/sweep_samplers.py --model_path runs/demo/ema_0.99_001000.pt --reference datasets/emoji32.zip \
        --out_dir sweep_samplers --samplers ddim dpm++2m dpm++2m_sde heun --nfe 5 10 15 20 25 50 --num_samples 1000

A sampler is ancestral, ddim, dpm++2m, dpm++2m_sde or heun, the last three optionally with a step schedule
(dpm++2m:karras; default: the sampler's own, see scripts/image_sample.py). Each sampler gets, for each --nfe budget,
the most steps whose network evaluations do not exceed it: the budget itself, except Heun's (NFE + 1) // 2 steps
(2N - 1 evaluations); ancestral and DDIM sampling step through the uniform respacing "NFE" of the model's steps
(the checkpoint's own --timestep_respacing is not used). Sample i starts from the same x_T everywhere. Model and
diffusion flags come from --config, else the config.yaml beside the checkpoint, then the command line.

--paired BASE OTHER... compares configurations image by image, each named sampler[:schedule]@budget (a budget of
--nfe): e.g. `--paired ddim@50 dpm++2m@20` gives every OTHER's FID and KID minus BASE's with a 95 % interval from
--paired_draws bootstrap draws of the images, the same images for all (sample i starts from the same x_T
everywhere), so the interval reflects the finite sample of images, not the reference set or training seeds.

Writes to --out_dir:
  samples_<sampler>[_<schedule>]_nfe<N>/   each configuration's samples (image_sample.py's resumable folder layout),
                                           its metrics JSON and its Inception features (*_features.npz)
  sweep_samplers.md, .csv, .json           one row per configuration: sampler, steps, NFE (counted), FID, KID
  sweep_samplers_fid.png                   FID and KID × 10³ against NFE, one line per sampler
  sweep_samplers_paired.md, .csv, .json    with --paired: the differences to BASE and their intervals
FID and KID are clean-fid's against --reference (see scripts/evaluate.py; --inception_path passes through).
"""

import copy
import os

from guided_diffusion import dist_util, evaluation, inception, sweeps
from guided_diffusion.analysis import AnalysisError
from guided_diffusion.cli import script_main
from guided_diffusion.model_loading import checkpoint_parser, load_model_and_diffusion, parse_checkpoint_args
from guided_diffusion.plotting import plot_metrics_against_nfe
from guided_diffusion.respace import space_timesteps
from guided_diffusion.sampler_flags import RESPACED_SAMPLERS, resolve_sampler
from guided_diffusion.sampling import SamplingOptions

TABLE_COLUMNS = ("sampler", "steps", "network_evaluations_per_image", "num_samples", "fid", "kid_x1e3")
PAIRED_COLUMNS = ("sampler", "steps", "network_evaluations_per_image", "fid", "fid_diff", "fid_diff_low",
                  "fid_diff_high", "kid_x1e3", "kid_x1e3_diff", "kid_x1e3_diff_low", "kid_x1e3_diff_high")
DEFAULT_SAMPLERS = ["ddim", "dpm++2m", "dpm++2m_sde", "heun"]
DEFAULT_NFE = [5, 10, 15, 20, 25, 50]


def sweep_defaults():
    return sweeps.flag_defaults(num_samples=1000)


def parse_args(argv=None):
    parser = checkpoint_parser(__doc__, sweep_defaults())
    parser.add_argument("--samplers", nargs="+", default=DEFAULT_SAMPLERS,
                        help="samplers, space-separated, each optionally :schedule (default: %(default)s)")
    parser.add_argument("--nfe", nargs="+", type=int, default=DEFAULT_NFE,
                        help="network-evaluation budgets per image (default: %(default)s)")
    parser.add_argument("--paired", nargs="+", default=[], metavar="SAMPLER@BUDGET",
                        help="a baseline configuration, then those to compare with it image by image, e.g. "
                             "ddim@50 dpm++2m@20")
    parser.add_argument("--paired_draws", type=int, default=1000, help="bootstrap draws of --paired (%(default)s)")
    return parse_checkpoint_args(parser, argv)


def configurations(args):
    """([(label, respacing, sampler fields)] for every sampler × budget, {(label, budget): position}), checked before
    any sampling; budgets that give a sampler the same steps as a smaller one are made once (and map to it)."""
    for flag in ("model_path", "out_dir", "reference"):
        if not getattr(args, flag):
            raise AnalysisError(f"--{flag} is required")
    if any(nfe < 1 for nfe in args.nfe):
        raise AnalysisError(f"--nfe {' '.join(map(str, args.nfe))}: every budget must be >= 1")
    found, positions = [], {}
    for token in args.samplers:
        name, _, schedule = token.partition(":")
        made = {}  # steps -> position
        for nfe in sorted(args.nfe):
            steps = (nfe + 1) // 2 if name == "heun" else nfe
            if steps not in made:
                try:
                    fields = resolve_sampler(name, 0 if name in RESPACED_SAMPLERS else steps, schedule)
                except ValueError as err:
                    raise AnalysisError(f"--samplers {token}: {err}") from None
                respacing = str(nfe) if name in RESPACED_SAMPLERS else ""
                space_timesteps(args.diffusion_steps, respacing)  # a budget beyond the model's steps fails here
                made[steps] = len(found)
                found.append((sampler_label(name, fields), respacing, fields))
            positions[(found[made[steps]][0], nfe)] = made[steps]
    return found, positions


def sampler_label(name, fields):
    """The table's name of a sampler: ancestral, ddim, or the few-step sampler with its step schedule."""
    return name if name in RESPACED_SAMPLERS else f"{name}:{fields['step_schedule']}"


def paired_positions(args, positions):
    """Positions (configurations()) of the --paired configurations, baseline first; [] without --paired."""
    if not args.paired:
        return []
    if len(args.paired) < 2:
        raise AnalysisError(f"--paired {args.paired[0]}: name a baseline and at least one configuration to compare")
    if args.paired_draws < 2:
        raise AnalysisError(f"--paired_draws {args.paired_draws}: need at least 2 bootstrap draws")
    chosen = []
    for token in args.paired:
        sampler, _, budget = token.rpartition("@")
        name, _, schedule = sampler.partition(":")
        try:
            key = (sampler_label(name, resolve_sampler(name, 0 if name in RESPACED_SAMPLERS else 1, schedule)),
                   int(budget))
        except ValueError:
            key = None
        if key not in positions:
            raise AnalysisError(f"--paired {token}: not a configuration of this sweep; write SAMPLER@BUDGET with a "
                                f"sampler of --samplers and a budget of --nfe, e.g. {args.samplers[0]}@{args.nfe[0]}")
        chosen.append(positions[key])
    return chosen


def sample_configuration(args, label, respacing, fields, network):
    """Sample and score one configuration; returns its table row (dict)."""
    config_args = copy.copy(args)
    config_args.timestep_respacing = respacing
    model, diffusion, identity = load_model_and_diffusion(config_args)
    options = SamplingOptions(image_size=args.image_size, class_cond=args.class_cond, num_classes=model.num_classes or 0,
                              clip_denoised=args.clip_denoised, precision=args.precision, seed=args.seed, **fields)
    evaluations = sweeps.network_evaluations_per_image(model, diffusion, options, dist_util.dev())
    sample_dir = os.path.join(args.out_dir, f"samples_{label.replace(':', '_')}_nfe{evaluations}")
    scores = sweeps.sample_and_score(model, diffusion, identity, options, sample_dir, args, network, dist_util.dev())
    return dict(sampler=label, steps=fields["steps"] or diffusion.num_timesteps,
                network_evaluations_per_image=evaluations, **scores)


def paired_table(args, rows, positions, network):
    """Write sweep_samplers_paired.md/.csv/.json: rows[positions[1:]] against rows[positions[0]]; returns the md."""
    reference_stats, _ = evaluation.reference_statistics(args.reference, network, True, args.cache_dir,
                                                         batch_size=args.batch_size, device=str(dist_util.dev()))
    chosen = [rows[i] for i in positions]
    differences = sweeps.paired_differences(chosen, 0, reference_stats, args.paired_draws)
    paired = [dict({c: row[c] for c in PAIRED_COLUMNS[:3]}, **found) for row, found in zip(chosen, differences)]
    baseline = paired[0]
    return sweeps.write_tables(args.out_dir, "sweep_samplers_paired", paired, PAIRED_COLUMNS,
                               baseline=f"{baseline['sampler']} with {baseline['network_evaluations_per_image']} "
                                        "network evaluations",
                               level=sweeps.PAIRED_LEVEL, draws=args.paired_draws, reference=args.reference,
                               num_samples=args.num_samples, seed=args.seed)


def run(args):
    todo, positions = configurations(args)
    paired = paired_positions(args, positions)
    network = inception.load_feature_network(args.mode, args.inception_path or None, str(dist_util.dev()))
    os.makedirs(args.out_dir, exist_ok=True)
    rows = [sample_configuration(args, *configuration, network) for configuration in todo]
    table = sweeps.write_tables(args.out_dir, "sweep_samplers", rows, TABLE_COLUMNS,
                                model_path=os.path.abspath(args.model_path), reference=args.reference, seed=args.seed)
    plot_metrics_against_nfe(rows, os.path.join(args.out_dir, "sweep_samplers_fid.png"),
                             f"{args.num_samples} samples each, seed {args.seed}")
    print(table + f"wrote {args.out_dir}/sweep_samplers.md, .csv, .json, sweep_samplers_fid.png")
    if paired:
        print(paired_table(args, rows, paired, network)
              + f"wrote {args.out_dir}/sweep_samplers_paired.md, .csv, .json")
    return rows


@script_main()
def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
