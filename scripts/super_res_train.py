"""Train a super-resolution diffusion model (the reference's super_res_train.py), with image_train.py's machinery.

    python scripts/super_res_train.py --data_dir data/imagenet --large_size 256 --small_size 64 \
        --num_channels 192 --num_res_blocks 2 --attention_resolutions 32,16,8 --num_heads 4 \
        --resblock_updown True --use_scale_shift_norm True --learn_sigma True --class_cond True
    mpiexec -n 8 python -m mpi4py scripts/super_res_train.py ...   (or torchrun --nproc_per_node 8 ...)

The model (guided_diffusion/super_res.py) denoises --large_size crops of --data_dir conditioned on the same crop
downsampled to --small_size by area averaging, as the reference makes its low-resolution input. Flags: the
reference's (sr_model_and_diffusion_defaults in guided_diffusion/script_util.py, with --large_size / --small_size
instead of --image_size) and image_train.py's training flags, through the same order: defaults -> --config FILE ->
command-line flags. There is no in-training evaluation (image_train.py's --eval_* flags). Output, checkpoints,
resume (--resume_checkpoint auto), P2 weighting, precision and stop signals are those of image_train.py; sample
the checkpoints with scripts/super_res_sample.py.
"""

import image_train

from guided_diffusion.cli import script_main
from guided_diffusion.script_util import (
    build_parser,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
    train_defaults,
)
from guided_diffusion.script_util import parse_args as parse_flags
from guided_diffusion.super_res import LowResBatches


def parse_args(argv=None):
    return parse_flags(build_parser({**sr_model_and_diffusion_defaults(), **train_defaults()}, __doc__), argv)


def create_super_res_model(config):
    """(SuperResModel, diffusion) of the resolved flags."""
    return sr_create_model_and_diffusion(**{k: config[k] for k in sr_model_and_diffusion_defaults()})


def load_super_res_data(args):
    """--large_size batches with cond["low_res"]: the batch itself, area-downsampled to --small_size."""
    return LowResBatches(image_train.load_training_data(args, args.large_size), args.small_size)


def build(args, held):
    return image_train.build(args, held, create=create_super_res_model, load=load_super_res_data)


@script_main(interrupted=image_train.INTERRUPTED_ADVICE)
def main(argv=None):
    """Train with `argv` (default sys.argv[1:]); returns the finished TrainLoop."""
    return image_train.train(parse_args(argv), build, "super_res_train.py")


if __name__ == "__main__":
    main()
