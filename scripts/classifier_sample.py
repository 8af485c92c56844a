r"""Sample with classifier guidance: image_sample.py plus a noisy-image classifier that steers every sample towards
its label (the reference's classifier_sample.py).

    python scripts/classifier_sample.py --model_path models/256x256_diffusion.pt \
        --classifier_path models/256x256_classifier.pt --classifier_scale 1.0 --image_size 256 \
        --class_cond True --learn_sigma True --num_channels 256 --num_head_channels 64 --num_res_blocks 2 \
        --attention_resolutions 32,16,8 --resblock_updown True --use_scale_shift_norm True \
        --timestep_respacing 250 --num_samples 100 --batch_size 4
    mpiexec -n 8 python -m mpi4py scripts/classifier_sample.py ...   (or torchrun --nproc_per_node 8 ...)

Flags: image_sample.py's (the model and diffusion flags, from the config.yaml beside --model_path when there is one),
the classifier's (--classifier_width, --classifier_depth, ... as classifier_train.py took them, from the config.yaml
it saved beside --classifier_path when there is one; --image_size is shared), --classifier_path (a modelNNNNNN.pt
of classifier_train.py, or a released ADM classifier) and --classifier_scale s (default 1.0). A classifier whose
config.yaml names another --diffusion_steps, --noise_schedule or --rescale_timesteps than the model's is refused.
Each sample i draws its label uniformly from the classifier's classes, first from its own generator as
image_sample.py does; a class-conditional model gets it too (and must have as many classes), an unconditional one
does not. Ancestral sampling shifts each step's mean by s·Σ·∇ log p(y | x_t), DDIM (--use_ddim True) shifts ε by
-s·√(1-ᾱ)·∇ (guided_diffusion/classifier_guidance.py); the few-step samplers take no guidance.
--classifier_scale 0 runs the classifier but adds exactly nothing: a class-conditional model's samples are then
image_sample.py's, bit for bit. --precision applies to both networks.
Output exactly as image_sample.py (guided_diffusion/sampling.py): samples_{N}x{H}x{W}x3.npz with the labels as
arr_1, images/, grid.png, run.json; by default in a folder beside the checkpoint named after it, the schedule and
the scale (samples_ema_..._250_classifier1). Rerunning the same command resumes an interrupted run.
"""

import image_sample

from guided_diffusion import dist_util
from guided_diffusion.classifier_guidance import (
    check_guidance_flags,
    classifier_cond_fn,
    guidance_num_classes,
    label_passing_model,
)
from guided_diffusion.classifier_util import classifier_defaults
from guided_diffusion.cli import script_main
from guided_diffusion.fileio import check_output_dir
from guided_diffusion.model_loading import (
    check_model_path,
    checkpoint_parser,
    classifier_flags_beside,
    load_classifier,
    load_model_and_diffusion,
    parse_checkpoint_args,
)
from guided_diffusion.precision import network_at_precision
from guided_diffusion.sampler_flags import resolve_sampler, sampler_label
from guided_diffusion.sampling import SamplingOptions, sample_to_folder
from guided_diffusion.script_util import sample_defaults
from guided_diffusion.speed_options import apply_speed_options


def classifier_sample_defaults():
    """image_sample.py's flags, the classifier's, and the reference's two guidance flags."""
    return {**sample_defaults(), **classifier_defaults(), "classifier_path": "", "classifier_scale": 1.0}


def parse_args(argv=None):
    """Namespace: defaults -> the classifier flags of the config.yaml beside --classifier_path -> the config
    (args.config, "" if none) -> command-line flags."""
    parser = checkpoint_parser(__doc__, classifier_sample_defaults())
    parser.set_defaults(**classifier_flags_beside(parser.parse_known_args(argv)[0].classifier_path))
    return parse_checkpoint_args(parser, argv)


def default_sample_dir(args, sampler):
    """image_sample.py's folder name with the scale appended: samples_<checkpoint>_<schedule>..._classifier<s>."""
    return f"{image_sample.default_sample_dir(args, sampler)}_classifier{args.classifier_scale:g}"


@script_main(interrupted="finished samples are kept in the sample folder; rerun the same command to resume")
def main(argv=None):
    """Run classifier_sample with `argv` (default sys.argv[1:]); returns the SamplingResult."""
    dist_util.setup_dist()
    try:
        return sample_with_flags(argv)
    finally:
        dist_util.cleanup()


def sample_with_flags(argv):
    rank, world_size = dist_util.rank_and_world_size()
    args = parse_args(argv)
    check_model_path(args.model_path)  # before its name makes the output folder's
    sampler = resolve_sampler(args.sampler, args.steps, args.step_schedule, args.use_ddim, args.ddim_eta,
                              args.timestep_respacing)
    check_guidance_flags(args.class_cond, args.classifier_path, args.classifier_scale, sampler["sampler"])
    sample_dir = args.sample_dir or default_sample_dir(args, sampler)
    check_output_dir(sample_dir, "--sample_dir")  # before the models are loaded and any sample is made
    model, diffusion, identity = load_model_and_diffusion(args)
    cond_fn, classes = None, None
    if args.classifier_path:
        classifier, classifier_identity = load_classifier(args)
        classes = classifier.out_channels
        network = network_at_precision(classifier, args.precision, dist_util.dev())
        cond_fn = classifier_cond_fn(network, args.classifier_scale)
        identity = {**identity, **classifier_identity, "classifier_scale": args.classifier_scale}
    options = SamplingOptions(
        image_size=args.image_size,
        class_cond=True,
        num_classes=guidance_num_classes(model.num_classes, classes),
        **sampler,
        clip_denoised=args.clip_denoised,
        precision=args.precision,
        seed=args.seed,
    )
    apply_speed_options(model, compile=args.compile, channels_last=args.channels_last, fold_upsample="auto",
                        device=dist_util.dev(), batch_size=args.batch_size)
    result = sample_to_folder(
        label_passing_model(model, args.class_cond),
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
        cond_fn=cond_fn,
    )
    if rank == 0:
        guidance = f"classifier scale {args.classifier_scale:g}" if cond_fn else "no classifier"
        print(f"{result.num_samples} samples ({result.num_generated} generated now; {sampler_label(options)}, "
              f"{result.steps_per_sample} steps, {guidance}) -> {result.npz_path} | PNGs: {result.images_dir} | "
              f"grid: {result.grid_path}", flush=True)
    return result


if __name__ == "__main__":
    main()
