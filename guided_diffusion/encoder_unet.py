"""The noisy-image classifier of classifier guidance (ADM's EncoderUNetModel): the U-Net's timestep-conditioned
encoder and middle block, then a pooling head that maps the features to class logits.

Module names and parameter shapes equal the reference's, so the released ADM classifiers (64, 128, 256 and 512 px)
load with strict=True. The encoder reuses the U-Net's blocks (unet.py); there are no class labels in the embedding.

Heads (`pool`), with C the middle block's channels and K = out_channels:
    adaptive     GN -> SiLU -> global average -> zero-initialised 1x1 conv C -> K (key out.3)
    attention    GN -> SiLU -> AttentionPool2d: attention of the mean token over all positions (key out.2)
    spatial      spatial means of every encoder block's output and the middle block's, concatenated (F features)
                 -> Linear F -> 2048 -> ReLU -> Linear 2048 -> K
    spatial_v2   as spatial, with GN -> SiLU in place of the ReLU
"""

import torch
import torch.nn.functional as F
from torch import nn

from .fp16_util import convert_module_to_f16, convert_module_to_f32
from .nn import normalization, timestep_embedding, zero_module
from .unet import AttentionBlock, ResBlock, build_encoder

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")
SPATIAL_HIDDEN = 2048  # width of the spatial heads' hidden layer (the reference's)


class AttentionPool2d(nn.Module):
    """Pool [N, C, S, S] features into [N, out_channels] by multi-head attention (CLIP's pooling, as ADM uses it).

    The tokens are the spatial mean followed by the S² positions, each plus a learned positional embedding
    (`positional_embedding` [C, S² + 1]); qkv_proj (Conv1d C -> 3C, kernel 1, [Q, K, V] channel layout) feeds
    attention with C / head_channels heads, c_proj (Conv1d C -> out_channels) maps its output, and the output at the
    mean token is returned.
    """

    def __init__(self, spatial_size, channels, head_channels, out_channels):
        super().__init__()
        if channels % head_channels:
            raise ValueError(
                f"the attention pool over {channels} channels cannot use heads of {head_channels} channels "
                "(it must divide the last level's channel count)"
            )
        self.spatial_size = spatial_size
        self.num_heads = channels // head_channels
        self.positional_embedding = nn.Parameter(torch.randn(channels, spatial_size**2 + 1) / channels**0.5)
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_channels, 1)

    def forward(self, x):
        """x: [N, C, S, S] -> [N, out_channels]."""
        if tuple(x.shape[2:]) != (self.spatial_size, self.spatial_size):
            raise ValueError(
                f"the attention pool was built for {self.spatial_size}x{self.spatial_size} features, got "
                f"{tuple(x.shape[2:])}: the classifier only takes images of its --image_size"
            )
        features = x.flatten(2)
        tokens = torch.cat([features.mean(dim=2, keepdim=True), features], dim=2)
        tokens = (tokens + self.positional_embedding.to(tokens.dtype)).transpose(1, 2)  # [N, T, C]
        qkv = F.linear(tokens, self.qkv_proj.weight.squeeze(-1), self.qkv_proj.bias)
        n, length, width = qkv.shape
        head_channels = width // (3 * self.num_heads)
        q, k, v = qkv.view(n, length, 3, self.num_heads, head_channels).permute(2, 0, 3, 1, 4)  # [N, H, T, d]
        # Only the mean token's output is kept, so only its query is attended with.
        pooled = F.scaled_dot_product_attention(q[:, :, :1], k, v).reshape(n, self.num_heads * head_channels)
        return F.linear(pooled, self.c_proj.weight.squeeze(-1), self.c_proj.bias)


