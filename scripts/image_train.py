"""Train a diffusion model on images (the reference's image_train.py, with P2 weighting and exact resume).

    python scripts/image_train.py                                    # the demo: configs/demo.yaml
    python scripts/image_train.py --config configs/ffhq_p2.yaml --data_dir data/ffhq
    mpiexec -n 8 python -m mpi4py scripts/image_train.py ...         (or torchrun --nproc_per_node 8 ..., or srun)

Flag values: the defaults of guided_diffusion/script_util.py (train_flag_defaults) -> --config FILE (YAML; a
`base:` key extends another file) -> command-line flags. Without any argument the demo config is used. Every
reference flag keeps its name and default (docs/compatibility.md, "Command-line flags"); --use_fp16 True means
--precision fp16 (the weights stay fp32; the forward pass runs under autocast).
Output (--log_dir, default runs/<date>_<time>/, or the resumed checkpoint's folder): config.yaml (the resolved
flags; image_sample.py reads it), log.txt (it opens with the loss weighting: --weighting, its parameters and, with
--normalize_weights True, the scale; docs/weightings.md), progress.csv and the checkpoints described in
guided_diffusion/checkpoint.py. --resume_checkpoint takes a stateNNNNNN.pt, a modelNNNNNN.pt, a log dir, or
`auto`: --log_dir's newest complete checkpoint if it has one, else a fresh start, so that a requeued job reruns the
very same command. Checkpoints come every --save_interval steps, every --save_interval_minutes of wall-clock time
(0 = off) and at the end.
SIGTERM, SIGUSR1 (Slurm's --signal) and Ctrl-C stop training after the current step, with a checkpoint of that step
(guided_diffusion/preemption.py); the exit code is 128 + the signal number: SIGINT 130, SIGUSR1 138, SIGTERM 143.
A second Ctrl-C stops at once (130).
Several processes (mpiexec, torchrun, srun: guided_diffusion/dist_util.py, docs/clusters.md) wait --dist_timeout
minutes for each other at the start and in every collective; an error on one rank ends every rank.
"""

import contextlib
import os
import sys
import time

import numpy as np
import torch.distributed as dist

from guided_diffusion import checkpoint, dist_util, preemption, run_lock
from guided_diffusion.cli import script_main
from guided_diffusion.image_datasets import DEMO_DATASET, load_data
from guided_diffusion.logger import Logger
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.script_util import (
    build_parser,
    create_gaussian_diffusion,
    create_model_and_diffusion,
    diffusion_defaults,
    model_and_diffusion_defaults,
    parse_args as parse_flags,
    train_flag_defaults,
)
from guided_diffusion.speed_options import apply_speed_options
from guided_diffusion.train_eval import TrainingEvaluator, evaluation_respacing, sampling_options
from guided_diffusion.train_util import TrainLoop, resolve_precision, seed_everything

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO_ROOT, "configs", "demo.yaml")
RUNS_DIR = "runs"
AUTO_RESUME = "auto"


def parse_args(argv=None):
    """Parse flags; no arguments at all means the demo config."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        argv = ["--config", DEMO_CONFIG]
    return parse_flags(build_parser(train_flag_defaults(), __doc__), argv)


def resolve_config(args, rank, world_size):
    """The flags as this run uses them: precision resolved, log_dir chosen (the same folder on every rank)."""
    config = {k: v for k, v in vars(args).items() if k != "config"}
    config["precision"] = resolve_precision(args.precision, args.use_fp16)
    # The weights stay fp32 whatever the precision, so the model is built (and later sampled) as fp32.
    config["use_fp16"] = False
    if args.resume_checkpoint == AUTO_RESUME and not args.log_dir:
        raise ValueError(
            "--resume_checkpoint auto resumes from the newest checkpoint in --log_dir, but no --log_dir was given; "
            "pass --log_dir (the same folder on every rerun)"
        )
    if not config["log_dir"]:
        if args.resume_checkpoint:
            resume = os.path.abspath(args.resume_checkpoint)
            config["log_dir"] = resume if os.path.isdir(resume) else os.path.dirname(resume)
        else:
            config["log_dir"] = _new_run_dir(rank, world_size)
    return config


def _new_run_dir(rank, world_size):
    def new_name():
        name = os.path.join(RUNS_DIR, time.strftime("%Y-%m-%d_%H-%M-%S"))
        suffix = 1
        while os.path.exists(name if suffix == 1 else f"{name}_{suffix}"):
            suffix += 1
        return name if suffix == 1 else f"{name}_{suffix}"

    return _decided_on_rank0(new_name, rank, world_size)


def _decided_on_rank0(decide, rank, world_size):
    """decide() on rank 0, its result sent to every rank: the same folder or file everywhere, whatever each node's
    view of a shared file system."""
    value = decide() if rank == 0 else None
    if world_size > 1:
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        value = holder[0]
    return value


INTERRUPTED_ADVICE = "rerun with --resume_checkpoint auto --log_dir LOG_DIR to continue from its last checkpoint"


@script_main(interrupted=INTERRUPTED_ADVICE)
def main(argv=None):
    """Train with `argv` (default sys.argv[1:]); returns the finished TrainLoop.

    :raises SystemExit: with 128 + the signal number after a stop signal (see the module docstring).
    """
    return train(parse_args(argv), build, "image_train.py")


def train(args, build_run, script):
    """Run a training script: `build_run(args, held)` -> (TrainLoop, data, config) in a joined process group (`held`:
    an ExitStack keeping the log dir's lock until the run ends), the config saved, the loop run; a stop signal ends
    it with SystemExit(128 + signal) after `script`'s resume advice."""
    dist_util.setup_dist(timeout_minutes=args.dist_timeout, timeout_flag="--dist_timeout")
    try:
        with contextlib.ExitStack() as held:
            loop, data, config = build_run(args, held)
            try:
                if loop.rank == 0:
                    checkpoint.save_config(config["log_dir"], config)
                loop.run_loop()
            finally:
                data.close()
                loop.logger.close()
    except preemption.Stopped as stopped:
        dist_util.cleanup()
        if loop.rank == 0:
            print(f"{script}: {stopped}; {_resume_advice(args, stopped.log_dir)}", file=sys.stderr, flush=True)
        raise SystemExit(stopped.exit_code) from None
    # Only after every rank finished: on an error the group is left as it is (its teardown could wait for peers
    # that are gone) and script_main ends every rank.
    dist_util.cleanup()
    return loop


def _resume_advice(args, log_dir):
    """How to continue a stopped run: the same command where it resumes from log_dir's newest checkpoint."""
    resume = args.resume_checkpoint
    if resume == AUTO_RESUME or (resume and os.path.isdir(resume) and os.path.samefile(resume, log_dir)):
        return "rerun the same command to resume"
    return f"to resume, rerun it with --resume_checkpoint {AUTO_RESUME} --log_dir {log_dir}"


def create_image_model(config):
    """(UNetModel, diffusion) of the resolved flags."""
    return create_model_and_diffusion(**{k: config[k] for k in model_and_diffusion_defaults()})


def load_training_data(args, image_size):
    """This rank's endless training batches of --data_dir, cropped to `image_size` px."""
    return load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=image_size,
        class_cond=args.class_cond,
        random_flip=args.random_flip,
        num_workers=args.num_workers,
        seed=args.seed,
    )


