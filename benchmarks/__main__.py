"""Time one training step and one sampling step per setting, interleaved; print a table, write JSON / markdown.

Run from the repository root (the `benchmarks` folder beside `guided_diffusion` is not installed with it):

    python -m benchmarks --config tiny32 --settings eager,compile            # two settings of ours
    python -m benchmarks --compare eager channels_last                        # their ratio
    python -m benchmarks --config tiny32 --settings reference,eager,channels_last,compile \\
        --reference_path ../P2-weighting --out bench.json --markdown bench.md      # the README table
    python -m benchmarks --sampling_cost                                      # network evaluations table

Settings: `eager` (this code base in the NCHW layout, every upsample folded into its conv), `reference` (the
original code at --reference_path: a clone of jychoi118/P2-weighting or openai/guided-diffusion), or options joined
by "+": compile, channels_last, nofold (no upsample folded), auto (layout and folds measured on this CPU, as
image_train.py and image_sample.py choose them by default), bf16.
What is timed: benchmarks/__init__.py; how memory is measured: benchmarks/probes.py.
"""

import argparse
import shlex
import sys

from guided_diffusion.cli import script_main

from .report import format_comparison, format_markdown, format_sampling_cost, format_table, write_json, write_text
from .run import BenchmarkPlan, run_benchmark
from .settings import CONFIGS, EAGER_SETTING, REFERENCE_SETTING

COMMAND = ("python", "-m", "benchmarks")


def build_parser():
    parser = argparse.ArgumentParser(
        prog=" ".join(COMMAND), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="tiny32", help=f"one of {', '.join(CONFIGS)}")
    parser.add_argument("--settings", default="",
                        help="comma-separated settings; default: eager (reference,eager with --reference_path)")
    parser.add_argument("--compare", nargs=2, metavar=("SETTING_A", "SETTING_B"), default=None,
                        help="time two settings interleaved and print B's speed-up over A")
    parser.add_argument("--phases", default="train,sample", help="train, sample or both")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per setting (compilation happens here)")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per setting")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = all cores")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="", help="cpu or cuda[:i]; default: cuda:0 if present, else cpu")
    parser.add_argument("--reference_path", default="", help="the reference code, for the 'reference' setting")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    parser.add_argument("--markdown", default="", help="write the README tables (markdown) here")
    parser.add_argument("--sampling_cost", action="store_true",
                        help="print the sampling-cost table (network evaluations per image) and exit")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def settings_from_args(args, parser):
    if args.compare and args.settings:
        parser.error("pass either --compare A B or --settings, not both")
    if args.compare:
        return list(args.compare)
    if args.settings:
        return [s.strip() for s in args.settings.split(",") if s.strip()]
    return [REFERENCE_SETTING, EAGER_SETTING] if args.reference_path else [EAGER_SETTING]


@script_main()
def main(argv=None):
    """Parse `argv` (default: the command line), run the plan, print and write the reports; the result dict."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sampling_cost:
        print(format_sampling_cost())
        return None
    plan = BenchmarkPlan(
        config_name=args.config,
        settings=settings_from_args(args, parser),
        phases=tuple(p.strip() for p in args.phases.split(",") if p.strip()),
        warmup=args.warmup,
        repeats=args.repeats,
        threads=args.threads,
        seed=args.seed,
        device=args.device,
        reference_path=args.reference_path,
        progress=not args.no_progress,
    )
    plan.check()
    result = run_benchmark(plan)
    command = shlex.join([*COMMAND, *(sys.argv[1:] if argv is None else argv)])
    result["meta"]["command"] = command
    print(format_table(result))
    if args.compare:
        print(format_comparison(result))
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    if args.markdown:
        write_text(args.markdown, format_markdown(result, command) + "\n")
        print(f"wrote {args.markdown}")
    return result


if __name__ == "__main__":
    main()
