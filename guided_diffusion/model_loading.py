"""A trained model for inference: flags resolved from the config saved beside a checkpoint, weights loaded checked.

Shared by the scripts that read a checkpoint (image_sample, reconstruct, sweep_schedules, classifier_sample, which
also loads a noisy-image classifier with `load_classifier`). Flag values resolve as
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
from .classifier_util import classifier_defaults, create_classifier
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
    typed_config_values,
)
from .state_dict_check import load_state_dict_checked
from .torch_files import read_checkpoint_file

TRAINING_OPTIONS = frozenset(train_flag_defaults()) - frozenset(model_and_diffusion_defaults())
# The diffusion flags that decide which x_t and timesteps a classifier sees: guidance needs the model's values.
PROCESS_FLAGS = ("diffusion_steps", "noise_schedule", "rescale_timesteps")


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
    beside = _config_beside(args.model_path)
    if beside and _is_classifier_run(read_config_file(beside)):
        raise ValueError(
            f"--model_path {args.model_path!r} is in a classifier_train.py run folder (its {CONFIG_FILE} holds "
            "classifier flags): a noisy-image classifier; pass it as --classifier_path (classifier_sample.py) and "
            "the diffusion model as --model_path"
        )
    return beside


def _config_beside(path):
    """The config.yaml beside a local checkpoint file, or None."""
    beside = os.path.join(os.path.dirname(path), CONFIG_FILE)
    return beside if path and "://" not in path and os.path.isfile(beside) else None


def _is_classifier_run(config):
    return "classifier_width" in config and "num_channels" not in config


def _saved_classifier_flags(classifier_path, defaults):
    """(path, values) of the config.yaml classifier_train.py saved beside `classifier_path`: its entries that are
    flags of `defaults`, converted by their types; (None, {}) where there is no such file."""
    beside = _config_beside(classifier_path)
    config = read_config_file(beside) if beside else {}
    if not _is_classifier_run(config):
        return None, {}
    return beside, typed_config_values(config, defaults, beside)


def classifier_flags_beside(classifier_path):
    """The classifier flags (and image_size) of the config.yaml classifier_train.py saved beside `classifier_path`,
    {} without one: classifier_sample.py's defaults for them, below any --config and the command line."""
    return _saved_classifier_flags(classifier_path, classifier_defaults())[1]


def load_model_and_diffusion(args, kind=IMAGE_MODEL):
    """Build the U-Net of `kind` and the respaced diffusion from the flags and load args.model_path into the U-Net.

    A class-conditional model gets as many classes as the checkpoint's label embedding has rows (model.num_classes).

    :return: (model in eval mode on dist_util.dev(), diffusion, identity: the checkpoint fingerprint and flags).
    """
    state_dict = read_weights(args.model_path, "--model_path", "ema_<rate>_{step}.pt (the paper's results use EMA "
                              "weights) or model{step}.pt")
    model_flags = args_to_dict(args, kind.defaults())
    model, diffusion = kind.create(num_classes=checkpoint_num_classes(state_dict), **model_flags)
    load_state_dict_checked(model, state_dict, args.model_path)
    if args.use_fp16:
        model.convert_to_fp16()
    identity = {"checkpoint_sha256": state_dict_fingerprint(state_dict), **model_flags}
    return model.to(dist_util.dev()).eval(), diffusion, identity


def load_classifier(args):
    """Build the noisy-image classifier from the classifier flags and load args.classifier_path into it.

    It gets as many classes as the checkpoint's last layer has rows (classifier.out_channels); its parameters do not
    require gradients (guidance differentiates with respect to the input only).

    :return: (classifier in eval mode on dist_util.dev(), identity: the checkpoint fingerprint and classifier flags).
    """
    state_dict = read_weights(args.classifier_path, "--classifier_path", "model{step}.pt")
    _check_classifier_process(args)
    flags = args_to_dict(args, classifier_defaults())
    classifier = create_classifier(num_classes=checkpoint_num_logits(state_dict), **flags)
    load_state_dict_checked(classifier, state_dict, args.classifier_path)
    if args.classifier_use_fp16:
        classifier.convert_to_fp16()
    identity = {"classifier_sha256": state_dict_fingerprint(state_dict), **flags}
    return classifier.requires_grad_(False).to(dist_util.dev()).eval(), identity


def _check_classifier_process(args):
    """Refuse a classifier whose saved config says it learned another diffusion process than the one sampled."""
    beside, trained = _saved_classifier_flags(args.classifier_path,
                                              {key: model_and_diffusion_defaults()[key] for key in PROCESS_FLAGS})
    differing = [key for key in PROCESS_FLAGS if key in trained and trained[key] != getattr(args, key)]
    if differing:
        raise ValueError(
            f"--classifier_path {args.classifier_path!r} learned x_t of another process ("
            + ", ".join(f"--{key} {trained[key]} in {beside}, {getattr(args, key)} here" for key in differing)
            + "): its gradients would be for other noise levels; train it with the diffusion model's flags"
        )


def read_weights(path, flag, weights_beside):
    """The state_dict in the file `flag` names, refusing a folder and a training-state file.

    :param weights_beside: the weight files beside a training state to suggest, with "{step}" for its step.
    """
    check_model_path(path, flag)
    state_dict = read_checkpoint_file(path, flag)
    if is_training_state(state_dict):
        step = f"{state_dict['step']:06d}"
        raise ValueError(
            f"{flag} {path!r} is a training-state file; use the weights saved beside it: "
            + weights_beside.replace("{step}", step)
        )
    return state_dict


def check_model_path(path, flag="--model_path"):
    """Refuse a checkpoint path that is not a file (a missing path, or a folder: its newest weights are suggested)."""
    if "://" in path or os.path.isfile(path):
        return
    if not path:
        raise ValueError(f"{flag} is required: the checkpoint file to load")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path!r} does not exist")
    by_step = checkpoint_files_by_step(path)
    weights = sorted(name for name in by_step.get(max(by_step, default=-1), []) if name.startswith(("ema_", "model")))
    suggestion = f"such as {' or '.join(os.path.join(path, name) for name in weights)}" if weights else "(a .pt file)"
    raise IsADirectoryError(f"{flag} {path!r} is a folder; pass one checkpoint file {suggestion}")


def checkpoint_num_classes(state_dict):
    """Rows of the label embedding (label_emb.weight [num_classes, C]), or the reference's 1000 without one."""
    weight = state_dict.get("label_emb.weight")
    return NUM_CLASSES if weight is None else int(weight.shape[0])


def checkpoint_num_logits(state_dict):
    """Classes of a classifier state_dict: rows of its head's last weight (the last out.* weight key), else 1000."""
    weights = [key for key in state_dict if key.startswith("out.") and key.endswith("weight")]
    return int(state_dict[weights[-1]].shape[0]) if weights else NUM_CLASSES
