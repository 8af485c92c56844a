r"""Generate samples from a checkpoint into an npz (ADM evaluator), a PNG folder (clean-fid) and a grid.

    python scripts/image_sample.py --model_path runs/ffhq/ema_0.9999_100000.pt --timestep_respacing 250 \
        --num_samples 50000 --batch_size 32
    mpiexec -n 8 python -m mpi4py scripts/image_sample.py ...   (or torchrun --nproc_per_node 8 ...)

Where flag values come from, later winning:
  1. the defaults of guided_diffusion/script_util.py (sample_defaults and model_and_diffusion_defaults);
  2. a YAML config: --config FILE, or else the config.yaml the training script saved beside the checkpoint,
     when there is one. Its model and diffusion flags and sampling options are used; its training options (every
     other image_train.py flag, also seed, batch_size, precision, compile and channels_last, which there describe
     training) are ignored (guided_diffusion/model_loading.py); any other key is an error;
  3. flags given on the command line.
Class-conditional checkpoints (--class_cond True): each sample's label is drawn uniformly from the checkpoint's own
classes, 0 .. R-1 for the R rows of its label embedding (label_emb.weight), not from the 1000 classes the reference
always assumed; the labels are saved as arr_1 of the npz. (image_train.py builds 1000 rows, as the reference does.)
Output goes to --sample_dir, by default a folder beside the checkpoint named after it and the schedule
(e.g. samples_ema_0.9999_100000_250/); rerunning the same command resumes an interrupted run. The folder
layout, the quantiser and the seeding are described in guided_diffusion/sampling.py.
Samplers (--sampler): ancestral (the default) and ddim (also --use_ddim True) step through --timestep_respacing;
dpm++2m, dpm++2m_sde and heun take --steps and --step_schedule instead (guided_diffusion/ode_samplers.py):
    python scripts/image_sample.py --model_path ema.pt --sampler dpm++2m --steps 20
heun is deterministic (EDM Algorithm 1) unless --heun_churn S_churn > 0 turns on EDM Algorithm 2, which adds fresh
noise before each step whose σ lies in [--heun_s_tmin, --heun_s_tmax], scaled by --heun_s_noise; e.g. the settings
EDM used for its ImageNet-64 ADM-architecture model (256 steps):
    python scripts/image_sample.py --model_path ema.pt --sampler heun --steps 256 --heun_churn 40 \
        --heun_s_tmin 0.05 --heun_s_tmax 50 --heun_s_noise 1.003
"""

import os

from guided_diffusion import dist_util
from guided_diffusion.classifier_guidance import label_passing_model
from guided_diffusion.cli import script_main
from guided_diffusion.fileio import check_output_dir
from guided_diffusion.model_loading import checkpoint_parser, load_model_and_diffusion, parse_checkpoint_args
from guided_diffusion.ode_samplers import HeunChurn
from guided_diffusion.sampler_flags import resolve_sampler, sampler_label
from guided_diffusion.sampling import SamplingOptions, sample_to_folder
from guided_diffusion.script_util import sample_defaults
from guided_diffusion.speed_options import apply_speed_options


def parse_args(argv=None):
    """Namespace: defaults -> the config (args.config, "" if none) -> command-line flags."""
    return parse_checkpoint_args(checkpoint_parser(__doc__, sample_defaults()), argv)


def default_sample_dir(args, sampler):
    """samples_<checkpoint>_<schedule>[_ddim|_ancestral][_eta..][_seed..][_precision][_use_fp16] beside the checkpoint;
    a few-step sampler names itself, its steps and step schedule instead of the respacing (samples_ema_heun10_karras),
    and heun its churn when there is one (samples_ema_heun10_karras_churn40).

    Only the usual variations are named; any other change is caught by the folder's run.json check.
    :param sampler: resolve_sampler's fields.
    """
    if "://" in args.model_path:
        raise ValueError(f"--model_path {args.model_path!r} is remote; pass --sample_dir for the output")
    stem = os.path.splitext(os.path.basename(args.model_path))[0]
    use_ddim = sampler["use_ddim"]
    spacing = args.timestep_respacing.replace(",", "-") or str(args.diffusion_steps)
    if sampler["sampler"]:
        spacing = f"{sampler['sampler']}{sampler['steps']}_{sampler['step_schedule']}"
        if sampler["heun_churn"].churn:
            spacing += f"_churn{sampler['heun_churn'].churn:g}"
    parts = [f"samples_{stem}", spacing]
    if use_ddim and not spacing.startswith("ddim"):
        parts.append("ddim")
    if not use_ddim and spacing.startswith("ddim"):
        parts.append("ancestral")
    if use_ddim and args.ddim_eta != 0:
        parts.append(f"eta{args.ddim_eta:g}")
    if args.seed != 0:
        parts.append(f"seed{args.seed}")
    if args.precision != "fp32":
        parts.append(args.precision)
    if args.use_fp16:
        parts.append("use_fp16")
    return os.path.join(os.path.dirname(os.path.abspath(args.model_path)), "_".join(parts))


