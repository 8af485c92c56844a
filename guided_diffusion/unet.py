"""The ADM U-Net (Dhariwal & Nichol 2021) used by P2: AdaGN ResBlocks, BigGAN up/down blocks, multi-head attention.

Module names and parameter shapes equal the reference's (COMPAT §6), so released P2 / ADM / improved-diffusion
state_dicts load with strict=True; `load_state_dict_checked` explains a checkpoint that does not fit the flags.
"""

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fp16_util import convert_module_to_f16, convert_module_to_f32
from .nn import (
    avg_pool_nd, checkpoint, conv_nd, group_norm_silu, linear, normalization, per_channel, timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """Marks modules whose forward(x, emb) also takes the [N, emb_channels] timestep (and class) embedding."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequence of layers; those that are TimestepBlocks also receive the embedding."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


def _resample_factor(dims):
    # 3D signals (e.g. video) are resampled in the inner two dimensions only, as in the reference.
    return (1, 2, 2) if dims == 3 else 2


# Smallest input side (px) at which the folded form of "nearest ×2, then 3×3 conv" is used. Measured on a CPU
# (oneDNN, batch 16, 128 channels, forward+backward): 1.9× faster from 16 px up, even at 8 px, and 1.8× slower
# at 4 px, where the transposed conv's fixed cost outweighs the work it saves.
FOLD_MIN_SIDE = 16


def _fold_taps(weight, dim):
    """Taps (w0, w1, w2) of a 3-tap kernel along `dim` -> the 4 taps (w2, w1+w2, w0+w1, w0) of the stride-2
    transposed kernel that equals nearest ×2 upsampling followed by the 3-tap kernel."""
    w0, w1, w2 = weight.unbind(dim)
    return torch.stack([w2, w1 + w2, w0 + w1, w0], dim=dim)


def upsample_conv3x3(x, conv):
    """conv(nearest ×2 upsampling of x) for a 2-D 3×3 conv with stride 1 and padding 1, without the upsampled input.

    Along each axis, output 2i reads x[i-1] through tap w0 and x[i] through w1 + w2; output 2i+1 reads x[i] through
    w0 + w1 and x[i+1] through w2. That is a transposed conv with stride 2, padding 1 and the 4-tap kernel
    (w2, w1+w2, w0+w1, w0) per axis: 16 multiply-adds per input pixel against the 36 of the 3×3 conv over the 4×
    larger upsampled input (4/9), for the same linear map (float sums in another order).

    :param x: [N, C, H, W].
    :param conv: an nn.Conv2d(C, O, 3, padding=1).
    :return: [N, O, 2H, 2W].
    """
    kernel = _fold_taps(_fold_taps(conv.weight, dim=2), dim=3)  # [O, C, 4, 4]
    return F.conv_transpose2d(x, kernel.transpose(0, 1), conv.bias, stride=2, padding=1)


def fold_pays(x):
    """Whether the folded upsample conv is the faster form for the [N, C, H, W] input x (FOLD_MIN_SIDE)."""
    return min(x.shape[-2:]) >= FOLD_MIN_SIDE


class _AddUpsampled(torch.autograd.Function):
    """h + (nearest ×2 upsampling of x): [N, C, 2H, 2W] + [N, C, H, W], without building the upsampled tensor.

    The gradient of x is the sum over each 2×2 block, taken by 2×2 average pooling times 4 (exact: powers of
    two), a kernel that is fast in both memory layouts, where autograd's broadcast reduction is slow in NHWC.
    """

    @staticmethod
    def forward(h, x):
        height, width = x.shape[2:]
        pairs = h.unflatten(3, (width, 2)).unflatten(2, (height, 2))  # [N, C, H, 2, W, 2], a view
        return (pairs + x[:, :, :, None, :, None]).flatten(4, 5).flatten(2, 3)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, F.avg_pool2d(grad, 2) * 4


def add_upsampled(h, x):
    """h + (nearest ×2 upsampling of x) for h [N, C, 2H, 2W] and x [N, C, H, W] (see _AddUpsampled)."""
    return _AddUpsampled.apply(h, x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv (key `conv`) if `use_conv`. [N, C, H, W] -> [N, C, 2H, 2W]."""

    def __init__(self, channels, use_conv, dims=2):
        super().__init__()
        self.scale_factor = _resample_factor(dims)
        self.use_conv = use_conv
        # 2-D: the upsampling is folded into the conv (upsample_conv3x3).
        self.fold_upsample = use_conv and dims == 2
        if use_conv:
            self.conv = conv_nd(dims, channels, channels, 3, padding=1)

    def forward(self, x):
        if self.fold_upsample and fold_pays(x):
            return upsample_conv3x3(x, self.conv)
        x = F.interpolate(x, scale_factor=self.scale_factor, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """A stride-2 3×3 conv if `use_conv`, else 2×2 average pooling (key `op`). [N, C, H, W] -> [N, C, H/2, W/2]."""

    def __init__(self, channels, use_conv, dims=2):
        super().__init__()
        stride = _resample_factor(dims)
        if use_conv:
            self.op = conv_nd(dims, channels, channels, 3, stride=stride, padding=1)
        else:
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the embedding (COMPAT §6 "ResBlock").

    With `use_scale_shift_norm` (AdaGN) the embedding gives (scale, shift), scale first, and the block computes
    GN(h)·(1 + scale) + shift; otherwise the embedding is added to h. `up` / `down` make it a BigGAN resampling
    block: the features and the skip path are resampled parameter-free (h_upd, x_upd) before the first conv.

    :param channels: input channels C.
    :param emb_channels: width of the embedding.
    :param dropout: dropout rate before the last conv.
    :param out_channels: output channels (default C); a 1×1 conv adapts the skip path when they differ.
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        dims=2,
        use_checkpoint=False,
        use_scale_shift_norm=False,
        up=False,
        down=False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        # Up blocks of 2-D signals fold the upsampling into the first conv (upsample_conv3x3).
        self.fold_upsample = up and dims == 2
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else conv_nd(dims, channels, out_channels, 1)
        )

    def forward(self, x, emb):
        """x: [N, C, ...], emb: [N, emb_channels] -> [N, out_channels, ...] (resampled if up/down)."""
        return checkpoint(self._forward, (x, emb), self.use_checkpoint)

    def _forward(self, x, emb):
        in_norm, _, in_conv = self.in_layers
        h = group_norm_silu(x, in_norm)
        upsample_skip = False
        if self.updown:
            upsample_skip = self.fold_upsample and fold_pays(h)
            if upsample_skip:
                # x stays at its resolution: the skip path commutes with nearest upsampling, which the final
                # sum applies by broadcasting (add_upsampled).
                h = upsample_conv3x3(h, in_conv)
            else:
                h = in_conv(self.h_upd(h))
                x = self.x_upd(x)
        else:
            h = in_conv(h)
        emb_out = self.emb_layers(emb).type(h.dtype)
        out_norm, _, out_dropout, out_conv = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = group_norm_silu(h, out_norm, scale, shift)
        else:
            h = group_norm_silu(h + per_channel(emb_out, h.ndim), out_norm)
        h = out_conv(out_dropout(h))
        skip = self.skip_connection(x)
        return add_upsampled(h, skip) if upsample_skip else skip + h


def qkv_attention(qkv, num_heads, new_order=False):
    """Multi-head scaled dot-product attention, softmax(q kᵀ/√d) v, over token-major qkv features.

    :param qkv: [N, T, 3·H·d] — per token the reference's qkv conv output channels, laid out per head
        [q_h, k_h, v_h] (legacy, head-major) or, with `new_order`, as [Q_all, K_all, V_all].
    :param num_heads: H.
    :return: [N, T, H·d], heads concatenated in head order.
    """
    n, tokens, width = qkv.shape
    head_channels = width // (3 * num_heads)
    if new_order:
        q, k, v = qkv.view(n, tokens, 3, num_heads, head_channels).permute(2, 0, 3, 1, 4)
    else:
        q, k, v = qkv.view(n, tokens, num_heads, 3, head_channels).permute(3, 0, 2, 1, 4)
    # Each of q, k, v is [N, H, T, d] with d contiguous, the layout the fused SDPA kernels read without a copy.
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(n, tokens, num_heads * head_channels)


class AttentionBlock(nn.Module):
    """Self-attention over the spatial positions, with a residual connection (COMPAT §6 "AttentionBlock").

    GN -> qkv (Conv1d C -> 3C, kernel 1) -> attention -> proj_out (zero-initialised Conv1d C -> C) -> + x.
    Heads: channels / num_head_channels if num_head_channels != -1, else num_heads.
    """

    def __init__(
        self, channels, num_heads=1, num_head_channels=-1, use_checkpoint=False, use_new_attention_order=False
    ):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(
                    f"attention over {channels} channels cannot use num_head_channels={num_head_channels} "
                    "(it must divide every attention layer's channel count); change --num_head_channels"
                )
            num_heads = channels // num_head_channels
        if channels % num_heads:
            raise ValueError(
                f"attention over {channels} channels cannot be split into num_heads={num_heads} heads; "
                "change --num_heads / --num_heads_upsample"
            )
        self.channels = channels
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.use_new_attention_order = use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        """x: [N, C, ...] -> [N, C, ...]."""
        return checkpoint(self._forward, (x,), self.use_checkpoint)

    def _forward(self, x):
        spatial = x.shape[2:]
        # The kernel-1 convs are applied as linear maps over token-major features [N, T, C], which hands the
        # attention contiguous heads; the parameters keep the reference's Conv1d shapes. With channels_last
        # inputs the token-major features are a view, in and out.
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        qkv = F.linear(tokens, self.qkv.weight.squeeze(-1), self.qkv.bias)
        h = qkv_attention(qkv, self.num_heads, self.use_new_attention_order)
        h = F.linear(h, self.proj_out.weight.squeeze(-1), self.proj_out.bias)
        return x + h.transpose(1, 2).unflatten(2, spatial)


class UNetModel(nn.Module):
    """The ADM U-Net with timestep (and optional class) conditioning. Constructor arguments as the reference's.

    :param image_size: pixels per side (informational; any input divisible by 2**(len(channel_mult) - 1) runs).
    :param in_channels: channels of x.
    :param model_channels: base channel count (the `num_channels` flag).
    :param out_channels: output channels (2× in_channels with learned variances).
    :param num_res_blocks: ResBlocks per level in the encoder (one more per level in the decoder).
    :param attention_resolutions: downsample rates ds (1, 2, 4, ...) after whose ResBlocks attention runs, e.g.
        (16,) at 256 px; () = attention in the middle block only (the middle block always has it).
    :param dropout: dropout rate in the ResBlocks.
    :param channel_mult: channel multiplier per level.
    :param conv_resample: learned 3×3 convs in the plain up/down blocks (else parameter-free resampling).
    :param dims: 1, 2 or 3 for 1D, 2D or 3D signals.
    :param num_classes: number of classes for class-conditional models, else None.
    :param use_checkpoint: gradient checkpointing in every ResBlock and AttentionBlock (less memory, more compute).
    :param use_fp16: run the blocks in float16 after convert_to_fp16() (GroupNorm stays float32).
    :param num_heads: attention heads when num_head_channels == -1.
    :param num_head_channels: fixed channels per head (overrides num_heads) when != -1.
    :param num_heads_upsample: heads in the decoder's attention; -1 = num_heads.
    :param use_scale_shift_norm: AdaGN conditioning in the ResBlocks.
    :param resblock_updown: BigGAN ResBlocks for up/downsampling instead of plain resamplers.
    :param use_new_attention_order: qkv channel layout [Q, K, V] instead of the legacy per-head [q, k, v].
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        level_channels = [int(mult * model_channels) for mult in channel_mult]
        if not level_channels or any(ch <= 0 or ch % 32 for ch in level_channels):
            raise ValueError(
                f"num_channels={model_channels} with channel_mult={tuple(channel_mult)} gives level widths "
                f"{level_channels}; each must be a positive multiple of 32 (GroupNorm uses 32 groups)"
            )
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.dims = dims
        self.num_downsamples = len(channel_mult) - 1

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def res_block(channels, out, **updown):
            return ResBlock(
                channels,
                time_embed_dim,
                dropout,
                out_channels=out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                **updown,
            )

        def attention(channels, heads):
            return AttentionBlock(
                channels,
                num_heads=heads,
                num_head_channels=num_head_channels,
                use_checkpoint=use_checkpoint,
                use_new_attention_order=use_new_attention_order,
            )

        ch = input_ch = level_channels[0]
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = 1
        for level, level_ch in enumerate(level_channels):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, level_ch)]
                ch = level_ch
                if ds in self.attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != self.num_downsamples:
                down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res_block(ch, ch), attention(ch, num_heads), res_block(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, level_ch in reversed(list(enumerate(level_channels))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), level_ch)]
                ch = level_ch
                if ds in self.attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, dims))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1))
        )

    def _blocks(self):
        return (self.input_blocks, self.middle_block, self.output_blocks)

    def convert_to_fp16(self):
        """Cast the convolutions of the input, middle and output blocks to float16 (the reference's use_fp16)."""
        for blocks in self._blocks():
            blocks.apply(convert_module_to_f16)
        self.dtype = torch.float16

    def convert_to_fp32(self):
        """Undo convert_to_fp16."""
        for blocks in self._blocks():
            blocks.apply(convert_module_to_f32)
        self.dtype = torch.float32

    def forward(self, x, timesteps, y=None):
        """Predict the model output for noisy images.

        :param x: [N, in_channels, H, W] inputs; H and W divisible by 2**(len(channel_mult) - 1).
        :param timesteps: [N] timesteps (raw values, as the diffusion passes them).
        :param y: [N] int64 class labels, required exactly when the model is class-conditional.
        :return: [N, out_channels, H, W] in x's dtype. Under autocast the blocks run in the autocast dtype while
            the embedding MLP and the output head stay in float32.
        """
        self._check_inputs(x, timesteps, y)
        with torch.autocast(device_type=x.device.type, enabled=False):
            time_embed_dtype = self.time_embed[0].weight.dtype
            emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(time_embed_dtype))
            if self.num_classes is not None:
                emb = emb + self.label_emb(y)

        skips = []
        h = x.type(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        with torch.autocast(device_type=x.device.type, enabled=False):
            out_norm, _, out_conv = self.out
            return out_conv(group_norm_silu(h.type(x.dtype), out_norm))

    def _check_inputs(self, x, timesteps, y):
        # Shape and dtype checks only: nothing here waits for the device.
        if x.ndim != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x has shape {tuple(x.shape)}; expected [N, {self.in_channels}] + {self.dims} spatial dimensions"
            )
        multiple = 2**self.num_downsamples
        resampled = x.shape[-2:] if self.dims == 3 else x.shape[2:]
        if any(size % multiple for size in resampled):
            raise ValueError(
                f"x has spatial size {tuple(x.shape[2:])}; the {self.num_downsamples} downsamplings of "
                f"channel_mult={self.channel_mult} need multiples of {multiple}"
            )
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"timesteps has shape {tuple(timesteps.shape)}; expected [N] = [{x.shape[0]}]")
        if (y is None) != (self.num_classes is None):
            raise ValueError(
                "class labels y are required by a class-conditional model (class_cond True) and refused otherwise; "
                f"this model has num_classes={self.num_classes} and got y={'None' if y is None else 'a tensor'}"
            )
        if y is not None and y.shape != (x.shape[0],):
            raise ValueError(f"y has shape {tuple(y.shape)}; expected [N] = [{x.shape[0]}] class indices")
        if self.input_blocks[0][0].weight.dtype != self.dtype:
            raise RuntimeError(
                f"the model expects {self.dtype} blocks but holds {self.input_blocks[0][0].weight.dtype} weights; "
                "with use_fp16, call model.convert_to_fp16() once the model is built"
            )


