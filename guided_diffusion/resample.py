"""Timestep samplers for training (COMPAT §7): uniform, and importance sampling by the loss's second moment."""

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.distributed as dist


def create_named_schedule_sampler(name, diffusion):
    """A ScheduleSampler by its flag name: "uniform" or "loss-second-moment"."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ValueError(f"--schedule_sampler {name!r} is unknown; use 'uniform' or 'loss-second-moment'")


class ScheduleSampler(ABC):
    """A distribution over timesteps used to reduce the variance of the training objective.

    Sampling t with probability p_t and weighting the loss by 1/(T p_t) keeps the objective unbiased.
    """

    @abstractmethod
    def weights(self):
        """[T] float64 non-negative weights, proportional to the sampling probabilities."""

    def sample(self, batch_size, device):
        """Draw timesteps with importance weights.

        :return: (timesteps [N] int64, weights [N] float32), both on `device`.
        """
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = torch.from_numpy(indices_np).long().to(device)
        weights = torch.from_numpy(1 / (len(p) * p[indices_np])).float().to(device)
        return indices, weights

    def state_dict(self):
        """What an exact resume needs (nothing for stateless samplers)."""
        return {}

    def load_state_dict(self, state):
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but a state with keys {sorted(state)} was given")


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        return self._weights


class LossAwareSampler(ScheduleSampler):
    def update_with_local_losses(self, local_ts, local_losses):
        """Feed this rank's per-sample losses; histories are gathered from every rank so all stay in sync.

        :param local_ts: [N] int timesteps of this rank's batch.
        :param local_losses: [N] float per-sample losses.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self.update_with_all_losses(local_ts.tolist(), local_losses.tolist())
            return
        world = dist.get_world_size()
        device = local_ts.device
        batch_sizes = [torch.tensor([0], dtype=torch.int32, device=device) for _ in range(world)]
        dist.all_gather(batch_sizes, torch.tensor([len(local_ts)], dtype=torch.int32, device=device))
        batch_sizes = [int(x.item()) for x in batch_sizes]
        max_bs = max(batch_sizes)

        # all_gather needs equal shapes: pad to the largest batch, then trim.
        timestep_batches = [torch.zeros(max_bs, dtype=local_ts.dtype, device=device) for _ in batch_sizes]
        loss_batches = [torch.zeros(max_bs, dtype=local_losses.dtype, device=device) for _ in batch_sizes]
        dist.all_gather(timestep_batches, _pad(local_ts, max_bs))
        dist.all_gather(loss_batches, _pad(local_losses, max_bs))
        timesteps = [int(x) for y, bs in zip(timestep_batches, batch_sizes) for x in y[:bs].tolist()]
        losses = [float(x) for y, bs in zip(loss_batches, batch_sizes) for x in y[:bs].tolist()]
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """Update the reweighting from the losses of every rank (lists of int timesteps and float losses)."""


def _pad(tensor, size):
    out = torch.zeros(size, dtype=tensor.dtype, device=tensor.device)
    out[: len(tensor)] = tensor
    return out


class LossSecondMomentResampler(LossAwareSampler):
    """p_t ∝ sqrt(E[loss_t²]) over the last `history_per_term` losses of each t, mixed with a uniform floor."""

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                # Drop the oldest loss term.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return bool((self._loss_counts == self.history_per_term).all())

    def state_dict(self):
        return {
            "loss_history": torch.from_numpy(self._loss_history.copy()),
            "loss_counts": torch.from_numpy(self._loss_counts.copy()),
        }

    def load_state_dict(self, state):
        history = np.asarray(state["loss_history"], dtype=np.float64)
        if history.shape != self._loss_history.shape:
            raise ValueError(
                f"loss-second-moment history has shape {history.shape}, expected {self._loss_history.shape} "
                "(a different --diffusion_steps or --timestep_respacing?)"
            )
        self._loss_history = history.copy()
        self._loss_counts = np.asarray(state["loss_counts"], dtype=np.int64).copy()
