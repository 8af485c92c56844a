"""Timestep samplers for training: uniform, and importance sampling by the loss's second moment
(docs/compatibility.md, "Training loop").

Host syncs: none during training steps. Both samplers keep their state on the training device and draw t with that
device's global torch generator (the torch RNG state the training checkpoint saves and restores, so an exact resume
draws the same t), and neither reads a value back to the host in `sample` or `update_with_local_losses`. Only
`state_dict()` (at checkpoint saves) copies the loss history to the host.
"""

from abc import ABC, abstractmethod

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
    """A distribution p_t over the T timesteps; weighting each loss by 1/(T p_t) keeps the objective unbiased."""

    def __init__(self, diffusion):
        self.diffusion = diffusion
        self.num_timesteps = diffusion.num_timesteps

    @abstractmethod
    def weights(self, device=None):
        """[T] float64 tensor of non-negative weights, proportional to the sampling probabilities."""

    def sample(self, batch_size, device):
        """Draw timesteps by inverting the CDF of p at uniform draws of `device`'s generator.

        :return: (timesteps [N] int64, importance weights 1/(T p_t) [N] float32), both on `device`.
        """
        probabilities = self.weights(device)
        probabilities = probabilities / probabilities.sum()
        cdf = probabilities.cumsum(0)
        draws = torch.rand(batch_size, dtype=torch.float64, device=device) * cdf[-1]
        # right=True: t is the first index whose CDF exceeds the draw, so a zero-probability t is never drawn.
        timesteps = torch.searchsorted(cdf, draws, right=True).clamp_(max=self.num_timesteps - 1)
        return timesteps, (1 / (self.num_timesteps * probabilities[timesteps])).float()

    def state_dict(self):
        """What an exact resume needs (nothing for stateless samplers)."""
        return {}

    def load_state_dict(self, state):
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but a state with keys {sorted(state)} was given")


class UniformSampler(ScheduleSampler):
    """t ~ U{0, ..., T-1} with importance weight 1."""

    def weights(self, device=None):
        return torch.ones(self.num_timesteps, dtype=torch.float64, device=device)

    def sample(self, batch_size, device):
        timesteps = torch.randint(0, self.num_timesteps, (batch_size,), device=device)
        return timesteps, torch.ones(batch_size, device=device)


class LossAwareSampler(ScheduleSampler):
    def update_with_local_losses(self, local_ts, local_losses):
        """Feed this rank's per-sample losses; with several ranks the losses of all ranks are gathered (rank 0's
        first), so every rank keeps the same history. Every rank must pass the same number of losses, as the
        training loop's equal microbatches do.

        :param local_ts: [N] int64 timesteps of this rank's batch, on the training device.
        :param local_losses: [N] float per-sample losses, same device.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self.update_with_all_losses(local_ts, local_losses)
            return
        world = dist.get_world_size()
        all_ts = [torch.empty_like(local_ts) for _ in range(world)]
        all_losses = [torch.empty_like(local_losses) for _ in range(world)]
        dist.all_gather(all_ts, local_ts.contiguous())
        dist.all_gather(all_losses, local_losses.contiguous())
        self.update_with_all_losses(torch.cat(all_ts), torch.cat(all_losses))

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """Update the reweighting from the losses of every rank: [N] int64 timesteps and [N] float losses on one
        device, oldest first."""


class LossSecondMomentResampler(LossAwareSampler):
    """p_t ∝ √(mean of the last `history_per_term` squared losses of t), mixed with a uniform floor:
    p_t (1 - uniform_prob) + uniform_prob/T. Uniform until every t has a full history.

    The history is a ring buffer per t on the training device: the k-th new loss of t goes to slot
    (next_slot[t] + k) mod H, which holds the oldest loss once the row is full, so an update is a handful of
    scatter operations. Its second moment does not depend on where in the row a loss sits.
    """

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        super().__init__(diffusion)
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        # [T * H] history slots, row-major, plus one spare slot for the losses that one update pushes through a
        # row entirely (more than H new losses of one t).
        self._slots = torch.zeros(self.num_timesteps * history_per_term + 1, dtype=torch.float64)
        self._loss_counts = torch.zeros(self.num_timesteps, dtype=torch.int64)
        self._next_slot = torch.zeros(self.num_timesteps, dtype=torch.int64)

    @property
    def _loss_history(self):
        """[T, H] float64 view of the ring buffers."""
        return self._slots[:-1].view(self.num_timesteps, self.history_per_term)

    def weights(self, device=None):
        self._move_to(device)
        second_moment = self._loss_history.square().mean(dim=-1).sqrt()
        mixed = second_moment / second_moment.sum() * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        warmed_up = (self._loss_counts == self.history_per_term).all()
        return torch.where(warmed_up, mixed, torch.ones_like(mixed))

    def update_with_all_losses(self, ts, losses):
        if len(ts) == 0:
            return
        self._move_to(ts.device)
        size, history = self.num_timesteps, self.history_per_term
        ts = ts.long()
        # occurrence[i]: how many earlier entries of this update share t[i] (a stable sort groups them in order).
        sorted_ts, order = torch.sort(ts, stable=True)
        position = torch.arange(len(ts), device=ts.device)
        group_start = torch.ones_like(ts, dtype=torch.bool)
        group_start[1:] = sorted_ts[1:] != sorted_ts[:-1]
        first_of_group = torch.cummax(torch.where(group_start, position, 0), dim=0).values
        occurrence = torch.empty_like(position).scatter_(0, order, position - first_of_group)
        new_counts = torch.zeros_like(self._loss_counts).index_add_(0, ts, torch.ones_like(ts))

        slot = ts * history + (self._next_slot[ts] + occurrence) % history
        survives = occurrence >= new_counts[ts] - history  # only the newest H losses of a t stay in its row
        slot = torch.where(survives, slot, size * history)
        self._slots[slot] = losses.detach().to(torch.float64)
        self._next_slot = (self._next_slot + new_counts) % history
        self._loss_counts = (self._loss_counts + new_counts).clamp_(max=history)

    def _move_to(self, device):
        if device is not None:
            self._slots, self._loss_counts, self._next_slot = (
                tensor.to(device) for tensor in (self._slots, self._loss_counts, self._next_slot)
            )

    def state_dict(self):
        return {
            "loss_history": self._loss_history.cpu().clone(),
            "loss_counts": self._loss_counts.cpu().clone(),
            "next_slot": self._next_slot.cpu().clone(),
        }

    def load_state_dict(self, state):
        history = torch.as_tensor(state["loss_history"], dtype=torch.float64)
        if history.shape != self._loss_history.shape:
            raise ValueError(
                f"loss-second-moment history has shape {tuple(history.shape)}, expected "
                f"{tuple(self._loss_history.shape)} (a different --diffusion_steps or --timestep_respacing?)"
            )
        device = self._slots.device
        counts = torch.as_tensor(state["loss_counts"], dtype=torch.int64)
        # A state without "next_slot" holds each row oldest first, so the next write goes after the last loss.
        next_slot = torch.as_tensor(state.get("next_slot", counts % self.history_per_term), dtype=torch.int64)
        self._slots = torch.cat([history.reshape(-1), history.new_zeros(1)]).to(device)
        self._loss_counts, self._next_slot = counts.to(device).clone(), next_slot.to(device).clone()
