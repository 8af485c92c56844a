"""Small layers and helpers shared by the U-Net and the diffusion (ADM names)."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor


def _dense_format(x):
    """The memory format x is dense in (channels_last for NHWC 4-D tensors), as aten's group norm kernels use."""
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _spatial_size(x):
    return x.numel() // (x.shape[0] * x.shape[1])


def _aten_group_norm(x, weight, bias, groups, eps):
    """aten.native_group_norm: (normalised x [N, C, ...], mean [N, groups], 1/std [N, groups])."""
    x = x.contiguous(memory_format=_dense_format(x))
    return torch.native_group_norm(x, weight, bias, x.shape[0], x.shape[1], _spatial_size(x), groups, eps)


def _aten_group_norm_backward(grad, x, mean, rstd, weight, groups):
    """aten.native_group_norm_backward: gradients of x, weight and bias."""
    memory_format = _dense_format(x)
    x, grad = x.contiguous(memory_format=memory_format), grad.contiguous(memory_format=memory_format)
    return torch.ops.aten.native_group_norm_backward(
        grad, x, mean, rstd, weight, x.shape[0], x.shape[1], _spatial_size(x), groups, [True, True, True]
    )


# GroupNorm as one opaque operator for torch.compile. Inductor otherwise decomposes it into reductions and
# element-wise code, which on a CPU ran several times slower than aten's kernels, worst in the backward and for
# groups of 6 channels (tiny32 benchmark, 2 threads: a compiled training step took 945 ms against 830 ms eager,
# 780 ms with this operator; a compiled channels_last sampling step 232 ms, 213 ms with it).
@torch.library.custom_op("guided_diffusion::group_norm", mutates_args=())
def group_norm_op(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """_aten_group_norm as one operator."""
    return _aten_group_norm(x, weight, bias, groups, eps)


@group_norm_op.register_fake
def _(x, weight, bias, groups, eps):
    statistics = x.new_empty(x.shape[0], groups)
    return torch.empty_like(x, memory_format=_dense_format(x)), statistics, torch.empty_like(statistics)


@torch.library.custom_op("guided_diffusion::group_norm_backward", mutates_args=())
def group_norm_backward_op(
    grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, groups: int
) -> tuple[Tensor, Tensor, Tensor]:
    """_aten_group_norm_backward as one operator."""
    return _aten_group_norm_backward(grad, x, mean, rstd, weight, groups)


@group_norm_backward_op.register_fake
def _(grad, x, mean, rstd, weight, groups):
    return torch.empty_like(x, memory_format=_dense_format(x)), torch.empty_like(weight), torch.empty_like(weight)


def _group_norm_setup_context(ctx, inputs, output):
    x, weight, _, groups, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight)
    ctx.groups = groups


def _group_norm_backward(ctx, grad, _grad_mean, _grad_rstd):
    x, mean, rstd, weight = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = group_norm_backward_op(grad, x, mean, rstd, weight, ctx.groups)
    return grad_x, grad_weight, grad_bias, None, None


group_norm_op.register_autograd(_group_norm_backward, setup_context=_group_norm_setup_context)


def per_channel(values, ndim):
    """[N, C] -> [N, C, 1, ...] broadcasting over the spatial dimensions of an ndim-D activation."""
    return values.view(*values.shape, *([1] * (ndim - 2)))


def _norm_coefficients(weight, bias, mean, rstd):
    """Per-(sample, channel) a, b [N, C] with GN(x) = a·x + b, from the group statistics mean, rstd [N, groups]."""
    n, groups = mean.shape
    a = (rstd.unsqueeze(-1) * weight.view(groups, -1)).view(n, -1)
    return a, bias - (mean.unsqueeze(-1) * a.view(n, groups, -1)).view(n, -1)


def _pre_activation(x32, norm_a, norm_b, scale, shift):
    """GN(x)·(1 + scale) + shift (or GN(x)) from GN's coefficients (_norm_coefficients), in one pass over x."""
    if scale is not None:
        norm_a, norm_b = norm_a * (1 + scale), torch.addcmul(shift, norm_b, 1 + scale)
    return torch.addcmul(per_channel(norm_b, x32.ndim), x32, per_channel(norm_a, x32.ndim))


