"""Timestep samplers (COMPAT §7), including the loss-second-moment sampler on numpy 2."""

import numpy as np
import pytest
import torch

from guided_diffusion.resample import LossSecondMomentResampler, UniformSampler, create_named_schedule_sampler
from helpers import make_diffusion


def test_uniform_sampler():
    np.random.seed(0)
    t, w = UniformSampler(make_diffusion(steps=100)).sample(5000, "cpu")
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() < 100
    assert torch.equal(w, torch.ones(5000))


def test_loss_second_moment_runs_on_numpy2_and_weights_average_one():
    assert int(np.__version__.split(".")[0]) >= 2
    np.random.seed(0)
    diffusion = make_diffusion(steps=50)
    sampler = create_named_schedule_sampler("loss-second-moment", diffusion)
    assert isinstance(sampler, LossSecondMomentResampler)
    # Warm up: every t needs 10 losses; larger t gets larger losses.
    for _ in range(10):
        ts = torch.arange(50)
        sampler.update_with_local_losses(ts, ts.double() + 1)
    assert sampler._warmed_up()
    p = sampler.weights() / sampler.weights().sum()
    assert p[49] > p[0] * 10
    _, weights = sampler.sample(200000, "cpu")
    assert weights.double().mean().item() == pytest.approx(1.0, abs=0.01)


def test_loss_second_moment_state_round_trip():
    diffusion = make_diffusion(steps=40)
    a = LossSecondMomentResampler(diffusion)
    a.update_with_local_losses(torch.tensor([1, 2, 2]), torch.tensor([0.5, 1.0, 2.0]))
    b = LossSecondMomentResampler(diffusion)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.weights(), b.weights())
    np.testing.assert_array_equal(b._loss_counts[:3], [0, 1, 2])
    with pytest.raises(ValueError, match="timestep_respacing"):
        LossSecondMomentResampler(make_diffusion(steps=30)).load_state_dict(a.state_dict())


def test_unknown_sampler_name():
    with pytest.raises(ValueError, match="importance"):
        create_named_schedule_sampler("importance", make_diffusion(steps=30))
