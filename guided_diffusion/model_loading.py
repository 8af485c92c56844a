"""A trained model for inference: flags resolved from the config saved beside a checkpoint, weights loaded checked.

Shared by the scripts that read a checkpoint (image_sample, reconstruct, sweep_schedules). Flag values resolve as
defaults -> `--config FILE` (default: the config.yaml that image_train.py saved beside the checkpoint, when there is
one) -> flags given on the command line.

Keys of that config: the model and diffusion flags and the script's own options are used. The training options
(TRAINING_OPTIONS: every other flag of image_train.py, such as lr, data_dir, log_dir, eval_interval) are ignored,
also those sharing a name with an option of the script (seed, batch_size, precision, compile, channels_last,
inception_path): in a saved config they describe the training run, not this one; give them on the command line.
Any other key is an error naming it. A config of the other kind of network (image_size of an image model,
large_size of a super-resolution one) names the script that serves its checkpoint.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

from . import dist_util
from .checkpoint import (
    CONFIG_FILE,
    checkpoint_files_by_step,
    is_training_state,
    state_dict_fingerprint,
)
from .script_util import (
    NUM_CLASSES,
    args_to_dict,
    build_parser,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    parse_args,
    read_config_file,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
    train_flag_defaults,
)
from .state_dict_check import load_state_dict_checked
from .torch_files import read_checkpoint_file

TRAINING_OPTIONS = frozenset(train_flag_defaults()) - frozenset(model_and_diffusion_defaults())


@dataclass(frozen=True)
class ModelKind:
    """One kind of diffusion network: its model/diffusion flags, its factory and the scripts for its checkpoints."""

    name: str                    # with its article, for messages
    defaults: Callable           # () -> {flag: default} of the model and diffusion
    create: Callable             # (num_classes=..., **flags) -> (model, diffusion)
    size_flag: str               # the flag only this kind has
    sample_script: str


IMAGE_MODEL = ModelKind("an image model", model_and_diffusion_defaults, create_model_and_diffusion, "image_size",
                        "image_sample.py")
SUPER_RES_MODEL = ModelKind("a super-resolution model", sr_model_and_diffusion_defaults, sr_create_model_and_diffusion,
                            "large_size", "super_res_sample.py")


def checkpoint_parser(description, defaults, kind=IMAGE_MODEL):
    """A parser with `defaults`' flags (which must include model_path), the model/diffusion flags of `kind` and
    --config."""
    parser = build_parser({**defaults, **kind.defaults()}, description)
    config = next(a for a in parser._actions if a.dest == "config")
    config.help = (
        f"YAML of flag values (default: {CONFIG_FILE} beside the checkpoint, if present); its training options "
        "(lr, seed, batch_size, precision, ...) are ignored; command-line flags override it"
    )
    return parser


def parse_checkpoint_args(parser, argv=None, kind=IMAGE_MODEL):
    """Namespace: defaults -> the config (args.config; "" if none) without its training options -> flags.

    :raises ValueError: for a config of another kind of network than `kind`, naming the script it needs.
    """
    known = parser.parse_known_args(argv)[0]
    config = known.config or _config_beside_checkpoint(known)
    if config:
        _check_config_kind(config, kind)
    return parse_args(parser, argv, config_fallback=_config_beside_checkpoint, ignored_keys=TRAINING_OPTIONS)


def _check_config_kind(path, kind):
    other = SUPER_RES_MODEL if kind is IMAGE_MODEL else IMAGE_MODEL
    keys = read_config_file(path)
    if kind.size_flag not in keys and other.size_flag in keys:
        raise ValueError(
            f"config file {path!r} is of {other.name} ({other.size_flag}: {keys[other.size_flag]}); "
            f"sample its checkpoints with scripts/{other.sample_script}"
        )


def _config_beside_checkpoint(args):
    beside = os.path.join(os.path.dirname(args.model_path), CONFIG_FILE)
    return beside if args.model_path and os.path.isfile(beside) else None


def load_model_and_diffusion(args, kind=IMAGE_MODEL):
    """Build the U-Net of `kind` and the respaced diffusion from the flags and load args.model_path into the U-Net.

    A class-conditional model gets as many classes as the checkpoint's label embedding has rows (model.num_classes).

    :return: (model in eval mode on dist_util.dev(), diffusion, identity: the checkpoint fingerprint and flags).
    """
    check_model_path(args.model_path)
    state_dict = read_checkpoint_file(args.model_path, "--model_path")
    if is_training_state(state_dict):
        raise ValueError(
            f"--model_path {args.model_path!r} is a training-state file; sample from the weights saved beside it: "
            f"ema_<rate>_{state_dict['step']:06d}.pt (the paper's results use EMA weights) or "
            f"model{state_dict['step']:06d}.pt"
        )
    model_flags = args_to_dict(args, kind.defaults())
    model, diffusion = kind.create(num_classes=checkpoint_num_classes(state_dict), **model_flags)
    load_state_dict_checked(model, state_dict, args.model_path)
    if args.use_fp16:
        model.convert_to_fp16()
    identity = {"checkpoint_sha256": state_dict_fingerprint(state_dict), **model_flags}
    return model.to(dist_util.dev()).eval(), diffusion, identity


def check_model_path(path):
    """Refuse a --model_path that is not a file (a missing path, or a folder: its newest weights are suggested)."""
    if "://" in path or os.path.isfile(path):
        return
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model_path {path!r} does not exist")
    by_step = checkpoint_files_by_step(path)
    weights = sorted(name for name in by_step.get(max(by_step, default=-1), []) if name.startswith(("ema_", "model")))
    suggestion = f"such as {' or '.join(os.path.join(path, name) for name in weights)}" if weights else "(a .pt file)"
    raise IsADirectoryError(f"--model_path {path!r} is a folder; pass one checkpoint file {suggestion}")


def checkpoint_num_classes(state_dict):
    """Rows of the label embedding (label_emb.weight [num_classes, C]), or the reference's 1000 without one."""
    weight = state_dict.get("label_emb.weight")
    return NUM_CLASSES if weight is None else int(weight.shape[0])
