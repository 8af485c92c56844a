"""guided_diffusion/nn.py: ADM's small layers and helpers against independent formulas."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from guided_diffusion.nn import GroupNorm32, checkpoint, mean_flat, normalization, timestep_embedding, zero_module


@pytest.mark.parametrize("dim", [8, 9])
def test_timestep_embedding_is_cosine_then_sine_of_geometric_frequencies(dim):
    timesteps = np.array([0, 1, 17, 999])
    half = dim // 2
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)  # 1 down to 1e4^(-(half-1)/half)
    args = timesteps[:, None] * freqs[None]
    expected = np.concatenate([np.cos(args), np.sin(args)] + ([np.zeros((4, 1))] if dim % 2 else []), axis=1)
    embedding = timestep_embedding(torch.tensor(timesteps), dim)
    assert embedding.shape == (4, dim) and embedding.dtype == torch.float32
    # float32 arguments t·f (t up to 999) carry ~1e-4 rad of rounding.
    np.testing.assert_allclose(embedding.numpy(), expected, rtol=0, atol=2e-4)


def test_group_norm32_computes_in_float32_and_returns_the_input_dtype():
    norm = normalization(64)
    assert isinstance(norm, GroupNorm32) and (norm.num_groups, norm.eps) == (32, 1e-5)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(64, generator=generator))
        norm.bias.copy_(torch.randn(64, generator=generator))
    x = (5 + torch.randn(2, 64, 4, 4, generator=generator)).bfloat16()
    out = norm(x)
    assert out.dtype == torch.bfloat16
    # Normalised in float32 and rounded once: what F.group_norm gives in float32, to one bf16 rounding step (a
    # norm computed in bf16 is off by several).
    expected = F.group_norm(x.float(), 32, norm.weight, norm.bias, 1e-5)
    torch.testing.assert_close(out.float(), expected, rtol=torch.finfo(torch.bfloat16).eps, atol=1e-6)


def test_zero_module_zeroes_every_parameter_in_place():
    conv = torch.nn.Conv2d(3, 4, 3)
    assert zero_module(conv) is conv
    assert all(torch.count_nonzero(p) == 0 for p in conv.parameters())
    assert all(p.requires_grad for p in conv.parameters())  # still trainable


def test_mean_flat_averages_all_but_the_batch_dimension():
    x = torch.arange(24.0).reshape(2, 3, 4)
    torch.testing.assert_close(mean_flat(x), torch.tensor([5.5, 17.5]))
    assert mean_flat(x[:, :, :1]).shape == (2,)


@pytest.mark.parametrize("enabled, grad", [(True, True), (False, True), (True, False)])
def test_checkpoint_recomputes_only_when_enabled_and_recording_gradients(enabled, grad, monkeypatch):
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *args, **kwargs: calls.append(kwargs) or original(*args, **kwargs)
    )
    weight = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(2, 3)
    with torch.set_grad_enabled(grad):
        out = checkpoint(lambda a: torch.tanh(a @ weight), (x,), enabled)
    torch.testing.assert_close(out, torch.tanh(x @ weight))
    assert calls == ([{"use_reentrant": False}] if enabled and grad else [])
    if grad:
        (got,) = torch.autograd.grad(out.sum(), weight)
        (want,) = torch.autograd.grad(torch.tanh(x @ weight).sum(), weight)
        torch.testing.assert_close(got, want)
