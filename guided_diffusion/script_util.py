"""Flag defaults, configuration files and factories (ADM flag names).

Every script's flags resolve in one order: the defaults here -> a YAML `--config` file (its `base:` chain first)
-> flags given on the command line (`build_parser` + `parse_args`). Every flag of the reference P2/ADM scripts
keeps its name and default (docs/compatibility.md, "Command-line flags") except where the reference is defective:
`p2_gamma`/`p2_k` are floats, and `--sigma_small` makes FIXED_SMALL reachable.
"""

import argparse
import os
import re
import sys

import yaml

from . import gaussian_diffusion as gd
from .respace import SpacedDiffusion, space_timesteps
from .super_res import SuperResModel
from .unet import UNetModel

NUM_CLASSES = 1000  # label_emb rows of a class-conditional model built by image_train.py (the reference's)

# channel_mult used when --channel_mult is "" (docs/compatibility.md, "Command-line flags"); 32 px follows IDDPM.
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
        weighting="p2",              # ε-MSE weight: p2|min_snr|soft_min_snr|sigmoid|edm|constant (docs/weightings.md)
        snr_gamma=5.0,               # γ of min_snr (Hang et al. 2023)
        sigmoid_bias=-3.0,           # b of sigmoid, weight sigmoid(b - log SNR) (Kingma & Gao 2023)
        sigma_data=0.5,              # σ_data of soft_min_snr and edm
        normalize_weights=False,     # rescale the weights to mean 1 over the timesteps (the scale is logged)
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


def train_defaults():
    """Training flags of image_train.py: the reference's, then this project's additions."""
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
        save_interval_minutes=0.0,   # also a checkpoint after this many minutes of wall-clock time; 0 = off
        resume_checkpoint="",        # stateNNNNNN.pt, modelNNNNNN.pt, a log dir, or "auto" (--log_dir's newest, if any)
        use_fp16=False,              # the reference's spelling of --precision fp16
        fp16_scale_growth=1e-3,      # log2 growth of the fp16 loss scale per step
        seed=0,                      # model init, data order and augmentation, t and noise draws
        max_steps=0,                 # stop after this many optimizer steps (LR unchanged); 0 = no limit
        precision="fp32",            # fp32, bf16 or fp16 (autocast; the weights stay fp32)
        num_workers=1,               # image decoding processes per rank
        random_flip=True,            # horizontal flips with probability 1/2
        keep_checkpoints=0,          # keep only the newest N checkpoints; 0 = keep all
        compile=False,               # torch.compile the U-Net (slow first step; see README "Performance")
        channels_last="auto",        # NHWC convolutions: auto (timed on a CPU), true or false (README "Performance")
        dist_timeout=30.0,           # minutes a rank waits for its peers (start-up and every collective)
    )


def eval_defaults():
    """In-training evaluation flags of image_train.py (FID/KID of EMA samples, the paper's Fig. 4)."""
    # evaluation imports clean-fid, which only this default needs: imported here, not by every script.
    from .evaluation import DEFAULT_CACHE_DIR

    return dict(
        eval_interval=0,                 # optimizer steps between evaluations; 0 = off
        eval_samples=1000,               # images sampled per evaluation (the paper's ablations use 10k)
        eval_batch_size=64,              # images per sampling batch per rank
        eval_reference="",               # folder/zip/npz/statistics file or clean-fid "name:res:split"; "" = data_dir
        eval_timestep_respacing="ddim50",  # the sampling schedule of the evaluation
        eval_use_ddim=True,              # DDIM (eta 0) over that schedule, else ancestral
        eval_sampler="",                 # "" = per eval_use_ddim; dpm++2m|dpm++2m_sde|heun use the next two flags
        eval_steps=0,                    # (not eval_timestep_respacing / eval_use_ddim); 0 = the sampler's default
        eval_step_schedule="",           # time|logsnr|karras; "" = the sampler's default (see image_sample.py)
        eval_metrics="fid,kid",
        eval_mode="clean",               # clean-fid preprocessing mode
        inception_path="",               # TorchScript inception-2015-12-05.pt (offline machines)
        eval_cache_dir=DEFAULT_CACHE_DIR,  # cached reference statistics
    )


def train_flag_defaults():
    """Every flag of image_train.py with its default: model, diffusion, training and in-training evaluation."""
    return {**model_and_diffusion_defaults(), **train_defaults(), **eval_defaults()}