def load_images(args):
    return load_training_data(args, args.image_size)


def build(args, held, create=create_image_model, load=load_images):
    """(TrainLoop, data iterator, resolved config) for parsed flags, in a joined process group.

    :param held: a contextlib.ExitStack that keeps the log dir's lock (rank 0 takes it for the job) until it closes.
    :param create: resolved config -> (model, diffusion).
    :param load: parsed flags -> this rank's batches (x, cond dict of model kwargs).
    :raises run_lock.LogDirError: when another run holds the log dir, or it cannot be a folder.
    """
    rank, world_size = dist_util.rank_and_world_size()
    config = resolve_config(args, rank, world_size)
    logger, resume_checkpoint = open_log_dir(args, config["log_dir"], held, rank, world_size,
                                             "creating the model and diffusion")

    seed_everything(args.seed)  # the same initial weights on every rank
    model, diffusion = create(config)
    logger.info(diffusion.loss_weighting.describe(diffusion.loss_weight, diffusion.loss_weight_scale))
    apply_speed_options(model, compile=args.compile, channels_last=args.channels_last, fold_upsample="auto",
                        device=dist_util.dev(), batch_size=args.microbatch if args.microbatch > 0 else args.batch_size,
                        training=True, log=logger.info)
    # Each rank draws its own timesteps and noise.
    seed_everything(int(np.random.SeedSequence([args.seed, rank]).generate_state(1)[0]))
    data = load(args)
    eval_interval = getattr(args, "eval_interval", 0)  # super_res_train.py has no in-training evaluation
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
        save_interval_minutes=args.save_interval_minutes,
        resume_checkpoint=resume_checkpoint,
        log_dir=config["log_dir"],
        fp16_scale_growth=args.fp16_scale_growth,
        schedule_sampler=create_named_schedule_sampler(args.schedule_sampler, diffusion),
        weight_decay=args.weight_decay,
        lr_anneal_steps=args.lr_anneal_steps,
        max_steps=args.max_steps,
        precision=config["precision"],
        keep_checkpoints=args.keep_checkpoints,
        config=config,
        logger=logger,
        evaluator=build_evaluator(config, rank, world_size) if eval_interval > 0 else None,
        eval_interval=eval_interval,
    )
    return loop, data, config


def open_log_dir(args, log_dir, held, rank, world_size, what):
    """Take `log_dir` for this run and open its log: (Logger, the checkpoint to resume from or "").

    Rank 0 locks the folder for the whole run (the lock stays in `held`) before any rank touches it; the logger
    writes on rank 0 only; --resume_checkpoint auto becomes the newest complete checkpoint, decided on rank 0.
    :param what: what the run does next, for the first log line.
    """
    if rank == 0:
        held.enter_context(run_lock.acquire(log_dir))
    dist_util.barrier()  # no rank reads or writes the log dir before rank 0 holds it
    logger = Logger(log_dir, enabled=rank == 0)
    logger.info(f"log dir {log_dir}; {what}")
    if dist_util.describe():
        logger.info(f"process group: {dist_util.describe()}")
    resume_checkpoint = args.resume_checkpoint
    if resume_checkpoint == AUTO_RESUME:
        resume_checkpoint = _decided_on_rank0(lambda: checkpoint.resolve_auto_resume(log_dir), rank, world_size)
        if not resume_checkpoint:
            logger.info(f"--resume_checkpoint auto: {log_dir} holds no complete checkpoint; starting at step 0")
    return logger, resume_checkpoint


def build_evaluator(config, rank, world_size):
    """FID/KID of EMA samples every --eval_interval steps, against --eval_reference (default: the training data)."""
    options = sampling_options(config["image_size"], config["class_cond"], config["eval_use_ddim"],
                               config["precision"], config["eval_sampler"], config["eval_steps"],
                               config["eval_step_schedule"])
    diffusion_flags = {k: config[k] for k in diffusion_defaults() if k != "diffusion_steps"}
    diffusion_flags["timestep_respacing"] = evaluation_respacing(options, config["eval_timestep_respacing"])
    return TrainingEvaluator(
        diffusion=create_gaussian_diffusion(steps=config["diffusion_steps"], **diffusion_flags),
        options=options,
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
