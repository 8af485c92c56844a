"""Defaults, configuration files and factories (ADM flag names; config flows defaults -> YAML -> flags).

Every flag of the reference P2/ADM scripts keeps its name and default (COMPAT §5) except where the
reference is defective: `p2_gamma`/`p2_k` are floats, and `--sigma_small` makes FIXED_SMALL reachable.
"""

import argparse
import os

import yaml

from . import gaussian_diffusion as gd
from .respace import SpacedDiffusion, space_timesteps
from .unet import UNetModel

NUM_CLASSES = 1000

# channel_mult used when --channel_mult is "" (COMPAT §5); 32 px follows IDDPM.
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}


def diffusion_defaults():
    """Defaults of the diffusion flags (reference names and values; P2 flags as floats)."""
    return dict(
        learn_sigma=False,           # output 2C channels: ε and the variance interpolation v
        sigma_small=False,           # fixed variance σ̃²_t (FIXED_SMALL) instead of β_t; ignored with learn_sigma
        diffusion_steps=1000,        # T
        noise_schedule="linear",     # "linear" or "cosine"
        timestep_respacing="",       # "" (all steps), "250", "130,60,60", "ddim25"
        use_kl=False,                # train on the VLB alone (RESCALED_KL)
        predict_xstart=False,        # the network predicts x0 instead of ε
        rescale_timesteps=False,     # feed t·1000/T to the network
        rescale_learned_sigmas=False,  # RESCALED_MSE: vb·T/1000 (identical at T = 1000)
        p2_gamma=0.0,                # γ of Eq. (8); 0 = the baseline weighting
        p2_k=1.0,                    # k of Eq. (8); must be > 0 when γ > 0
    )


def model_defaults():
    """Defaults of the U-Net flags (reference names and values)."""
    return dict(
        image_size=64,               # pixels per side
        num_channels=128,            # base channels (model_channels)
        num_res_blocks=2,            # ResBlocks per resolution level
        num_heads=4,                 # attention heads when num_head_channels == -1
        num_heads_upsample=-1,       # heads in the decoder; -1 = num_heads
        num_head_channels=-1,        # fixed channels per head; -1 = use num_heads
        attention_resolutions="16,8",  # pixel resolutions with attention; "" or "none" = bottleneck only
        channel_mult="",             # e.g. "1,1,2,2,4,4"; "" = the default for image_size
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,        # gradient checkpointing (saves memory, costs compute)
        use_scale_shift_norm=True,   # AdaGN
        resblock_updown=False,       # BigGAN up/down blocks
        use_fp16=False,
        use_new_attention_order=False,  # qkv layout [Q,K,V] instead of per-head [q,k,v]
    )


def model_and_diffusion_defaults():
    return {**model_defaults(), **diffusion_defaults()}


def parse_channel_mult(channel_mult, image_size):
    """`channel_mult` flag -> tuple; "" gives the reference default for `image_size`."""
    if isinstance(channel_mult, (tuple, list)):
        return tuple(channel_mult)
    if channel_mult == "":
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"image_size={image_size} has no default channel_mult (known: "
                f"{sorted(DEFAULT_CHANNEL_MULT)}); pass --channel_mult, e.g. --channel_mult 1,2,2"
            )
        return DEFAULT_CHANNEL_MULT[image_size]
    try:
        return tuple(int(m) for m in str(channel_mult).split(","))
    except ValueError:
        raise ValueError(f"--channel_mult {channel_mult!r}: expected comma-separated ints such as 1,2,2,2") from None