# image_train.py flags that may differ between a checkpoint's saved config and the run resuming it: where files go,
# when to log, save, stop or evaluate, and how fast the same computation runs. Every other training flag changes
# the maths of the run (the model, the diffusion and its loss weighting, the optimizer, the batches, the precision,
# the seeds) and must match on resume.
RESUME_MAY_CHANGE = frozenset({
    "log_dir", "resume_checkpoint",                                  # where the run lives
    "max_steps", "log_interval", "save_interval", "keep_checkpoints",  # when to stop, log, save, prune
    "save_interval_minutes", "dist_timeout",                         # wall-clock saves, waiting for peers
    "num_workers", "compile", "channels_last", "use_checkpoint",     # speed and memory; batches are unchanged
    "data_dir",                                                      # the same images may have moved
    "eval_interval", "eval_samples", "eval_batch_size", "eval_reference", "eval_timestep_respacing",
    "eval_use_ddim", "eval_sampler", "eval_steps", "eval_step_schedule",
    "eval_metrics", "eval_mode", "inception_path", "eval_cache_dir",  # scoring only
})
# Of RESUME_MAY_CHANGE, the flags whose change should be logged on resume: a new data_dir is allowed (the data
# moved) but cannot be checked to hold the same images.
RESUME_CHANGE_LOGGED = frozenset({"data_dir"})


def sample_defaults():
    """Sampling flags of image_sample.py (besides the model and diffusion flags)."""
    return dict(
        model_path="",               # checkpoint: a plain U-Net state_dict (model*.pt, ema_*.pt, released .pt)
        sample_dir="",               # output folder; "" = beside the checkpoint, named after it and the schedule
        num_samples=10000,
        batch_size=16,               # samples per forward pass on each rank
        use_ddim=False,              # DDIM over the respaced steps (any spacing) instead of ancestral sampling
        ddim_eta=0.0,                # η of DDIM; 0 = deterministic
        sampler="",                  # ancestral|ddim|dpm++2m|dpm++2m_sde|heun; "" = ddim with --use_ddim, else ancestral
        steps=0,                     # noise levels of dpm++2m* and heun; 0 = 20 (dpm++2m, dpm++2m_sde), 10 (heun)
        step_schedule="",            # time|logsnr|karras for those; "" = logsnr (dpm++2m), karras (dpm++2m_sde, heun)
        heun_churn=0.0,              # heun's S_churn (EDM Algorithm 2); 0 = deterministic (Algorithm 1)
        heun_s_tmin=0.0,             # with churn: churn only steps whose σ lies in [S_tmin, S_tmax]
        heun_s_tmax=float("inf"),
        heun_s_noise=1.0,            # with churn: scale of the added noise
        clip_denoised=True,          # clamp x̂₀ to [-1, 1] at every step
        seed=0,                      # sample i depends only on (seed, i), not on batch size or ranks
        precision="fp32",            # fp32, or bf16 / fp16 autocast of the network
        compile=False,               # torch.compile the U-Net (slow first batch; see README "Performance")
        channels_last="auto",        # NHWC convolutions: auto (timed on a CPU), true or false (README "Performance")
    )


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


def parse_attention_resolutions(attention_resolutions, image_size, channel_mult):
    """Pixel resolutions ("16,8") -> downsample rates (image_size // r). "" or "none" -> () (bottleneck only).

    :param channel_mult: the parsed channel_mult tuple; level k of the U-Net runs at image_size / 2**k pixels.
    :raises ValueError: for a resolution no level reaches (the model would silently skip its attention).
    """
    text = str(attention_resolutions).strip().lower()
    if text in ("", "none"):
        return ()
    reachable = [image_size // 2**level for level in range(len(channel_mult))]
    rates = []
    for part in text.split(","):
        try:
            res = int(part)
        except ValueError:
            raise ValueError(
                f"--attention_resolutions {attention_resolutions!r}: expected comma-separated pixel "
                "resolutions such as 16,8, or 'none' for bottleneck-only attention"
            ) from None
        if res not in reachable:
            raise ValueError(
                f"--attention_resolutions: resolution {res} is never reached by the U-Net at image_size={image_size} "
                f"with channel_mult={','.join(map(str, channel_mult))}; reachable: "
                f"{','.join(map(str, reachable))} (the middle block always has attention)"
            )
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
    num_classes=NUM_CLASSES,
    model_class=UNetModel,
):
    """Build the ADM U-Net (or `model_class`, a subclass taking the same arguments) from flag values (in_channels 3;
    out 6 with learn_sigma; `num_classes` label embeddings if class_cond, by default the reference's 1000)."""
    channel_mult = parse_channel_mult(channel_mult, image_size)
    levels = len(channel_mult) - 1
    if image_size % (2**levels):
        raise ValueError(
            f"image_size={image_size} is not divisible by 2**{levels} = {2 ** levels}, which the "
            f"{len(channel_mult)} levels of channel_mult={','.join(map(str, channel_mult))} need; "
            "change --image_size or --channel_mult"
        )
    return model_class(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=(3 if not learn_sigma else 6),
        num_res_blocks=num_res_blocks,
        attention_resolutions=parse_attention_resolutions(attention_resolutions, image_size, channel_mult),
        dropout=dropout,
        channel_mult=channel_mult,
        num_classes=(num_classes if class_cond else None),
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
    weighting="p2",
    snr_gamma=5.0,
    sigmoid_bias=-3.0,
    sigma_data=0.5,
    normalize_weights=False,
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
        weighting=weighting,
        snr_gamma=snr_gamma,
        sigmoid_bias=sigmoid_bias,
        sigma_data=sigma_data,
        normalize_weights=normalize_weights,
    )


