"""Small layers and helpers shared by the U-Net and the diffusion (ADM names)."""

import math

import torch
import torch.nn as nn
import torch.utils.checkpoint


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the input dtype, cast back afterwards."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def conv_nd(dims, *args, **kwargs):
    """A 1D, 2D or 3D convolution module."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims} (expected 1, 2 or 3)")


def linear(*args, **kwargs):
    """A linear module."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """A 1D, 2D or 3D average pooling module."""
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims} (expected 1, 2 or 3)")


def zero_module(module):
    """Zero the parameters of `module` in place and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def normalization(channels):
    """The ADM normalisation layer: GroupNorm with 32 groups, eps 1e-5, in fp32."""
    return GroupNorm32(32, channels)


def mean_flat(tensor):
    """Mean over every dimension but the batch: [N, ...] -> [N]."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal timestep embeddings, cosine half first (ADM / COMPAT §6).

    :param timesteps: [N] float or int timesteps (raw values, not normalised).
    :param dim: embedding width.
    :param max_period: the lowest frequency is 1/max_period.
    :return: [N, dim] float32 embeddings.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def checkpoint(function, inputs, enabled):
    """Run `function(*inputs)`, recomputing its activations in the backward pass when `enabled`.

    Trades compute for memory (gradients are unchanged). Only while gradients are being recorded; the
    non-reentrant form keeps autocast state and dropout's random stream identical in the recomputation.
    """
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(function, *inputs, use_reentrant=False)
    return function(*inputs)
