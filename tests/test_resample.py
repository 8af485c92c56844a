"""Timestep samplers (docs/compatibility.md, "Training loop"): uniform, and the loss-second-moment sampler against
a plain re-statement of the reference's list-based history, with exact resume and no host reads."""

import numpy as np
import pytest
import torch

from guided_diffusion import resample
from guided_diffusion.resample import LossSecondMomentResampler, UniformSampler, create_named_schedule_sampler
from helpers import make_diffusion


class ListHistory:
    """The reference's bookkeeping, one loss at a time: the last `size` losses of each t, oldest dropped first;
    p_t ∝ √(mean of squares) mixed with 0.001 uniform once every t has `size` losses, uniform before."""

    def __init__(self, num_timesteps, size=10):
        self.rows = [[] for _ in range(num_timesteps)]
        self.size = size

    def add(self, ts, losses):
        for t, loss in zip(ts, losses):
            self.rows[t] = (self.rows[t] + [float(loss)])[-self.size:]

    def probabilities(self):
        if any(len(row) < self.size for row in self.rows):
            return np.full(len(self.rows), 1 / len(self.rows))
        weights = np.array([np.sqrt(np.mean(np.square(row))) for row in self.rows])
        return weights / weights.sum() * 0.999 + 0.001 / len(self.rows)


def _probabilities(sampler):
    weights = sampler.weights().numpy()
    return weights / weights.sum()


def test_uniform_sampler_draws_every_step_equally_often_with_unit_weights():
    torch.manual_seed(0)
    t, w = UniformSampler(make_diffusion(steps=100)).sample(50000, "cpu")
    assert t.dtype == torch.int64 and torch.equal(w, torch.ones(50000))
    counts = torch.bincount(t, minlength=100).numpy()
    assert len(counts) == 100 and counts.min() > 500 - 5 * 22 and counts.max() < 500 + 5 * 22  # 500 ± 5σ
    torch.manual_seed(0)
    assert torch.equal(UniformSampler(make_diffusion(steps=100)).sample(50000, "cpu")[0], t)  # torch's generator


def test_loss_second_moment_follows_the_reference_bookkeeping():
    """Updates with repeated timesteps, including more than 10 losses of one t in one update, give the same
    probabilities as the one-loss-at-a-time lists."""
    diffusion = make_diffusion(steps=100, respacing="20")
    sampler = create_named_schedule_sampler("loss-second-moment", diffusion)
    assert isinstance(sampler, LossSecondMomentResampler)
    reference = ListHistory(20)
    generator = torch.Generator().manual_seed(0)
    updates = [torch.arange(20).repeat(9), torch.tensor([3] * 25 + [5, 5])]
    updates += [torch.randint(0, 20, (size,), generator=generator) for size in [40] + [7] * 30]
    for step, ts in enumerate(updates):
        losses = torch.rand(len(ts), generator=generator, dtype=torch.float64) * (ts + 1)
        sampler.update_with_local_losses(ts, losses.float())
        reference.add(ts.tolist(), losses.float().tolist())
        np.testing.assert_allclose(_probabilities(sampler), reference.probabilities(), rtol=1e-12)
        if step == 0:  # 9 losses per t: still uniform
            np.testing.assert_array_equal(_probabilities(sampler), np.full(20, 0.05))
    assert not np.allclose(reference.probabilities(), 0.05)  # warmed up: larger t, larger losses, more draws


def test_loss_second_moment_draws_follow_p_with_unbiased_weights():
    sampler = LossSecondMomentResampler(make_diffusion(steps=50))
    for _ in range(10):
        ts = torch.arange(50)
        sampler.update_with_local_losses(ts, ts.double() + 1)
    p = _probabilities(sampler)
    assert p[49] > 10 * p[0]
    torch.manual_seed(0)
    t, weights = sampler.sample(200000, "cpu")
    frequencies = torch.bincount(t, minlength=50).numpy() / 200000
    np.testing.assert_allclose(frequencies, p, atol=5 * np.sqrt(p.max() / 200000))
    np.testing.assert_allclose(weights.numpy(), 1 / (50 * p[t.numpy()]), rtol=1e-6)
    assert weights.double().mean().item() == pytest.approx(1.0, abs=0.01)  # E[1/(T p_t)] = 1