def parse_attention_resolutions(attention_resolutions, image_size):
    """Pixel resolutions ("16,8") -> downsample rates (image_size // r). "" or "none" -> () (bottleneck only)."""
    text = str(attention_resolutions).strip().lower()
    if text in ("", "none"):
        return ()
    rates = []
    for part in text.split(","):
        try:
            res = int(part)
        except ValueError:
            raise ValueError(
                f"--attention_resolutions {attention_resolutions!r}: expected comma-separated pixel "
                "resolutions such as 16,8, or 'none' for bottleneck-only attention"
            ) from None
        if res <= 0:
            raise ValueError(f"--attention_resolutions: resolution {res} must be positive")
        rates.append(image_size // res)
    return tuple(rates)


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
):
    """Build the ADM U-Net from flag values (in_channels 3; out 6 with learn_sigma; 1000 classes if class_cond)."""
    channel_mult = parse_channel_mult(channel_mult, image_size)
    levels = len(channel_mult) - 1
    if image_size % (2**levels):
        raise ValueError(
            f"image_size={image_size} is not divisible by 2**{levels} = {2 ** levels}, which the "
            f"{len(channel_mult)} levels of channel_mult={','.join(map(str, channel_mult))} need; "
            "change --image_size or --channel_mult"
        )
    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=(3 if not learn_sigma else 6),
        num_res_blocks=num_res_blocks,
        attention_resolutions=parse_attention_resolutions(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=channel_mult,
        num_classes=(NUM_CLASSES if class_cond else None),
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
    )


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
    p2_gamma=0.0,
    p2_k=1.0,
):
    """Build a (respaced) Gaussian diffusion from flag values, with the reference's precedence rules."""
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if learn_sigma:
        model_var_type = gd.ModelVarType.LEARNED_RANGE
    elif sigma_small:
        model_var_type = gd.ModelVarType.FIXED_SMALL
    else:
        model_var_type = gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing or [steps]),
        betas=betas,
        model_mean_type=(gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON),
        model_var_type=model_var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
        p2_gamma=p2_gamma,
        p2_k=p2_k,
    )


def create_model_and_diffusion(**kwargs):
    """Model and diffusion from a dict holding (at least) every key of model_and_diffusion_defaults()."""
    model_keys = set(model_defaults()) - {"image_size"}
    model = create_model(
        image_size=kwargs["image_size"],
        learn_sigma=kwargs["learn_sigma"],
        **{k: kwargs[k] for k in model_keys},
    )
    diffusion = create_gaussian_diffusion(
        steps=kwargs["diffusion_steps"],
        **{k: kwargs[k] for k in diffusion_defaults() if k != "diffusion_steps"},
    )
    return model, diffusion


def str2bool(v):
    """ADM's boolean flag parser: yes/true/t/y/1 and no/false/f/n/0, case-insensitive."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")


def add_dict_to_argparser(parser, default_dict):
    """Add one `--key` flag per entry; the type is type(default) (None -> str, bool -> str2bool)."""
    for k, v in default_dict.items():
        v_type = type(v)
        if v is None:
            v_type = str
        elif isinstance(v, bool):
            v_type = str2bool
        parser.add_argument(f"--{k}", default=v, type=v_type)


def args_to_dict(args, keys):
    return {k: getattr(args, k) for k in keys}


def read_config_file(path):
    """Read a YAML config file: a flat mapping of flag names to values (no key check; see load_config)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist; see configs/ for the bundled ones")
    with open(path) as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path!r} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of flag names to values")
    return values


def load_config(path, allowed_keys):
    """Read a YAML config (a flat mapping of flag names to values) and check every key is a known flag.

    :param path: YAML file.
    :param allowed_keys: flag names the calling script accepts.
    :return: dict of flag values.
    """
    values = read_config_file(path)
    unknown = sorted(set(values) - set(allowed_keys))
    if unknown:
        raise ValueError(
            f"config file {path!r} has unknown key(s) {', '.join(unknown)}; "
            f"every key must be a flag of this script (see --help)"
        )
    return values


def parse_args_with_config(defaults, argv=None, description=None):
    """Parse flags in the order defaults -> `--config FILE` (YAML) -> command-line flags.

    :param defaults: dict of flag names to default values; each becomes a `--name` flag.
    :return: argparse.Namespace holding every key of `defaults` plus `config`.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="", help="YAML file of flag values; flags given here override it")
    add_dict_to_argparser(parser, defaults)
    pre_args, _ = parser.parse_known_args(argv)
    if pre_args.config:
        config = load_config(pre_args.config, defaults)
        # Values from YAML go through the same type conversion as typed flags.
        parser.set_defaults(**{k: _coerce(parser, k, v) for k, v in config.items()})
    return parser.parse_args(argv)


def _coerce(parser, key, value):
    action = next(a for a in parser._actions if a.dest == key)
    if value is None or action.type is None:
        return value
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    try:
        return action.type(value if action.type is not str else str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise ValueError(f"config value {key}={value!r} does not fit the flag's type: {e}") from None
