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
    Guidance,
    check_guidance_flags,
    classifier_cond_fn,
    guidance_num_classes,
)
from guided_diffusion.classifier_util import classifier_defaults
from guided_diffusion.cli import script_main
from guided_diffusion.model_loading import (
    check_model_path,
    checkpoint_parser,
    classifier_flags_beside,
    load_classifier,
    load_model_and_diffusion,
    parse_checkpoint_args,
)
from guided_diffusion.precision import network_at_precision
from guided_diffusion.script_util import sample_defaults


def classifier_sample_defaults():
    """image_sample.py's flags, the classifier's, and the reference's two guidance flags."""
    return {**sample_defaults(), **classifier_defaults(), "classifier_path": "", "classifier_scale": 1.0}


def parse_args(argv=None):
    """Namespace: defaults -> the classifier flags of the config.yaml beside --classifier_path -> the config
    (args.config, "" if none) -> command-line flags."""
    parser = checkpoint_parser(__doc__, classifier_sample_defaults())
    parser.set_defaults(**classifier_flags_beside(parser.parse_known_args(argv)[0].classifier_path))
    return parse_checkpoint_args(parser, argv)


@script_main(interrupted=image_sample.INTERRUPTED_ADVICE)
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
    # image_sample.py's folder name with the scale appended: samples_<checkpoint>_<schedule>..._classifier<s>.
    sampler, sample_dir = image_sample.prepare(args, rank, dir_suffix=f"_classifier{args.classifier_scale:g}")
    check_guidance_flags(args.class_cond, args.classifier_path, args.classifier_scale, sampler["sampler"])
    model, diffusion, identity = load_model_and_diffusion(args)
    cond_fn, classes = None, None
    if args.classifier_path:
        classifier, classifier_identity = load_classifier(args)
        classes = classifier.out_channels
        network = network_at_precision(classifier, args.precision, dist_util.dev())
        cond_fn = classifier_cond_fn(network, args.classifier_scale)
        identity = {**identity, **classifier_identity, "classifier_scale": args.classifier_scale}
    guidance = Guidance(cond_fn, guidance_num_classes(model.num_classes, classes),
                        f"classifier scale {args.classifier_scale:g}" if cond_fn else "no classifier")
    return image_sample.sample(args, model, diffusion, identity, sampler, sample_dir, args.image_size, rank,
                               world_size, guidance=guidance)


if __name__ == "__main__":
    main()
