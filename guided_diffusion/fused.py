"""Fused forms of U-Net layers: the same maths as ADM's layers with fewer passes over memory or less work.

- `group_norm_op`: aten's GroupNorm as one opaque operator under torch.compile.
- `group_norm_silu`: GroupNorm -> AdaGN scale/shift -> SiLU as one autograd function that keeps only its input
  for the backward pass.
- `upsample_conv3x3` and `add_upsampled`: nearest ×2 upsampling folded into the following 3×3 conv (one stride-2
  transposed conv) and into a skip sum, without building the upsampled tensor.

Each equals the step-by-step layers up to float rounding (tests/test_speed_equivalence.py).
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def per_channel(values, ndim):
    """[N, C] -> [N, C, 1, ...] broadcasting over the spatial dimensions of an ndim-D activation."""
    return values.view(*values.shape, *([1] * (ndim - 2)))


# --- GroupNorm by aten's kernels ---


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
# element-wise code, which on a CPU runs slower than aten's kernels, worst in the backward pass and for groups of
# few channels (measure with scripts/benchmark.py --settings eager,compile).
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


def native_group_norm(x, weight, bias, groups, eps):
    """(GN(x), mean, rstd) by aten's kernel: called directly in eager mode, through group_norm_op when compiling."""
    return (group_norm_op if torch.compiler.is_compiling() else _aten_group_norm)(x, weight, bias, groups, eps)


def _native_group_norm_backward(grad, x, mean, rstd, weight):
    """Gradients of x, weight, bias of GN, by aten's kernel (through group_norm_backward_op when compiling)."""
    backward = group_norm_backward_op if torch.compiler.is_compiling() else _aten_group_norm_backward
    return backward(grad, x, mean, rstd, weight, mean.shape[1])


# --- GroupNorm -> AdaGN -> SiLU ---


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


def _group_norm_silu_forward(x, weight, bias, scale, shift, groups, eps):
    """(SiLU(GN(x)·(1 + scale) + shift) in x's dtype, mean, rstd), computed in fp32 step by step."""
    normalized, mean, rstd = native_group_norm(x.float(), weight, bias, groups, eps)
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


# --- Nearest ×2 upsampling folded into what follows it ---


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
    larger upsampled input (4/9), for the same linear map (float sums in another order). Whether that is faster
    depends on the device's conv kernels (speed_options chooses per layer on a CPU).

    :param x: [N, C, H, W].
    :param conv: an nn.Conv2d(C, O, 3, padding=1).
    :return: [N, O, 2H, 2W].
    """
    kernel = _fold_taps(_fold_taps(conv.weight, dim=2), dim=3)  # [O, C, 4, 4]
    return F.conv_transpose2d(x, kernel.transpose(0, 1), conv.bias, stride=2, padding=1)


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
