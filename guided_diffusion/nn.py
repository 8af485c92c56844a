"""Small layers and helpers of ADM shared by the U-Net and the diffusion (ADM names)."""

import math

import torch
import torch.nn as nn
import torch.utils.checkpoint

from .fused import native_group_norm


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the input dtype, cast back afterwards; aten's kernel, as one opaque
    operator under torch.compile (fused.group_norm_op)."""

    def forward(self, x):
        return native_group_norm(x.float(), self.weight, self.bias, self.num_groups, self.eps)[0].type(x.dtype)


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
    """Sinusoidal timestep embeddings, cosine half first (ADM's layout; docs/compatibility.md, "U-Net and
    checkpoint layout"): [cos(t·f_i), sin(t·f_i)] with f_i = max_period^(-i/half), i = 0 .. half-1.

    :param timesteps: [N] float or int timesteps (raw values, not normalised).
    :param dim: embedding width (an odd width gets a zero last column).
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