def test_loss_second_moment_resumes_exactly():
    """A sampler restored from state_dict draws and updates exactly as the one it was saved from."""
    diffusion = make_diffusion(steps=30)
    straight = LossSecondMomentResampler(diffusion)
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        ts, losses = torch.randint(0, 30, (8,), generator=generator), torch.rand(8, generator=generator)
        straight.update_with_local_losses(ts, losses)
    resumed = LossSecondMomentResampler(diffusion)
    resumed.load_state_dict(straight.state_dict())
    for sampler in (straight, resumed):
        torch.manual_seed(2)
        draws = [sampler.sample(8, "cpu") for _ in range(3)]
        sampler.update_with_local_losses(draws[0][0], torch.arange(8.0))
        draws.append(sampler.sample(8, "cpu"))
        sampler.draws = torch.cat([torch.cat(pair) for pair in draws])
    assert torch.equal(straight.draws, resumed.draws)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="timestep_respacing"):
        LossSecondMomentResampler(make_diffusion(steps=40)).load_state_dict(straight.state_dict())


def test_loss_second_moment_loads_oldest_first_histories():
    """A state without "next_slot" (each row oldest first) continues by dropping the oldest losses."""
    sampler = LossSecondMomentResampler(make_diffusion(steps=30), history_per_term=3)
    history = torch.zeros(30, 3, dtype=torch.float64)
    history[4] = torch.tensor([1.0, 2.0, 3.0])
    history[6, 0] = 7.0
    counts = torch.zeros(30, dtype=torch.int64)
    counts[4], counts[6] = 3, 1
    sampler.load_state_dict({"loss_history": history, "loss_counts": counts})
    sampler.update_with_local_losses(torch.tensor([4, 6]), torch.tensor([10.0, 8.0]))
    assert sorted(sampler.state_dict()["loss_history"][4].tolist()) == [2.0, 3.0, 10.0]
    assert sampler.state_dict()["loss_history"][6].tolist() == [7.0, 8.0, 0.0]
    assert sampler.state_dict()["loss_counts"][[4, 6]].tolist() == [3, 2]


def test_no_value_is_read_back_to_the_host(monkeypatch):
    """sample() and update_with_local_losses() never turn a tensor into a Python value (a host sync on a GPU)."""
    samplers = [UniformSampler(make_diffusion(steps=30)), LossSecondMomentResampler(make_diffusion(steps=30))]
    for _ in range(10):
        samplers[1].update_with_local_losses(torch.arange(30), torch.rand(30))

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    for sampler in samplers:
        t, _ = sampler.sample(16, "cpu")
        if sampler is samplers[1]:
            sampler.update_with_local_losses(t, torch.rand(16))


def test_losses_of_all_ranks_are_gathered_rank_by_rank(monkeypatch):
    """With two ranks the history takes rank 0's losses, then rank 1's (a fake rank 1 sends the same t and
    ten times the losses)."""
    monkeypatch.setattr(resample.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(resample.dist, "get_world_size", lambda: 2)

    def all_gather(outputs, local):
        outputs[0].copy_(local)
        outputs[1].copy_(local if local.dtype == torch.int64 else local * 10)

    monkeypatch.setattr(resample.dist, "all_gather", all_gather)
    sampler = LossSecondMomentResampler(make_diffusion(steps=30), history_per_term=3)
    sampler.update_with_local_losses(torch.tensor([3, 3]), torch.tensor([1.0, 2.0]))
    # 1, 2, 10, 20 arrive in this order; the oldest falls out of the three slots.
    assert sorted(sampler.state_dict()["loss_history"][3].tolist()) == [2.0, 10.0, 20.0]


def test_unknown_sampler_name():
    with pytest.raises(ValueError, match="importance"):
        create_named_schedule_sampler("importance", make_diffusion(steps=30))
