"""Checking a U-Net or classifier state_dict against the model built from the flags, and explaining a mismatch by the
flag that would cause it (docs/compatibility.md, "U-Net and checkpoint layout").

The diffusion U-Net and the noisy-image classifier (encoder_unet.EncoderUNetModel) share their encoder's key names,
so a file of one kind given for the other is named as such, with the flag that takes it; a classifier's mismatches
name the classifier's flags (--classifier_depth for --num_res_blocks, ...)."""

import re

import torch


class CheckpointMismatchError(ValueError):
    """A state_dict whose keys or shapes do not fit the U-Net built from the current flags."""


def load_state_dict_checked(model, state_dict, source_name):
    """Load a U-Net (or classifier) state_dict with strict=True, explaining any mismatch by the flag that would cause
    it.

    Parameter shapes cannot reveal the number of attention heads (num_heads / num_head_channels): a
    checkpoint trained with other heads loads and gives different outputs, so those flags must match by hand.

    :param model: a UNetModel or EncoderUNetModel.
    :param state_dict: mapping of parameter names to tensors (e.g. torch.load(path, weights_only=True)).
    :param source_name: where the state_dict came from (a path), for the message.
    :raises CheckpointMismatchError: naming each differing key (a few per cause) and the flag to check.
    """
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointMismatchError(
                f"{source_name} is not a U-Net state_dict: key {key!r} holds a {type(value).__name__}, not a "
                "tensor (is it a full training checkpoint? pass the model weights it contains)"
            )
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in state_dict.items()}
    mismatches = describe_mismatches(expected, found)
    if mismatches:
        raise CheckpointMismatchError(_format_mismatches(source_name, _model_kind(expected) or "U-Net", mismatches))
    model.load_state_dict(state_dict, strict=True)


_EXAMPLES_PER_KIND = 2
# input_blocks.3.0.in_layers.0.weight -> block "input_blocks.3", layer 0, part "in_layers"
_BLOCK_KEY = re.compile(r"^(input_blocks\.\d+|output_blocks\.\d+|middle_block)\.(\d+)\.(\w+)")
_RESBLOCK_PARTS = {"in_layers", "emb_layers", "out_layers", "skip_connection"}
_CHANNELS_CAUSE = "check --num_channels / --channel_mult: channel counts differ"
_UNKNOWN_CAUSE = "no flag explains these keys: is the file a P2 / ADM / improved-diffusion U-Net checkpoint?"
_KIND_SWAP_CAUSES = {
    ("U-Net", "classifier"): (
        "the checkpoint is a noisy-image classifier (no output_blocks), not a diffusion U-Net: pass it as "
        "--classifier_path (classifier_sample.py) and the diffusion model as --model_path"
    ),
    ("classifier", "U-Net"): (
        "the checkpoint is a diffusion U-Net (it has output_blocks), not a noisy-image classifier: pass it as "
        "--model_path and the classifier as --classifier_path"
    ),
}
_POOL_CAUSE = "check --classifier_pool: the checkpoint has another head (adaptive, attention, spatial, spatial_v2)"
# The U-Net flag a cause names -> the classifier's flag of the same meaning.
_CLASSIFIER_FLAGS = {
    "num_res_blocks": "classifier_depth",
    "num_channels": "classifier_width",
    "channel_mult": "classifier_channel_mult",
    "attention_resolutions": "classifier_attention_resolutions",
    "use_scale_shift_norm": "classifier_use_scale_shift_norm",
    "resblock_updown": "classifier_resblock_updown",
}
_FLAG = re.compile(r"--(\w+)")


def _model_kind(shapes):
    """"U-Net" (a decoder: output_blocks), "classifier" (an encoder without one) or None, from a state_dict's keys."""
    if any(key.startswith("output_blocks.") for key in shapes):
        return "U-Net"
    if any(key.startswith("input_blocks.") for key in shapes):
        return "classifier"
    return None
_FIRST_CONV = "input_blocks.0.0.weight"  # [C, in_channels, 3, 3]