def apply_speed_options(model, compile=False, channels_last=False):
    """Make `model` run faster in place, keeping its parameters, state_dict keys and (within float rounding) outputs.

    :param compile: compile the forward pass with torch.compile (Module.compile, so that state_dict keys and
        checkpoints stay unprefixed); the first call of each input shape and autograd mode compiles.
    :param channels_last: store the 4-D conv weights in NHWC order; convolutions then run their NHWC kernels and
        hand NHWC activations on (inputs and outputs keep their [N, C, H, W] shape).
    :return: `model`.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()
    return model


class CheckpointMismatchError(ValueError):
    """A state_dict whose keys or shapes do not fit the U-Net built from the current flags."""


def load_state_dict_checked(model, state_dict, source_name):
    """Load a U-Net state_dict with strict=True, explaining any mismatch by the flag that would cause it.

    Parameter shapes cannot reveal the number of attention heads (num_heads / num_head_channels): a
    checkpoint trained with other heads loads and gives different outputs, so those flags must match by hand.

    :param model: a UNetModel.
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
        raise CheckpointMismatchError(_format_mismatches(source_name, mismatches))
    model.load_state_dict(state_dict, strict=True)


_EXAMPLES_PER_KIND = 2
# input_blocks.3.0.in_layers.0.weight -> block "input_blocks.3", layer 0, part "in_layers"
_BLOCK_KEY = re.compile(r"^(input_blocks\.\d+|output_blocks\.\d+|middle_block)\.(\d+)\.(\w+)")
_RESBLOCK_PARTS = {"in_layers", "emb_layers", "out_layers", "skip_connection"}
_CHANNELS_CAUSE = "check --num_channels / --channel_mult: channel counts differ"
_UNKNOWN_CAUSE = "no flag explains these keys: is the file a P2 / ADM / improved-diffusion U-Net checkpoint?"


