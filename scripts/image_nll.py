r"""Bits per dimension of dataset images under a checkpoint (the reference's image_nll.py): the variational bound
of GaussianDiffusion.calc_bpd_loop, per image and per timestep.

    python scripts/image_nll.py --model_path runs/ffhq/ema_0.9999_100000.pt --data_dir data/ffhq_test \
        --num_samples 1000 --batch_size 8
    mpiexec -n 8 python -m mpi4py scripts/image_nll.py ...   (or torchrun --nproc_per_node 8 ...)

Images: the first --num_samples of --data_dir (a folder or zip, listed as training lists them; "" = the bundled
demo set; or a sample npz), centre-cropped to --image_size as training crops them and not flipped; all of them when
there are fewer. With --class_cond True each image's label comes from its file name, as in training.
Flag values: defaults (image_nll_defaults here, model_and_diffusion_defaults) -> --config FILE, or else the
config.yaml beside the checkpoint without its training options -> command-line flags, as for image_sample.py.
Output goes to --out_dir (default: beside the checkpoint, bpd_<checkpoint>[_<respacing>]): the reference's
vb_terms.npz, mse_terms.npz and xstart_mse_terms.npz, per-image bits/dim in bpd.npz and a summary in nll.json; the
layout is described in guided_diffusion/nll.py. Rerunning the same command resumes an interrupted run.
"""

import os

import numpy as np

from guided_diffusion import analysis, dist_util
from guided_diffusion.cli import script_main
from guided_diffusion.fileio import check_output_dir
from guided_diffusion.image_datasets import class_labels, open_image_source
from guided_diffusion.model_loading import (
    checkpoint_parser,
    load_model_and_diffusion,
    parse_checkpoint_args,
)
from guided_diffusion.nll import bpd_to_folder


def image_nll_defaults():
    """The script's own flags; the reference's first (data_dir, clip_denoised, num_samples, batch_size, model_path)."""
    return {
        "data_dir": "",                 # folder, zip or sample npz of the images; "" = the bundled demo set
        "clip_denoised": True,          # clamp x̂₀ to [-1, 1] in every term
        "num_samples": 1000,            # the first N images (all of them if there are fewer)
        "batch_size": 1,                # images per forward pass on each rank
        "model_path": "",               # checkpoint (U-Net state_dict: ema_*.pt, model*.pt, released .pt)
        "out_dir": "",                  # output folder; "" = beside the checkpoint, named after it
        "seed": 0,                      # image k's noise comes from the generator of (seed, k)
    }


def parse_args(argv=None):
    return parse_checkpoint_args(checkpoint_parser(__doc__, image_nll_defaults()), argv)


def default_out_dir(args):
    if "://" in args.model_path:
        raise ValueError(f"--model_path {args.model_path!r} is remote; pass --out_dir for the output")
    stem = os.path.splitext(os.path.basename(args.model_path))[0]
    spacing = f"_{args.timestep_respacing.replace(',', '-')}" if args.timestep_respacing else ""
    return os.path.join(os.path.dirname(os.path.abspath(args.model_path)), f"bpd_{stem}{spacing}")


def image_labels(data_dir, count):
    """Labels of a class-conditional evaluation: from the file names (the part before the first "_"), as training."""
    if data_dir.lower().endswith(".npz"):
        raise ValueError(
            f"--class_cond True needs labelled images, but --data_dir {data_dir!r} is an npz: pass the folder or zip "
            "of images named <label>_<name>, as for training"
        )
    names = open_image_source(data_dir).names
    return np.asarray(class_labels(names), dtype=np.int64)[:count]


@script_main(interrupted="finished batches are kept in the output folder; rerun the same command to resume")
def main(argv=None):
    """Run image_nll with `argv` (default sys.argv[1:]); returns the summary dict (nll.json)."""
    dist_util.setup_dist()
    try:
        return evaluate(parse_args(argv))
    finally:
        dist_util.cleanup()


def evaluate(args):
    rank, world_size = dist_util.rank_and_world_size()
    if not args.model_path:
        raise ValueError("--model_path is required: the checkpoint whose bits/dim to measure")
    out_dir = args.out_dir or default_out_dir(args)
    check_output_dir(out_dir, "--out_dir")
    image_set = analysis.ImageSet(args.data_dir, args.image_size)
    num_images = min(args.num_samples, len(image_set))
    labels = image_labels(args.data_dir, len(image_set)) if args.class_cond else None
    model, diffusion, identity = load_model_and_diffusion(args)
    if labels is not None and labels.max() >= model.num_classes:
        raise ValueError(
            f"--data_dir {image_set.path!r} names {labels.max() + 1} classes; the checkpoint knows {model.num_classes}"
        )
    if rank == 0 and num_images < args.num_samples:
        print(f"{image_set.path} holds {num_images} images: evaluating all of them (--num_samples {args.num_samples})")
    summary, evaluated = bpd_to_folder(
        model, diffusion, image_set, labels, num_images, args.batch_size, out_dir,
        identity={**identity, "images": image_set.path, "num_dataset_images": len(image_set)},
        seed=args.seed, clip_denoised=args.clip_denoised, device=dist_util.dev(), rank=rank, world_size=world_size,
        barrier=dist_util.barrier,
        details={"model_path": os.path.abspath(args.model_path), "images": image_set.path,
                 "timestep_respacing": args.timestep_respacing},
    )
    if rank == 0:
        error = summary["bpd_standard_error"]
        spread = f" ± {error:.4f} (standard error)" if error is not None else ""
        print(f"{summary['num_images']} images ({evaluated} evaluated now): {summary['bpd']:.4f} bits/dim{spread}, "
              f"prior {summary['prior_bpd']:.2e} -> {out_dir}", flush=True)
    return summary


if __name__ == "__main__":
    main()
