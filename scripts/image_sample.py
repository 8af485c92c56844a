r"""Generate samples from a checkpoint into an npz (ADM evaluator), a PNG folder (clean-fid) and a grid.

    python scripts/image_sample.py --model_path runs/ffhq/ema_0.9999_100000.pt --timestep_respacing 250 \
        --num_samples 50000 --batch_size 32
    mpiexec -n 8 python scripts/image_sample.py ...      (or torchrun --nproc_per_node 8 ...)

Where flag values come from, later winning:
  1. the defaults below and of script_util.model_and_diffusion_defaults();
  2. the model and diffusion flags of a YAML config: --config FILE, or else the config.yaml the training
     script saved beside the checkpoint, when there is one. Other keys of that file (training options such
     as lr or batch_size) are ignored: sampling options come from the command line only;
  3. flags given on the command line.
Output goes to --sample_dir, by default a folder beside the checkpoint named after it and the schedule
(e.g. samples_ema_0.9999_100000_250/); rerunning the same command resumes an interrupted run. The folder
layout, the quantiser and the seeding are described in guided_diffusion/sampling.py.
"""

import os
import pickle
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import dist_util  # noqa: E402
from guided_diffusion.model_loading import (  # noqa: E402
    checkpoint_parser,
    load_model_and_diffusion,
    parse_checkpoint_args,
)
from guided_diffusion.sampling import SamplingArgumentError, SamplingOptions, sample_to_folder  # noqa: E402
from guided_diffusion.speed_options import apply_speed_options  # noqa: E402


def sample_defaults():
    return dict(
        model_path="",               # checkpoint: a plain U-Net state_dict (model*.pt, ema_*.pt, released .pt)
        sample_dir="",               # output folder; "" = beside the checkpoint, named after it and the schedule
        num_samples=10000,
        batch_size=16,               # samples per forward pass on each rank
        use_ddim=False,              # DDIM over the respaced steps (any spacing) instead of ancestral sampling
        ddim_eta=0.0,                # η of DDIM; 0 = deterministic
        clip_denoised=True,          # clamp x̂₀ to [-1, 1] at every step
        seed=0,                      # sample i depends only on (seed, i), not on batch size or ranks
        precision="fp32",            # fp32, or bf16 / fp16 autocast of the network
        compile=False,               # torch.compile the U-Net (slow first batch; see README "Performance")
        channels_last="auto",        # NHWC convolutions: auto (on a CPU), true or false (README "Performance")
    )


def parse_args(argv=None):
    """(args, config path or None): defaults -> model/diffusion flags of the config -> command-line flags."""
    return parse_checkpoint_args(checkpoint_parser(__doc__, sample_defaults()), argv)


def default_sample_dir(args):
    """samples_<checkpoint>_<schedule>[_ddim|_ancestral][_eta..][_seed..][_precision][_use_fp16] beside the checkpoint.

    Only the usual variations are named; any other change is caught by the folder's run.json check.
    """
    if "://" in args.model_path:
        raise ValueError(f"--model_path {args.model_path!r} is remote; pass --sample_dir for the output")
    stem = os.path.splitext(os.path.basename(args.model_path))[0]
    spacing = args.timestep_respacing.replace(",", "-") or str(args.diffusion_steps)
    parts = [f"samples_{stem}", spacing]
    if args.use_ddim and not spacing.startswith("ddim"):
        parts.append("ddim")
    if not args.use_ddim and spacing.startswith("ddim"):
        parts.append("ancestral")
    if args.use_ddim and args.ddim_eta != 0:
        parts.append(f"eta{args.ddim_eta:g}")
    if args.seed != 0:
        parts.append(f"seed{args.seed}")
    if args.precision != "fp32":
        parts.append(args.precision)
    if args.use_fp16:
        parts.append("use_fp16")
    return os.path.join(os.path.dirname(os.path.abspath(args.model_path)), "_".join(parts))


def main(argv=None):
    """Run image_sample with `argv` (default sys.argv[1:]); returns the SamplingResult."""
    dist_util.setup_dist()
    try:
        return sample_with_flags(argv)
    finally:
        dist_util.cleanup()


def sample_with_flags(argv):
    rank, world_size = dist_util.rank_and_world_size()
    try:
        args, config = parse_args(argv)
        if not args.model_path:
            raise ValueError("--model_path is required: the checkpoint to sample from (e.g. ema_0.9999_100000.pt)")
        if rank == 0 and config:
            print(f"model/diffusion flags from {config} (command-line flags override)", flush=True)
        sample_dir = args.sample_dir or default_sample_dir(args)
        options = SamplingOptions(
            image_size=args.image_size,
            class_cond=args.class_cond,
            use_ddim=args.use_ddim,
            ddim_eta=args.ddim_eta,
            clip_denoised=args.clip_denoised,
            precision=args.precision,
            seed=args.seed,
        )
        model, diffusion, identity = load_model_and_diffusion(args)
        # Float rounding only: like --batch_size, these may move a rare pixel by one level, so they are not
        # part of the folder's identity.
        apply_speed_options(model, compile=args.compile, channels_last=args.channels_last, fold_upsample="auto",
                            device=dist_util.dev(), batch_size=args.batch_size)
    except (ValueError, FileNotFoundError, pickle.UnpicklingError) as e:
        # Bad flags, config or checkpoint: a message naming them, not a traceback.
        sys.exit(f"image_sample.py: error: {e}")
    try:
        result = sample_to_folder(
            model,
            diffusion,
            options,
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            sample_dir=sample_dir,
            identity=identity,
            device=dist_util.dev(),
            rank=rank,
            world_size=world_size,
            barrier=dist_util.barrier,
        )
    except SamplingArgumentError as e:
        sys.exit(f"image_sample.py: error: {e}")
    except KeyboardInterrupt:
        print(
            f"\nimage_sample.py: interrupted; finished samples are kept in {sample_dir}; rerun the same command "
            "to resume",
            file=sys.stderr,
        )
        sys.exit(130)
    if rank == 0:
        print(
            f"{result.num_samples} samples ({result.num_generated} generated now, {result.steps_per_sample} network "
            f"evaluations each, {result.network_evaluations} in total) -> {result.npz_path} | "
            f"PNGs: {result.images_dir} | grid: {result.grid_path}",
            flush=True,
        )
    return result


if __name__ == "__main__":
    main()