def create_model_and_diffusion(num_classes=NUM_CLASSES, model_class=UNetModel, **kwargs):
    """Model and diffusion from a dict holding (at least) every key of model_and_diffusion_defaults()."""
    model_keys = set(model_defaults()) - {"image_size"}
    model = create_model(
        image_size=kwargs["image_size"],
        learn_sigma=kwargs["learn_sigma"],
        num_classes=num_classes,
        model_class=model_class,
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


# ----------------------------------------------------------------------------------------------------------------
# One parsing path for every script: defaults -> YAML config (its base chain first) -> command-line flags
# ----------------------------------------------------------------------------------------------------------------

CONFIG_HELP = (
    "YAML file of flag values (a `base: other.yaml` key extends another file, relative to this one); "
    "command-line flags override it"
)


def build_parser(defaults, description):
    """An ArgumentParser with `--config` and one `--key` flag per entry of `defaults`, typed by its default."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="", help=CONFIG_HELP)
    add_dict_to_argparser(parser, defaults)
    return parser


def parse_args(parser, argv=None, config_fallback=None, ignored_keys=frozenset()):
    """Parse `argv` (default sys.argv[1:]) in the order defaults -> YAML config -> command-line flags.

    Every key of the config must be a flag of `parser` (or in `ignored_keys`); its value is read as the text it is
    written with (`read_config_file`) and goes through the flag's own type conversion and choices, so every value
    follows the command line's rules: `batch_size: 2.7` fails as `--batch_size 2.7` does, `use_fp16: on` fails as
    `--use_fp16 on` does, and `data_dir: true` is the folder "true". Positional arguments come from the command
    line only.

    :param parser: an ArgumentParser with a `--config` flag (build_parser makes one).
    :param config_fallback: callable(args parsed without a config) -> path or None: the config to read when
        `--config` is not given (the checkpoint scripts read the config.yaml saved beside the checkpoint).
    :param ignored_keys: config keys the script drops without looking at them, even where it has a flag of the same
        name; the caller documents them (the checkpoint scripts ignore a saved config's training options).
    :return: argparse.Namespace; `config` holds the path of the config read, "" when none.
    :raises ValueError: unknown keys, values the flag's type refuses, malformed or cyclic files.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    known = parser.parse_known_args(argv)[0]
    path = known.config or (config_fallback(known) if config_fallback is not None else None) or ""
    if path:
        values = read_config_file(path)
        flags = _flag_actions(parser)
        unknown = sorted(set(values) - set(flags) - set(ignored_keys))
        if unknown:
            raise ValueError(
                f"config file {path!r} has unknown key(s) {', '.join(unknown)}; every key must be a flag of "
                f"{parser.prog} (see --help)"
            )
        parser.set_defaults(
            **{k: _convert(flags[k], v, path) for k, v in values.items() if k not in ignored_keys}
        )
    args = parser.parse_args(argv)
    args.config = path
    return args


def typed_config_values(values, defaults, path):
    """The entries of `values` (read_config_file of `path`) that are flags of `defaults`, converted by those flags'
    types as parse_args converts them; other keys are left out."""
    flags = _flag_actions(build_parser(defaults, ""))
    return {k: _convert(flags[k], v, path) for k, v in values.items() if k in flags}


def _flag_actions(parser):
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}


class _TextLoader(yaml.SafeLoader):
    """A YAML loader that keeps every scalar as the text it is written with; only a plain null (`~`, `null` or
    nothing) becomes None. YAML's own typing (1.1: `on` -> True, `0x10` -> 16, `1:30` -> 90) is left out, so that a
    value is converted by its flag's type exactly as the same text on the command line is."""


_TextLoader.yaml_implicit_resolvers = {}   # SafeLoader's resolvers (bool, int, float, timestamp, ...) left out
_TextLoader.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""])
YAML_SPECIAL_FLOATS = {".inf": "inf", "+.inf": "inf", "-.inf": "-inf", ".nan": "nan"}   # how yaml.safe_dump writes them


def read_config_file(path):
    """The flag values of a YAML config: a flat mapping, after those of its `base:` file (chains allowed).

    Values are texts (lists of texts, None for a null), as `_TextLoader` reads them.
    """
    return _read_config_chain(os.path.abspath(path), ())


