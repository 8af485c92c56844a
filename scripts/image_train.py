"""Train a diffusion model on images (the reference's image_train.py, with P2 weighting and exact resume).

    python scripts/image_train.py                                    # the demo: configs/demo.yaml
    python scripts/image_train.py --config configs/ffhq_p2.yaml --data_dir data/ffhq
    mpiexec -n 8 python scripts/image_train.py ...                   (or torchrun --nproc_per_node 8 ...)

Flag values: the defaults below and of script_util -> --config FILE (YAML) -> command-line flags. Without any
argument the demo config is used. Every reference flag keeps its name and default (COMPAT §5); --use_fp16 True
means --precision fp16 (the weights stay fp32; the forward pass runs under autocast).
Output (--log_dir, default runs/<date>_<time>/, or the resumed checkpoint's folder): config.yaml (the resolved
flags; image_sample.py reads it), log.txt, progress.csv and the checkpoints described in
guided_diffusion/checkpoint.py. --resume_checkpoint takes a stateNNNNNN.pt, a modelNNNNNN.pt or a log dir.
"""

import os
import sys
import time

import numpy as np
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import checkpoint, dist_util  # noqa: E402
from guided_diffusion.evaluation import EvaluationError  # noqa: E402
from guided_diffusion.image_datasets import DEMO_DATASET, load_data  # noqa: E402
from guided_diffusion.logger import Logger  # noqa: E402
from guided_diffusion.resample import create_named_schedule_sampler  # noqa: E402
from guided_diffusion.script_util import (  # noqa: E402
    create_gaussian_diffusion,
    create_model_and_diffusion,
    diffusion_defaults,
    model_and_diffusion_defaults,
    parse_args_with_config,
)
from guided_diffusion.train_eval import TrainingEvaluator, eval_defaults, sampling_options  # noqa: E402
from guided_diffusion.train_util import TrainLoop, resolve_precision, seed_everything  # noqa: E402
from guided_diffusion.speed_options import apply_speed_options  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO_ROOT, "configs", "demo.yaml")
RUNS_DIR = "runs"


def train_defaults():
    """Training flags: the reference's, then this project's additions."""
    return dict(
        data_dir="",                 # image folder or .zip; "" = the bundled demo set (datasets/emoji32.zip)
        log_dir="",                  # "" = runs/<date>_<time>/ (or the folder of --resume_checkpoint)
        schedule_sampler="uniform",  # "uniform" or "loss-second-moment"
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,           # decay the LR linearly to 0 at this step and stop there; 0 = off
        batch_size=1,                # images per rank per step
        microbatch=-1,               # images per forward pass; -1 = the whole batch
        ema_rate="0.9999",           # comma-separated EMA rates
        log_interval=10,             # steps between progress.csv rows
        save_interval=10000,         # steps between checkpoints
        resume_checkpoint="",        # stateNNNNNN.pt, modelNNNNNN.pt or a log dir
        use_fp16=False,              # the reference's spelling of --precision fp16
        fp16_scale_growth=1e-3,      # log2 growth of the fp16 loss scale per step
        seed=0,                      # model init, data order and augmentation, t and noise draws
        max_steps=0,                 # stop after this many optimizer steps (LR unchanged); 0 = no limit
        precision="fp32",            # fp32, bf16 or fp16 (autocast; the weights stay fp32)
        num_workers=1,               # image decoding processes per rank
        random_flip=True,            # horizontal flips with probability 1/2
        keep_checkpoints=0,          # keep only the newest N checkpoints; 0 = keep all
        compile=False,               # torch.compile the U-Net (slow first step; see README "Performance")
        channels_last="auto",        # NHWC convolutions: auto (on a CPU), true or false (README "Performance")
    )


