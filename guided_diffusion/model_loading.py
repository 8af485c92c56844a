"""A trained model for inference: flags resolved from the config saved beside a checkpoint, weights loaded checked.

Shared by the scripts that read a checkpoint (image_sample, reconstruct, sweep_schedules). Flag values resolve as
defaults -> the model/diffusion flags of `--config` (default: the config.yaml that image_train.py saved beside the
checkpoint) -> flags given on the command line.
"""

import argparse
import hashlib
import os
import sys

import torch

from . import dist_util
from .checkpoint import CONFIG_FILE, is_training_state
from .script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    read_config_file,
)
from .state_dict_check import load_state_dict_checked


def checkpoint_parser(description, defaults):
    """A parser with `defaults`' flags (which must include model_path), the model/diffusion flags and --config."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config",
        default="",
        help=f"YAML whose model/diffusion flags are used (default: {CONFIG_FILE} beside the checkpoint, if present); "
        "command-line flags override it",
    )
    add_dict_to_argparser(parser, {**defaults, **model_and_diffusion_defaults()})
    return parser


def parse_checkpoint_args(parser, argv=None):
    """(args, config path or None): defaults -> model/diffusion flags of the config -> command-line flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    given = parser.parse_args(argv)
    config = config_path_for(given.config, given.model_path)
    if config is None:
        return given, None
    # argparse keeps the last value of a repeated flag, so the command line wins over the config's tokens.
    return parser.parse_args(config_as_flags(config) + argv), config


def config_path_for(config, model_path):
    """The config to use: --config, else config.yaml beside the checkpoint if it exists, else None."""
    if config:
        if not os.path.isfile(config):
            raise FileNotFoundError(f"--config {config!r} does not exist")
        return config
    beside = os.path.join(os.path.dirname(model_path), CONFIG_FILE)
    return beside if model_path and os.path.isfile(beside) else None


def config_as_flags(path):
    """The model and diffusion flags of a YAML config, as command-line tokens (argparse then types them)."""
    values = read_config_file(path)
    tokens = []
    for key in model_and_diffusion_defaults():
        if key in values:
            value = values[key]
            if isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)
            tokens += [f"--{key}", str(value)]
    return tokens


def state_dict_fingerprint(state_dict):
    """SHA-256 over keys, dtypes, shapes and bytes: names the weights whatever file or format held them."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def load_model_and_diffusion(args):
    """Build the U-Net and the respaced diffusion from the flags and load args.model_path into the U-Net.

    :return: (model in eval mode on dist_util.dev(), diffusion, identity: the checkpoint fingerprint and flags).
    """
    if "://" not in args.model_path and not os.path.isfile(args.model_path):
        raise FileNotFoundError(f"--model_path {args.model_path!r} does not exist")
    model_flags = args_to_dict(args, model_and_diffusion_defaults())
    model, diffusion = create_model_and_diffusion(**model_flags)
    state_dict = dist_util.load_state_dict(args.model_path)
    if is_training_state(state_dict):
        raise ValueError(
            f"--model_path {args.model_path!r} is a training-state file; sample from the weights saved beside it: "
            f"ema_<rate>_{state_dict['step']:06d}.pt (the paper's results use EMA weights) or "
            f"model{state_dict['step']:06d}.pt"
        )
    load_state_dict_checked(model, state_dict, args.model_path)
    if args.use_fp16:
        model.convert_to_fp16()
    identity = {"checkpoint_sha256": state_dict_fingerprint(state_dict), **model_flags}
    return model.to(dist_util.dev()).eval(), diffusion, identity