def _read_config_chain(path, extended_by):
    if path in extended_by:
        cycle = " -> ".join(os.path.basename(p) for p in (*extended_by, path))
        raise ValueError(f"config files extend each other in a cycle: {cycle} (in {os.path.dirname(path)})")
    values = _read_yaml_mapping(path, extended_by[-1] if extended_by else None)
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str) or not base:
        raise ValueError(f"config file {path!r}: base must name another YAML file, got {base!r}")
    return {**_read_config_chain(os.path.join(os.path.dirname(path), base), (*extended_by, path)), **values}


def _read_yaml_mapping(path, extending):
    if not os.path.isfile(path):
        named_by = f" (the base of {extending!r})" if extending else "; see configs/ for the bundled ones"
        raise FileNotFoundError(f"config file {path!r} does not exist{named_by}")
    with open(path) as f:
        try:
            values = yaml.load(f, Loader=_TextLoader) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path!r} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of flag names to values")
    return values


def _convert(action, value, path):
    """A config value as the flag `action` would read it from the command line."""
    key = action.dest
    if value is None:
        if action.default is None:
            return None
        raise ValueError(f"config file {path!r}: {key} has no value; give one or remove the key")
    if isinstance(value, dict):
        raise ValueError(f"config file {path!r}: {key} holds a mapping; flags take a value or a list")
    if action.nargs in ("+", "*"):
        texts = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    else:
        texts = [",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)]
    if action.type is float:
        texts = [YAML_SPECIAL_FLOATS.get(text.lower(), text) for text in texts]
    try:
        converted = [action.type(text) if action.type is not None else text for text in texts]
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        kind = getattr(action.type, "__name__", "value")
        raise ValueError(f"config file {path!r}: {key}: {value!r} is not a valid {kind} ({e})") from None
    if action.choices is not None and any(c not in action.choices for c in converted):
        raise ValueError(
            f"config file {path!r}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}"
        )
    return converted if action.nargs in ("+", "*") else converted[0]


def _yaml_problem(error):
    """A YAML parser error in one line, each part with its 1-based position, e.g. "while parsing a flow sequence
    (line 1, column 13): expected ',' or ']', but got '<stream end>' (line 3, column 1)"."""
    if getattr(error, "problem", None) is None:
        return " ".join(str(error).split())
    parts = [(error.context, error.context_mark), (error.problem, error.problem_mark)]
    return ": ".join(text + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else "")
                     for text, mark in parts if text)


# ----------------------------------------------------------------------------------------------------------------
# Super-resolution (scripts/super_res_train.py, scripts/super_res_sample.py)
# ----------------------------------------------------------------------------------------------------------------

# channel_mult of the reference's upsamplers by --large_size; other sizes use DEFAULT_CHANNEL_MULT or --channel_mult.
SR_CHANNEL_MULT = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}


def sr_model_and_diffusion_defaults():
    """Model and diffusion flags of the super-resolution scripts: the reference's (large_size, small_size and the
    U-Net and diffusion flags, defaults as for image models), plus channel_mult, use_new_attention_order and this
    project's diffusion flags (sigma_small and the loss weighting: p2_gamma, p2_k, weighting, ...)."""
    model = {k: v for k, v in model_defaults().items() if k != "image_size"}
    return dict(
        large_size=256,              # pixels per side of the output
        small_size=64,               # pixels per side of the low-resolution input
        **model,
        **diffusion_defaults(),
    )


def sr_create_model_and_diffusion(num_classes=NUM_CLASSES, **kwargs):
    """SuperResModel and diffusion from a dict holding every key of sr_model_and_diffusion_defaults().

    channel_mult "" follows the reference's upsamplers for large_size 64, 256 and 512 (SR_CHANNEL_MULT).
    """
    large_size, small_size = kwargs["large_size"], kwargs["small_size"]
    if not 0 < small_size <= large_size:
        raise ValueError(
            f"--small_size {small_size} must be between 1 and --large_size {large_size}: the model upsamples "
            "small_size px inputs to large_size px outputs"
        )
    flags = {k: v for k, v in kwargs.items() if k not in ("large_size", "small_size")}
    flags["channel_mult"] = kwargs["channel_mult"] or SR_CHANNEL_MULT.get(large_size, "")
    return create_model_and_diffusion(num_classes, SuperResModel, image_size=large_size, **flags)


# The reference's script_util also held the classifier's flags and factories; they live in classifier_util (which
# imports this module), and are served from here on first use so that reference-style imports keep working:
# `from guided_diffusion.script_util import create_classifier, classifier_defaults`.
_CLASSIFIER_NAMES = frozenset({
    "classifier_defaults", "classifier_and_diffusion_defaults", "create_classifier", "create_classifier_and_diffusion",
})


def __getattr__(name):
    if name in _CLASSIFIER_NAMES:
        from . import classifier_util

        return getattr(classifier_util, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