def _native_group_norm(x, weight, bias, groups, eps):
    """(GN(x), mean, rstd) by aten's kernel: called directly in eager mode, through group_norm_op when compiling."""
    return (group_norm_op if torch.compiler.is_compiling() else _aten_group_norm)(x, weight, bias, groups, eps)


def _native_group_norm_backward(grad, x, mean, rstd, weight):
    """Gradients of x, weight, bias of GN, by aten's kernel (through group_norm_backward_op when compiling)."""
    backward = group_norm_backward_op if torch.compiler.is_compiling() else _aten_group_norm_backward
    return backward(grad, x, mean, rstd, weight, mean.shape[1])


def _group_norm_silu_forward(x, weight, bias, scale, shift, groups, eps):
    """(SiLU(GN(x)·(1 + scale) + shift) in x's dtype, mean, rstd), computed in fp32 step by step."""
    normalized, mean, rstd = _native_group_norm(x.float(), weight, bias, groups, eps)
    if scale is not None:
        normalized = torch.addcmul(per_channel(shift, x.ndim), normalized, per_channel(1 + scale, x.ndim))
    return F.silu(normalized, inplace=True).to(x.dtype), mean, rstd


class _GroupNormSiLU(torch.autograd.Function):
    """SiLU(GN(x)·(1 + scale) + shift) in fp32 that keeps only x (and [N, C]-sized values) for the backward pass.

    Done step by step, autograd keeps three activations per call (x for the norm, GN(x) for the scale gradient,
    the SiLU input); here the backward pass recomputes the SiLU input from x in one pass (a·x + b per channel)
    and takes the scale gradient from sums over x, so the two other activations are freed after the forward.
    """

    forward = staticmethod(_group_norm_silu_forward)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, scale, shift, _, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        x32 = x.float()
        norm_a, norm_b = _norm_coefficients(weight, bias, mean, rstd)
        grad_pre = torch.ops.aten.silu_backward(grad_out.float(), _pre_activation(x32, norm_a, norm_b, scale, shift))
        grad_scale = grad_shift = None
        grad_norm = grad_pre
        if scale is not None:
            spatial = tuple(range(2, x.ndim))
            sum_grad = grad_pre.sum(spatial)
            # sum(grad_pre · GN(x)) per (sample, channel), with GN(x) = norm_a·x + norm_b.
            grad_scale = (norm_a * (grad_pre * x32).sum(spatial) + norm_b * sum_grad).to(scale.dtype)
            grad_shift = sum_grad.to(shift.dtype)
            grad_norm = grad_pre * per_channel(1 + scale, x.ndim)
        grad_x, grad_weight, grad_bias = _native_group_norm_backward(grad_norm, x32, mean, rstd, weight)
        return grad_x.to(x.dtype), grad_weight, grad_bias, grad_scale, grad_shift, None, None


def group_norm_silu(x, norm, scale=None, shift=None):
    """SiLU(norm(x)·(1 + scale) + shift), or SiLU(norm(x)) without scale and shift, keeping less for backward.

    :param x: [N, C, ...] activation (any float dtype; computed in fp32, returned in x's dtype).
    :param norm: the GroupNorm32 layer whose weight, bias, groups and eps apply.
    :param scale, shift: [N, C] AdaGN modulation from the timestep embedding, or None.
    :return: [N, C, ...] in x's dtype.
    """
    inputs = (x, norm.weight, norm.bias, scale, shift, norm.num_groups, norm.eps)
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in inputs):
        return _GroupNormSiLU.apply(*inputs)[0]
    return _group_norm_silu_forward(*inputs)[0]  # nothing to differentiate: no autograd bookkeeping


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the input dtype, cast back afterwards; aten's kernel, as one opaque
    operator under torch.compile (group_norm_op)."""

    def forward(self, x):
        return _native_group_norm(x.float(), self.weight, self.bias, self.num_groups, self.eps)[0].type(x.dtype)


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
