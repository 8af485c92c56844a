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

Writes to --out_dir:
  samples_<sampler>[_<schedule>]_nfe<N>/   each configuration's samples (image_sample.py's resumable folder layout)
  sweep_samplers.md, .csv, .json           one row per configuration: sampler, steps, NFE (counted), FID, KID
  sweep_samplers_fid.png                   FID and KID × 10³ against NFE, one line per sampler
FID and KID are clean-fid's against --reference (see scripts/evaluate.py; --inception_path passes through).
"""

import copy
import os

from guided_diffusion import dist_util, inception, sweeps
from guided_diffusion.analysis import AnalysisError
from guided_diffusion.cli import script_main
from guided_diffusion.model_loading import checkpoint_parser, load_model_and_diffusion, parse_checkpoint_args
from guided_diffusion.plotting import plot_metrics_against_nfe
from guided_diffusion.respace import space_timesteps
from guided_diffusion.sampler_flags import resolve_sampler
from guided_diffusion.sampling import SamplingOptions

TABLE_COLUMNS = ("sampler", "steps", "network_evaluations_per_image", "num_samples", "fid", "kid_x1e3")
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
    return parse_checkpoint_args(parser, argv)


def configurations(args):
    """[(label, respacing, sampler fields)] for every sampler × budget, checked before any sampling; budgets that
    give a sampler the same steps as a smaller one are made once."""
    for flag in ("model_path", "out_dir", "reference"):
        if not getattr(args, flag):
            raise AnalysisError(f"--{flag} is required")
    if any(nfe < 1 for nfe in args.nfe):
        raise AnalysisError(f"--nfe {' '.join(map(str, args.nfe))}: every budget must be >= 1")
    found = []
    for token in args.samplers:
        name, _, schedule = token.partition(":")
        seen_steps = set()
        for nfe in sorted(args.nfe):
            steps = (nfe + 1) // 2 if name == "heun" else nfe
            if steps in seen_steps:
                continue
            seen_steps.add(steps)
            few_step = name not in ("ancestral", "ddim")
            try:
                fields = resolve_sampler(name, steps if few_step else 0, schedule)
            except ValueError as err:
                raise AnalysisError(f"--samplers {token}: {err}") from None
            respacing = "" if few_step else str(nfe)
            space_timesteps(args.diffusion_steps, respacing)  # a budget beyond the model's steps fails here
            label = f"{name}:{fields['step_schedule']}" if few_step else name
            found.append((label, respacing, fields))
    return found


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


def run(args):
    todo = configurations(args)
    network = inception.load_feature_network(args.mode, args.inception_path or None, str(dist_util.dev()))
    os.makedirs(args.out_dir, exist_ok=True)
    rows = [sample_configuration(args, *configuration, network) for configuration in todo]
    table = sweeps.write_tables(args.out_dir, "sweep_samplers", rows, TABLE_COLUMNS,
                                model_path=os.path.abspath(args.model_path), reference=args.reference, seed=args.seed)
    plot_metrics_against_nfe(rows, os.path.join(args.out_dir, "sweep_samplers_fid.png"),
                             f"{args.num_samples} samples each, seed {args.seed}")
    print(table + f"wrote {args.out_dir}/sweep_samplers.md, .csv, .json, sweep_samplers_fid.png")
    return rows


@script_main()
def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