def describe_mismatches(expected, found):
    """Compare parameter shapes of the model (`expected`) and a checkpoint (`found`), both {key: shape tuple}.

    :return: list of (cause naming the flag to check, key, kind of difference, what differs); empty when the
        checkpoint fits. Kinds: "missing", "unexpected", "misshaped", "structure".
    """
    if found and all(key.startswith("module.") for key in found):
        cause = "keys carry a 'module.' prefix (saved from a DistributedDataParallel wrapper): strip it"
        return [(cause, next(iter(found)), "structure", "prefixed key")]
    model_kind, file_kind = _model_kind(expected), _model_kind(found)
    if (model_kind, file_kind) in _KIND_SWAP_CAUSES:
        difference = f"the checkpoint is a {file_kind}, this model a {model_kind}"
        return [(_KIND_SWAP_CAUSES[model_kind, file_kind], "output_blocks", "structure", difference)]
    mismatches = []
    model_blocks, file_blocks = _input_block_count(expected), _input_block_count(found)
    if model_blocks != file_blocks:
        cause = (
            "check --num_res_blocks / --channel_mult (or --image_size, which picks the default channel_mult): "
            "the number of blocks differs"
        )
        difference = f"the checkpoint has {file_blocks} input blocks, this model {model_blocks}"
        mismatches.append((cause, "input_blocks", "structure", difference))
    layouts = (_block_layouts(expected), _block_layouts(found))
    for key in list(expected) + [key for key in found if key not in expected]:
        model_shape, file_shape = expected.get(key), found.get(key)
        if model_shape == file_shape or (model_blocks != file_blocks and _BLOCK_KEY.match(key)):
            continue
        if model_kind == "classifier" and key.startswith("out."):
            cause = _classifier_head_cause(key, model_shape, file_shape)
        else:
            cause = _cause(key, model_shape, file_shape, expected, found, *layouts)
        mismatches.append((cause, key, *_difference(model_shape, file_shape)))
    if model_kind == "classifier":
        mismatches = [(_classifier_cause(cause), *rest) for cause, *rest in mismatches]
    return mismatches


def _classifier_head_cause(key, model_shape, file_shape):
    """Why a key of the classifier's head (out.*) differs: another pool, the image size, or the channel counts."""
    if model_shape is None or file_shape is None:
        return _POOL_CAUSE
    if key.endswith("positional_embedding") and model_shape[0] == file_shape[0]:
        return "check --image_size: the attention pool's positional embedding is for another feature size"
    return _CHANNELS_CAUSE


def _classifier_cause(cause):
    """A U-Net cause in the classifier's terms: its flag names, and "classifier" for "U-Net"."""
    cause = _FLAG.sub(lambda match: "--" + _CLASSIFIER_FLAGS.get(match.group(1), match.group(1)), cause)
    return cause.replace("U-Net checkpoint", "classifier checkpoint")


def _input_block_count(shapes):
    # The last input block is always a ResBlock, so its index is present even when resamplers have no weights.
    indices = [int(key.split(".")[1]) for key in shapes if key.startswith("input_blocks.")]
    return max(indices) + 1 if indices else 0


def _block_layouts(shapes):
    """{block such as 'output_blocks.3': {layer index: 'ResBlock' | 'attention' | 'resampler' | 'conv'}}."""
    parts = {}
    for key in shapes:
        match = _BLOCK_KEY.match(key)
        if match:
            block, layer, part = match.groups()
            parts.setdefault(block, {}).setdefault(int(layer), set()).add(part)
    return {block: {layer: _layer_kind(names) for layer, names in layers.items()} for block, layers in parts.items()}


def _layer_kind(part_names):
    if part_names & _RESBLOCK_PARTS:
        return "ResBlock"
    if "qkv" in part_names:
        return "attention"
    if part_names & {"op", "conv"}:
        return "resampler"
    return "conv"