class EncoderUNetModel(nn.Module):
    """The half U-Net classifier: p(y | x_t) as logits. Constructor arguments as the reference's, less `dims` (images
    only) and `conv_resample` (the plain downsamplers always have their 3x3 conv); see UNetModel for the shared ones.

    :param image_size: pixels per side; the attention pool only takes this size.
    :param model_channels: base channel count (the `classifier_width` flag).
    :param out_channels: number of classes K.
    :param num_res_blocks: ResBlocks per level (the `classifier_depth` flag).
    :param attention_resolutions: downsample rates ds after whose ResBlocks attention runs.
    :param pool: the head, one of POOLS (see the module docstring).
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
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        pool="adaptive",
    ):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"--classifier_pool {pool!r} is not one of {', '.join(POOLS)}")
        if pool == "attention" and num_head_channels == -1:
            raise ValueError("the attention pool needs num_head_channels (channels per head), not -1")
        widths = [int(mult * model_channels) for mult in channel_mult]
        if not widths or any(width <= 0 or width % 32 for width in widths):
            raise ValueError(
                f"classifier_width={model_channels} with channel_mult={tuple(channel_mult)} gives level widths "
                f"{widths}; each must be a positive multiple of 32 (GroupNorm uses 32 groups)"
            )
        del num_heads_upsample  # a reference argument without a decoder to apply to
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.pool = pool
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.num_downsamples = len(widths) - 1

        emb_channels = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
        )
        block_options = {"use_checkpoint": use_checkpoint, "use_scale_shift_norm": use_scale_shift_norm}
        attention_options = {
            "num_heads": num_heads,
            "num_head_channels": num_head_channels,
            "use_checkpoint": use_checkpoint,
            "use_new_attention_order": use_new_attention_order,
        }

        def res_block(channels, out, **updown):
            return ResBlock(channels, emb_channels, dropout, out_channels=out, **updown, **block_options)

        self.input_blocks, self.middle_block, feature_widths, rate = build_encoder(
            in_channels, widths, num_res_blocks, self.attention_resolutions, resblock_updown, res_block,
            lambda channels: AttentionBlock(channels, **attention_options),
        )
        channels = widths[-1]
        self.out = self._head(pool, channels, sum(feature_widths) + channels, image_size // rate, num_head_channels)

    def _head(self, pool, channels, spatial_features, final_size, num_head_channels):
        if pool == "adaptive":
            return nn.Sequential(
                normalization(channels),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(nn.Conv2d(channels, self.out_channels, 1)),
                nn.Flatten(),
            )
        if pool == "attention":
            return nn.Sequential(
                normalization(channels),
                nn.SiLU(),
                AttentionPool2d(final_size, channels, num_head_channels, self.out_channels),
            )
        hidden = [nn.ReLU()] if pool == "spatial" else [normalization(SPATIAL_HIDDEN), nn.SiLU()]
        return nn.Sequential(
            nn.Linear(spatial_features, SPATIAL_HIDDEN), *hidden, nn.Linear(SPATIAL_HIDDEN, self.out_channels)
        )

    def convert_to_fp16(self):
        """Cast the convolutions of the encoder and middle block to float16 (the reference's classifier_use_fp16)."""
        for blocks in (self.input_blocks, self.middle_block):
            blocks.apply(convert_module_to_f16)
        self.dtype = torch.float16

    def convert_to_fp32(self):
        """Undo convert_to_fp16."""
        for blocks in (self.input_blocks, self.middle_block):
            blocks.apply(convert_module_to_f32)
        self.dtype = torch.float32

    def forward(self, x, timesteps):
        """Class logits of noisy images.

        :param x: [N, in_channels, H, W] x_t; H = W = image_size for the attention pool, else multiples of
            2**(len(channel_mult) - 1).
        :param timesteps: [N] timesteps (raw values, as the diffusion passes them).
        :return: [N, out_channels] logits in x's dtype; the head runs in x's dtype (float32 for float32 inputs).
        """
        self._check_inputs(x, timesteps)
        with torch.autocast(device_type=x.device.type, enabled=False):
            features = timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype)
            emb = self.time_embed(features)
        spatial = self.pool.startswith("spatial")
        means = []
        h = x.type(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            if spatial:
                means.append(h.type(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb).type(x.dtype)
        if spatial:
            means.append(h.mean(dim=(2, 3)))
            return self.out(torch.cat(means, dim=-1))
        return self.out(h)

    def _check_inputs(self, x, timesteps):
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