def describe_mismatches(expected, found):
    """Compare parameter shapes of the model (`expected`) and a checkpoint (`found`), both {key: shape tuple}.

    :return: list of (cause naming the flag to check, key, kind of difference, what differs); empty when the
        checkpoint fits. Kinds: "missing", "unexpected", "misshaped", "structure".
    """
    if found and all(key.startswith("module.") for key in found):
        cause = "keys carry a 'module.' prefix (saved from a DistributedDataParallel wrapper): strip it"
        return [(cause, next(iter(found)), "structure", "prefixed key")]
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
        cause = _cause(key, model_shape, file_shape, expected, found, *layouts)
        mismatches.append((cause, key, *_difference(model_shape, file_shape)))
    return mismatches


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


def _format_mismatches(source_name, mismatches):
    # Per cause, a few keys of each kind (missing, unexpected, misshaped), so both sides of a swap show.
    examples = {}
    for cause, key, kind, difference in mismatches:
        examples.setdefault(cause, {}).setdefault(kind, []).append(f"{key}: {difference}")
    lines = [f"{source_name} does not fit the U-Net built from the current flags:"]
    for cause, by_kind in examples.items():
        lines.append(f"  {cause}")
        for entries in by_kind.values():
            lines.extend(f"    {entry}" for entry in entries[:_EXAMPLES_PER_KIND])
            if len(entries) > _EXAMPLES_PER_KIND:
                lines.append(f"    ... and {len(entries) - _EXAMPLES_PER_KIND} more like it")
    return "\n".join(lines)