def _cause(key, model_shape, file_shape, expected, found, model_layouts, file_layouts):
    if key == _FIRST_CONV and model_shape and file_shape and model_shape[1] != file_shape[1]:
        return _input_channels_cause(model_shape[1], file_shape[1])
    if key.startswith("label_emb."):
        if model_shape is None:
            return "check --class_cond: the checkpoint is class-conditional; set --class_cond True"
        if file_shape is None:
            return "check --class_cond: the checkpoint is unconditional; set --class_cond False"
        return "check --class_cond: the number of classes differs"
    match = _BLOCK_KEY.match(key)
    if match:
        model_layout, file_layout = model_layouts.get(match.group(1), {}), file_layouts.get(match.group(1), {})
        if model_layout != file_layout:
            return _layout_cause(model_layout, file_layout)
    if model_shape and file_shape and model_shape[1:] == file_shape[1:]:
        if key.startswith("out.2."):
            return (
                f"check --learn_sigma: the checkpoint outputs {file_shape[0]} channels, this model "
                f"{model_shape[0]} (learn_sigma doubles them to add the variance output)"
            )
        out_norm_key = key.split(".emb_layers.1.")[0] + ".out_layers.0.weight"
        if ".emb_layers.1." in key and expected.get(out_norm_key) == found.get(out_norm_key):
            needed = file_shape[0] > model_shape[0]
            verb = "uses" if needed else "has no"
            return f"check --use_scale_shift_norm: the checkpoint {verb} AdaGN; set it {needed}"
    if (model_shape and file_shape) or ".skip_connection." in key:
        return _CHANNELS_CAUSE
    return _UNKNOWN_CAUSE


def _input_channels_cause(model_channels, file_channels):
    """A super-resolution checkpoint (its first conv also takes the upsampled low-resolution image: 2 x 3 input
    channels) given to an image model, or the reverse."""
    if file_channels == 2 * model_channels:
        return (
            f"check the script: the checkpoint's first conv takes {file_channels} input channels, the image and its "
            "upsampled low-resolution input: a super-resolution model; sample it with scripts/super_res_sample.py"
        )
    if model_channels == 2 * file_channels:
        return (
            f"check the script: the checkpoint's first conv takes {file_channels} input channels, an image model, "
            "not a super-resolution one; sample it with scripts/image_sample.py"
        )
    return _UNKNOWN_CAUSE


def _layout_cause(model_layout, file_layout):
    """Why one U-Net block holds different layers in the model and in the checkpoint."""
    model_kinds, file_kinds = list(model_layout.values()), list(file_layout.values())
    if model_kinds.count("attention") != file_kinds.count("attention"):
        return (
            "check --attention_resolutions: attention follows different blocks (pixel sizes such as 16,8; "
            "'none' = bottleneck only)"
        )
    if ("resampler" in model_kinds) != ("resampler" in file_kinds):
        needed = "resampler" not in file_kinds
        kind = "BigGAN ResBlocks" if needed else "plain conv resamplers"
        return f"check --resblock_updown: the checkpoint uses {kind} to up/downsample; set --resblock_updown {needed}"
    return _UNKNOWN_CAUSE


def _difference(model_shape, file_shape):
    """(kind, text) of one key's difference."""
    if file_shape is None:
        return "missing", f"missing from the checkpoint (this model has shape {model_shape})"
    if model_shape is None:
        return "unexpected", f"not in this model (checkpoint shape {file_shape})"
    return "misshaped", f"checkpoint shape {file_shape}, this model {model_shape}"


def _format_mismatches(source_name, model_kind, mismatches):
    # Per cause, a few keys of each kind (missing, unexpected, misshaped), so both sides of a swap show.
    examples = {}
    for cause, key, kind, difference in mismatches:
        examples.setdefault(cause, {}).setdefault(kind, []).append(f"{key}: {difference}")
    lines = [f"{source_name} does not fit the {model_kind} built from the current flags:"]
    for cause, by_kind in examples.items():
        lines.append(f"  {cause}")
        for entries in by_kind.values():
            lines.extend(f"    {entry}" for entry in entries[:_EXAMPLES_PER_KIND])
            if len(entries) > _EXAMPLES_PER_KIND:
                lines.append(f"    ... and {len(entries) - _EXAMPLES_PER_KIND} more like it")
    return "\n".join(lines)
