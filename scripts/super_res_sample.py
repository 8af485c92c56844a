r"""Upsample base samples with a super-resolution checkpoint (the reference's super_res_sample.py); outputs and
resuming as image_sample.py's.

    MODEL_FLAGS="--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --large_size 256 \
        --small_size 64 --learn_sigma True --noise_schedule linear --num_channels 192 --num_heads 4 \
        --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True"
    python scripts/super_res_sample.py $MODEL_FLAGS --model_path models/64_256_upsampler.pt \
        --base_samples 64_samples.npz --batch_size 4 --num_samples 100 --timestep_respacing 250
    mpiexec -n 8 python -m mpi4py scripts/super_res_sample.py ...   (or torchrun --nproc_per_node 8 ...)

--base_samples: an npz of image_sample.py (arr_0 uint8 [N, small_size, small_size, 3]; with --class_cond True also
arr_1, the labels). Sample i upsamples base sample i mod N with its label, so --num_samples above N upsamples the
base samples again with other noise, as the reference's loop over them did.
Flags: the defaults of guided_diffusion/script_util.py (sample_defaults and sr_model_and_diffusion_defaults) -> a
YAML config (--config FILE, or else the config.yaml super_res_train.py saved beside the checkpoint, without its
training options) -> command-line flags. Samplers, seeding, precision and the output folder are image_sample.py's
(see its --help); the default folder, beside the checkpoint, also names the base samples. A rerun of the same
command resumes; the folder's run.json records the base samples' SHA-256, so other base samples need another
--sample_dir.
"""

import os

import image_sample

from guided_diffusion import dist_util
from guided_diffusion.cli import script_main
from guided_diffusion.fileio import file_sha256
from guided_diffusion.model_loading import (
    SUPER_RES_MODEL,
    checkpoint_parser,
    load_model_and_diffusion,
    parse_checkpoint_args,
)
from guided_diffusion.script_util import sample_defaults
from guided_diffusion.super_res import BaseSamples


def parse_args(argv=None):
    """Namespace: defaults -> the config (args.config, "" if none) -> command-line flags."""
    defaults = {**sample_defaults(), "base_samples": ""}  # npz of the low-resolution images to upsample
    return parse_checkpoint_args(checkpoint_parser(__doc__, defaults, SUPER_RES_MODEL), argv, SUPER_RES_MODEL)


@script_main(interrupted=image_sample.INTERRUPTED_ADVICE)
def main(argv=None):
    """Upsample with `argv` (default sys.argv[1:]); returns the SamplingResult."""
    dist_util.setup_dist()
    try:
        return upsample(parse_args(argv))
    finally:
        dist_util.cleanup()


def upsample(args):
    rank, world_size = dist_util.rank_and_world_size()
    if not args.base_samples:
        raise ValueError("--base_samples is required: the npz of low-resolution samples to upsample")
    if not os.path.isfile(args.base_samples):
        raise FileNotFoundError(f"--base_samples {args.base_samples!r} does not exist")
    base = BaseSamples(args.base_samples, args.small_size, args.class_cond)
    stem = os.path.splitext(os.path.basename(args.base_samples))[0]
    sampler, sample_dir = image_sample.prepare(args, rank, dir_suffix=f"_from_{stem}")
    model, diffusion, identity = load_model_and_diffusion(args, SUPER_RES_MODEL)
    if args.class_cond:
        base.check_labels(model.num_classes)
    identity = {**identity, "base_samples_sha256": file_sha256(args.base_samples)}
    return image_sample.sample(args, model, diffusion, identity, sampler, sample_dir, args.large_size, rank,
                               world_size, conditioning=base.model_kwargs)


if __name__ == "__main__":
    main()
