"""The ADM U-Net (Dhariwal & Nichol 2021) used by P2: AdaGN ResBlocks, BigGAN up/down blocks, multi-head attention.

Module names and parameter shapes equal the reference's (docs/compatibility.md, "U-Net and checkpoint layout"), so
released P2 / ADM / improved-diffusion state_dicts load with strict=True (state_dict_check explains one that does
not fit the flags). Images only (2-D): no flag of the reference selects its 1-D or 3-D variants.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fp16_util import convert_module_to_f16, convert_module_to_f32
from .fused import add_upsampled, group_norm_silu, per_channel, upsample_conv3x3
from .nn import checkpoint, normalization, timestep_embedding, zero_module


class TimestepBlock(nn.Module):
    """Marks modules whose forward(x, emb) also takes the [N, emb_channels] timestep (and class) embedding."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequence of layers; those that are TimestepBlocks also receive the embedding."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv (key `conv`) if `use_conv`. [N, C, H, W] -> [N, C, 2H, 2W]."""

    def __init__(self, channels, use_conv):
        super().__init__()
        self.use_conv = use_conv
        # Fold the upsampling into the conv (fused.upsample_conv3x3); speed_options may turn it off per layer.
        self.fold_upsample = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        if self.fold_upsample:
            return upsample_conv3x3(x, self.conv)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """A stride-2 3×3 conv if `use_conv`, else 2×2 average pooling (key `op`). [N, C, H, W] -> [N, C, H/2, W/2]."""

    def __init__(self, channels, use_conv):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the embedding (docs/compatibility.md, "U-Net and checkpoint layout").

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
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.up = up
        self.updown = up or down
        # Up blocks fold the upsampling into the first conv (fused.upsample_conv3x3); speed_options may turn it off.
        self.fold_upsample = up
        if up:
            self.h_upd = Upsample(channels, False)
            self.x_upd = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x, emb):
        """x: [N, C, H, W], emb: [N, emb_channels] -> [N, out_channels, H', W'] (resampled if up/down)."""
        return checkpoint(self._forward, (x, emb), self.use_checkpoint)

    def _forward(self, x, emb):
        in_norm, _, in_conv = self.in_layers
        h = group_norm_silu(x, in_norm)
        if self.fold_upsample:
            # x stays at its resolution: the skip path commutes with nearest upsampling, which the final sum
            # applies by broadcasting (add_upsampled).
            h = upsample_conv3x3(h, in_conv)
        elif self.updown:
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
        return add_upsampled(h, skip) if self.fold_upsample else skip + h


def upsampling_layers(model):
    """{name: layer} of the layers that upsample with a conv, each with a `fold_upsample` switch (fused.py)."""
    return {
        name: module
        for name, module in model.named_modules()
        if (isinstance(module, Upsample) and module.use_conv) or (isinstance(module, ResBlock) and module.up)
    }


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
    """Self-attention over the spatial positions, with a residual connection (docs/compatibility.md, "U-Net and
    checkpoint layout").

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
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

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


def build_encoder(in_channels, level_channels, num_res_blocks, attention_resolutions, resblock_updown, res_block,
                  attention):
    """The input blocks and middle block that UNetModel and the classifier (encoder_unet.EncoderUNetModel) share, made
    in the reference's order (which fixes the checkpoint keys and what a seeded initialisation draws).

    :param level_channels: channels of each level, e.g. [128, 256, 256] for channel_mult (1, 2, 2) at width 128.
    :param attention_resolutions: downsample rates ds after whose ResBlocks attention runs.
    :param res_block: callable(channels in, channels out, **{"down": True}) -> ResBlock.
    :param attention: callable(channels) -> AttentionBlock.
    :return: (input_blocks nn.ModuleList, middle_block, skip_channels [output channels of each input block],
        ds the downsample rate at the middle block).
    """
    ch = level_channels[0]
    input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
    skip_channels = [ch]
    ds = 1
    for level, level_ch in enumerate(level_channels):
        for _ in range(num_res_blocks):
            layers = [res_block(ch, level_ch)]
            ch = level_ch
            if ds in attention_resolutions:
                layers.append(attention(ch))
            input_blocks.append(TimestepEmbedSequential(*layers))
            skip_channels.append(ch)
        if level != len(level_channels) - 1:
            down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, use_conv=True)
            input_blocks.append(TimestepEmbedSequential(down))
            skip_channels.append(ch)
            ds *= 2
    middle_block = TimestepEmbedSequential(res_block(ch, ch), attention(ch), res_block(ch, ch))
    return input_blocks, middle_block, skip_channels, ds


class UNetModel(nn.Module):
    """The ADM U-Net with timestep (and optional class) conditioning. Constructor arguments as the reference's, less
    `dims` (images only) and `conv_resample` (no flag turns off the plain up/down blocks' learned 3×3 convs).

    :param image_size: pixels per side (informational; any input divisible by 2**(len(channel_mult) - 1) runs).
    :param in_channels: channels of x.
    :param model_channels: base channel count (the `num_channels` flag).
    :param out_channels: output channels (2× in_channels with learned variances).
    :param num_res_blocks: ResBlocks per level in the encoder (one more per level in the decoder).
    :param attention_resolutions: downsample rates ds (1, 2, 4, ...) after whose ResBlocks attention runs, e.g.
        (16,) at 256 px; () = attention in the middle block only (the middle block always has it).
    :param dropout: dropout rate in the ResBlocks.
    :param channel_mult: channel multiplier per level.
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
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.num_downsamples = len(channel_mult) - 1

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def res_block(channels, out, **updown):
            return ResBlock(
                channels,
                time_embed_dim,
                dropout,
                out_channels=out,
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

        self.input_blocks, self.middle_block, skip_channels, ds = build_encoder(
            in_channels, level_channels, num_res_blocks, self.attention_resolutions, resblock_updown, res_block,
            lambda channels: attention(channels, num_heads),
        )
        input_ch = level_channels[0]
        ch = level_channels[-1]

        self.output_blocks = nn.ModuleList([])
        for level, level_ch in reversed(list(enumerate(level_channels))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), level_ch)]
                ch = level_ch
                if ds in self.attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, use_conv=True))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(input_ch, out_channels, 3, padding=1))
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
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [N, {self.in_channels}, H, W]")
        multiple = 2**self.num_downsamples
        if any(size % multiple for size in x.shape[2:]):
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