def parse_args(argv=None):
    """Parse flags; no arguments at all means the demo config."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        argv = ["--config", DEMO_CONFIG]
    defaults = {**model_and_diffusion_defaults(), **train_defaults(), **eval_defaults()}
    return parse_args_with_config(defaults, argv, description=__doc__)


def resolve_config(args, rank, world_size):
    """The flags as this run uses them: precision resolved, log_dir chosen (the same folder on every rank)."""
    config = {k: v for k, v in vars(args).items() if k != "config"}
    config["precision"] = resolve_precision(args.precision, args.use_fp16)
    # The weights stay fp32 whatever the precision, so the model is built (and later sampled) as fp32.
    config["use_fp16"] = False
    if not config["log_dir"]:
        if args.resume_checkpoint:
            resume = os.path.abspath(args.resume_checkpoint)
            config["log_dir"] = resume if os.path.isdir(resume) else os.path.dirname(resume)
        else:
            config["log_dir"] = _new_run_dir(rank, world_size)
    return config


def _new_run_dir(rank, world_size):
    name = None
    if rank == 0:
        name = os.path.join(RUNS_DIR, time.strftime("%Y-%m-%d_%H-%M-%S"))
        suffix = 1
        while os.path.exists(name if suffix == 1 else f"{name}_{suffix}"):
            suffix += 1
        name = name if suffix == 1 else f"{name}_{suffix}"
    if world_size > 1:
        holder = [name]
        dist.broadcast_object_list(holder, src=0)
        name = holder[0]
    return name


def main(argv=None):
    """Train with `argv` (default sys.argv[1:]); returns the finished TrainLoop."""
    args = parse_args(argv)
    dist_util.setup_dist()
    try:
        loop, data, config = build(args)
    except (ValueError, FileNotFoundError, FileExistsError, EvaluationError) as e:
        # Bad flags, config, data or checkpoint: a message naming them, not a traceback.
        dist_util.cleanup()
        sys.exit(f"image_train.py: error: {e}")
    try:
        if loop.rank == 0:
            checkpoint.save_config(config["log_dir"], config)
        loop.run_loop()
    finally:
        data.close()
        loop.logger.close()
        dist_util.cleanup()
    return loop


def build(args):
    """(TrainLoop, data iterator, resolved config) for parsed flags, in a joined process group."""
    rank, world_size = dist_util.rank_and_world_size()
    config = resolve_config(args, rank, world_size)
    log_dir = config["log_dir"]
    logger = Logger(log_dir, enabled=rank == 0)
    logger.info(f"log dir {log_dir}; creating the model and diffusion")

    seed_everything(args.seed)  # the same initial weights on every rank
    model, diffusion = create_model_and_diffusion(**{k: config[k] for k in model_and_diffusion_defaults()})
    apply_speed_options(model, compile=args.compile, channels_last=args.channels_last, fold_upsample="auto",
                        device=dist_util.dev(), batch_size=args.microbatch if args.microbatch > 0 else args.batch_size,
                        training=True, log=logger.info)
    # Each rank draws its own timesteps and noise.
    seed_everything(int(np.random.SeedSequence([args.seed, rank]).generate_state(1)[0]))
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        random_flip=args.random_flip,
        num_workers=args.num_workers,
        seed=args.seed,
    )
    loop = TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        ema_rate=args.ema_rate,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        log_dir=log_dir,
        fp16_scale_growth=args.fp16_scale_growth,
        schedule_sampler=create_named_schedule_sampler(args.schedule_sampler, diffusion),
        weight_decay=args.weight_decay,
        lr_anneal_steps=args.lr_anneal_steps,
        max_steps=args.max_steps,
        precision=config["precision"],
        keep_checkpoints=args.keep_checkpoints,
        config=config,
        logger=logger,
        evaluator=build_evaluator(config, rank, world_size) if args.eval_interval > 0 else None,
        eval_interval=args.eval_interval,
    )
    return loop, data, config


def build_evaluator(config, rank, world_size):
    """FID/KID of EMA samples every --eval_interval steps, against --eval_reference (default: the training data)."""
    diffusion_flags = {k: config[k] for k in diffusion_defaults() if k != "diffusion_steps"}
    diffusion_flags["timestep_respacing"] = config["eval_timestep_respacing"]
    return TrainingEvaluator(
        diffusion=create_gaussian_diffusion(steps=config["diffusion_steps"], **diffusion_flags),
        options=sampling_options(
            config["image_size"], config["class_cond"], config["eval_use_ddim"], config["precision"]
        ),
        num_samples=config["eval_samples"],
        batch_size=config["eval_batch_size"],
        reference=config["eval_reference"] or config["data_dir"] or DEMO_DATASET,
        metrics=config["eval_metrics"],
        mode=config["eval_mode"],
        inception_path=config["inception_path"],
        cache_dir=config["eval_cache_dir"],
        device=dist_util.dev(),
        rank=rank,
        world_size=world_size,
    )


if __name__ == "__main__":
    main()
