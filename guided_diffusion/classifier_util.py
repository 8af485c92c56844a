"""Flag defaults and factories of the noisy-image classifier (scripts/classifier_train.py, classifier_sample.py).

The flag names and defaults are the reference's (ADM), so its published classifier command lines work unchanged;
`classifier_channel_mult` is added ("" = the U-Net's default for --image_size, as the reference always used), so that
a classifier can also be built for sizes without a default (16 px in the tests).
"""

from .encoder_unet import EncoderUNetModel
from .script_util import (
    NUM_CLASSES,
    create_gaussian_diffusion,
    diffusion_defaults,
    parse_attention_resolutions,
    parse_channel_mult,
)

CLASSIFIER_HEAD_CHANNELS = 64  # channels per attention head of every classifier (the reference fixes it)


def classifier_defaults():
    """Defaults of the classifier flags (reference names and values, plus classifier_channel_mult)."""
    return {
        "image_size": 64,
        "classifier_use_fp16": False,
        "classifier_width": 128,                 # base channels
        "classifier_depth": 2,                   # ResBlocks per level
        "classifier_attention_resolutions": "32,16,8",
        "classifier_use_scale_shift_norm": True,
        "classifier_resblock_updown": True,
        "classifier_pool": "attention",          # adaptive, attention, spatial or spatial_v2
        "classifier_channel_mult": "",           # "" = the default for image_size
    }


def classifier_and_diffusion_defaults():
    """The classifier flags and the diffusion flags (the diffusion noises the training images)."""
    return {**classifier_defaults(), **diffusion_defaults()}


def classifier_train_defaults():
    """Training flags of classifier_train.py: the reference's, then this project's additions."""
    return {
        "data_dir": "",                  # folder or .zip; the class is the file name before the first "_"
        "val_data_dir": "",              # validation images, scored every eval_interval steps; "" = none
        "noised": True,                  # train on x_t at a random t (False: clean images at t = 0)
        "iterations": 150000,            # optimizer steps of the whole run
        "lr": 3e-4,
        "weight_decay": 0.0,
        "anneal_lr": False,              # decay the LR linearly to 0 at --iterations
        "batch_size": 4,                 # images per rank per step
        "microbatch": -1,                # images per forward pass; -1 = the whole batch
        "schedule_sampler": "uniform",   # how t is drawn (only uniform: no diffusion loss to adapt to)
        "resume_checkpoint": "",         # stateNNNNNN.pt, modelNNNNNN.pt, a log dir, or "auto"
        "log_interval": 10,              # steps between progress.csv rows
        "eval_interval": 5,              # steps between validation batches (with --val_data_dir)
        "save_interval": 10000,          # steps between checkpoints
        "log_dir": "",                   # "" = runs/<date>_<time>/ (or the folder of --resume_checkpoint)
        "seed": 0,                       # model init, data order and augmentation, t and noise draws
        "precision": "fp32",             # fp32, bf16 or fp16 (autocast; the weights stay fp32)
        "num_workers": 1,                # image decoding processes per rank
        "keep_checkpoints": 0,           # keep only the newest N checkpoints; 0 = keep all
        "save_interval_minutes": 0.0,    # also a checkpoint after this many minutes; 0 = off
        "dist_timeout": 30.0,            # minutes a rank waits for its peers (start-up and every collective)
    }


def classifier_train_flag_defaults():
    """Every flag of classifier_train.py with its default."""
    return {**classifier_and_diffusion_defaults(), **classifier_train_defaults()}


def create_classifier(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    classifier_channel_mult="",
    num_classes=NUM_CLASSES,
):
    """Build the classifier from flag values: in_channels 3, `num_classes` logits (the reference's 1000), heads of
    CLASSIFIER_HEAD_CHANNELS channels."""
    try:
        channel_mult = parse_channel_mult(classifier_channel_mult, image_size)
        attention = parse_attention_resolutions(classifier_attention_resolutions, image_size, channel_mult)
    except ValueError as err:
        raise ValueError(str(err).replace("--", "--classifier_")) from None
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=classifier_width,
        out_channels=num_classes,
        num_res_blocks=classifier_depth,
        attention_resolutions=attention,
        channel_mult=channel_mult,
        use_fp16=classifier_use_fp16,
        num_head_channels=CLASSIFIER_HEAD_CHANNELS,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
    )


def create_classifier_and_diffusion(num_classes=NUM_CLASSES, **kwargs):
    """Classifier and diffusion from a dict holding (at least) every key of classifier_and_diffusion_defaults()."""
    classifier = create_classifier(num_classes=num_classes, **{k: kwargs[k] for k in classifier_defaults()})
    diffusion = create_gaussian_diffusion(
        steps=kwargs["diffusion_steps"],
        **{k: kwargs[k] for k in diffusion_defaults() if k != "diffusion_steps"},
    )
    return classifier, diffusion
