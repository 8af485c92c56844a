"""Train a noisy-image classifier for classifier guidance (the reference's classifier_train.py).

    python scripts/classifier_train.py --data_dir data/train --val_data_dir data/val --iterations 300000 \
        --anneal_lr True --batch_size 256 --lr 3e-4 --weight_decay 0.05 --image_size 128 \
        --classifier_attention_resolutions 32,16,8 --classifier_depth 2 --classifier_width 128 \
        --classifier_pool attention --classifier_resblock_updown True --classifier_use_scale_shift_norm True
    mpiexec -n 8 python -m mpi4py scripts/classifier_train.py ...   (or torchrun --nproc_per_node 8 ...)

Flag values: the defaults of guided_diffusion/classifier_util.py -> --config FILE (YAML) -> command-line flags.
Every flag of the reference keeps its name and default; --batch_size is per rank. The class of an image is its file
name before the first "_" (cat_0001.png), as for class-conditional diffusion training. The classifier has the
reference's 1000 outputs. Give the diffusion flags (--diffusion_steps, --noise_schedule, ...) of the diffusion model
it will guide: it learns to classify that process's x_t. --classifier_use_fp16 True means --precision fp16.
Output (--log_dir, default runs/<date>_<time>/, or the resumed checkpoint's folder): config.yaml, log.txt,
progress.csv, and per checkpoint modelNNNNNN.pt (the weights classifier_sample.py loads), optNNNNNN.pt and
stateNNNNNN.pt (guided_diffusion/classifier_train_loop.py). --resume_checkpoint takes a stateNNNNNN.pt, a
modelNNNNNN.pt (with optNNNNNN.pt beside it), a log dir or `auto`, as image_train.py. SIGTERM, SIGUSR1 and Ctrl-C
stop after the current step with a checkpoint of it; the exit code is 128 + the signal number.
"""

import argparse

import image_train
import numpy as np

from guided_diffusion import dist_util
from guided_diffusion.classifier_train_loop import ClassifierTrainLoop
from guided_diffusion.classifier_util import (
    classifier_and_diffusion_defaults,
    classifier_train_flag_defaults,
    create_classifier_and_diffusion,
)
from guided_diffusion.cli import script_main
from guided_diffusion.image_datasets import class_labels, load_data, open_image_source
from guided_diffusion.script_util import NUM_CLASSES, build_parser
from guided_diffusion.script_util import parse_args as parse_flags
from guided_diffusion.train_util import seed_everything

# Flags that may differ between a checkpoint's config and the run resuming it (where files go, when to log, save,
# validate or stop, how fast); --iterations too unless --anneal_lr ties the learning rate to it.
RESUME_MAY_CHANGE = frozenset({
    "log_dir", "resume_checkpoint", "log_interval", "save_interval", "save_interval_minutes", "keep_checkpoints",
    "num_workers", "data_dir", "val_data_dir", "eval_interval",
})


def parse_args(argv=None):
    return parse_flags(build_parser(classifier_train_flag_defaults(), __doc__), argv)


@script_main(interrupted="rerun with --resume_checkpoint auto --log_dir LOG_DIR to continue from its last checkpoint")
def main(argv=None):
    """Train with `argv` (default sys.argv[1:]); returns the finished ClassifierTrainLoop.

    :raises SystemExit: with 128 + the signal number after a stop signal.
    """
    args = parse_args(argv)
    check_flags(args)
    return image_train.train(args, build, "classifier_train.py")


def check_flags(args):
    """Refuse flags the classifier cannot train with, before any work."""
    if not args.data_dir:
        raise ValueError("--data_dir is required: a folder or .zip of images whose file names start with their class "
                         "and an underscore (cat_0001.png)")
    if args.classifier_use_fp16 and args.precision == "bf16":
        raise ValueError("--classifier_use_fp16 True asks for fp16 but --precision is bf16; pass only one of them")
    if args.schedule_sampler != "uniform":
        raise ValueError(f"--schedule_sampler {args.schedule_sampler!r}: the classifier trains on uniformly drawn t "
                         "(there is no diffusion loss to adapt the draws to); use uniform")
    if args.timestep_respacing:
        raise ValueError(f"--timestep_respacing {args.timestep_respacing!r}: the classifier learns every timestep of "
                         "the process (sampling gives it the original timesteps); drop the flag when training")


def check_classes(data_dir, flag):
    """The number of classes the file names of `data_dir` give; refuse fewer than 2 or more than the outputs."""
    source = open_image_source(data_dir)
    count = len(np.unique(class_labels(source.names)))
    if not 2 <= count <= NUM_CLASSES:
        raise ValueError(
            f"{flag} {data_dir!r} holds {count} class(es) by file name (the part before the first '_'); a classifier "
            f"needs 2 to {NUM_CLASSES}: name the files <class>_<anything>.png"
        )
    return count


def resolve_config(args, rank, world_size):
    """The flags as this run uses them (image_train.py's rules): precision resolved, log_dir chosen."""
    # classifier_use_fp16 is the reference's spelling of --precision fp16, as use_fp16 is for image_train.py.
    as_image_train = argparse.Namespace(**vars(args), use_fp16=args.classifier_use_fp16)
    config = image_train.resolve_config(as_image_train, rank, world_size)
    del config["use_fp16"]
    config["classifier_use_fp16"] = False  # the weights stay fp32 and are sampled as such
    return config


def build(args, held):
    """(ClassifierTrainLoop, training batches, resolved config) in a joined process group.

    :param held: a contextlib.ExitStack that keeps the log dir's lock (rank 0 takes it for the job) and closes the
        validation batches when it closes.
    """
    rank, world_size = dist_util.rank_and_world_size()
    classes = check_classes(args.data_dir, "--data_dir")
    if args.val_data_dir:
        check_classes(args.val_data_dir, "--val_data_dir")
    config = resolve_config(args, rank, world_size)
    log_dir = config["log_dir"]
    logger, resume_checkpoint = image_train.open_log_dir(
        args, log_dir, held, rank, world_size, f"a classifier of {NUM_CLASSES} outputs, trained on {classes} classes")
    seed_everything(args.seed)  # the same initial weights on every rank
    model, diffusion = create_classifier_and_diffusion(**{k: config[k] for k in classifier_and_diffusion_defaults()})
    seed_everything(int(np.random.SeedSequence([args.seed, rank]).generate_state(1)[0]))  # per-rank t and noise
    common = {"batch_size": args.batch_size, "image_size": args.image_size, "class_cond": True,
              "num_workers": args.num_workers, "seed": args.seed}
    data = load_data(data_dir=args.data_dir, random_crop=True, **common)
    val_data = load_data(data_dir=args.val_data_dir, **common) if args.val_data_dir else None
    if val_data is not None:
        held.callback(val_data.close)
    loop = ClassifierTrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        val_data=val_data,
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        weight_decay=args.weight_decay,
        anneal_lr=args.anneal_lr,
        iterations=args.iterations,
        noised=args.noised,
        log_interval=args.log_interval,
        eval_interval=args.eval_interval,
        save_interval=args.save_interval,
        save_interval_minutes=args.save_interval_minutes,
        resume_checkpoint=resume_checkpoint,
        log_dir=log_dir,
        precision=config["precision"],
        keep_checkpoints=args.keep_checkpoints,
        config=config,
        resume_may_change=RESUME_MAY_CHANGE if args.anneal_lr else RESUME_MAY_CHANGE | {"iterations"},
        logger=logger,
    )
    return loop, data, config


if __name__ == "__main__":
    main()