INTERRUPTED_ADVICE = "finished samples are kept in the sample folder; rerun the same command to resume"


@script_main(interrupted=INTERRUPTED_ADVICE)
def main(argv=None):
    """Run image_sample with `argv` (default sys.argv[1:]); returns the SamplingResult."""
    dist_util.setup_dist()
    try:
        return sample_with_flags(argv)
    finally:
        dist_util.cleanup()


def sample_with_flags(argv):
    rank, world_size = dist_util.rank_and_world_size()
    args = parse_args(argv)
    sampler, sample_dir = prepare(args, rank)
    model, diffusion, identity = load_model_and_diffusion(args)
    return sample(args, model, diffusion, identity, sampler, sample_dir, args.image_size, rank, world_size)


def prepare(args, rank, dir_suffix=""):
    """(sampler fields, sample folder) of parsed flags, checked before any model is loaded.

    :param dir_suffix: appended to the default folder name (super_res_sample.py names its base samples).
    """
    if not args.model_path:
        raise ValueError("--model_path is required: the checkpoint to sample from (e.g. ema_0.9999_100000.pt)")
    if rank == 0 and args.config:
        print(f"flags from {args.config}, without its training options (command-line flags override)", flush=True)
    churn = HeunChurn(args.heun_churn, args.heun_s_tmin, args.heun_s_tmax, args.heun_s_noise)
    sampler = resolve_sampler(args.sampler, args.steps, args.step_schedule, args.use_ddim, args.ddim_eta,
                              args.timestep_respacing, heun_churn=churn)
    sample_dir = args.sample_dir or default_sample_dir(args, sampler) + dir_suffix
    check_output_dir(sample_dir, "--sample_dir")  # before the model is loaded and any sample is made
    return sampler, sample_dir


def sample(args, model, diffusion, identity, sampler, sample_dir, image_size, rank, world_size, conditioning=None,
           guidance=None):
    """Sample `model` into `sample_dir` as the flags say; returns the SamplingResult.

    :param identity: what determines the pixels besides the sampling options (load_model_and_diffusion's, plus
        what `conditioning` and `guidance` give).
    :param conditioning: None, or callable(indices) -> model kwargs of those samples (sampling.generate_batch).
    :param guidance: None, or classifier_guidance.Guidance: every sample gets a label, which an unconditional model
        is not given, and its cond_fn steers the samples (scripts/classifier_sample.py).
    """
    options = SamplingOptions(
        image_size=image_size,
        class_cond=args.class_cond or guidance is not None,
        num_classes=guidance.num_classes if guidance else model.num_classes or 0,
        **sampler,
        clip_denoised=args.clip_denoised,
        precision=args.precision,
        seed=args.seed,
    )
    # Float rounding only: like --batch_size, these may move a rare pixel by one level, so they are not part of
    # the folder's identity.
    apply_speed_options(model, compile=args.compile, channels_last=args.channels_last, fold_upsample="auto",
                        device=dist_util.dev(), batch_size=args.batch_size)
    result = sample_to_folder(
        label_passing_model(model, args.class_cond) if guidance else model,
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
        conditioning=conditioning,
        cond_fn=guidance.cond_fn if guidance else None,
    )
    if rank == 0:
        label = sampler_label(options)
        guided = f", {guidance.description}" if guidance else ""
        print(
            f"{result.num_samples} samples ({result.num_generated} generated now; {label}, {result.steps_per_sample} "
            f"steps, {result.evaluations_per_sample} network evaluations each, {result.network_evaluations} in total"
            f"{guided}) -> {result.npz_path} | "
            f"PNGs: {result.images_dir} | grid: {result.grid_path}",
            flush=True,
        )
    return result


if __name__ == "__main__":
    main()
