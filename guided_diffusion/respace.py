"""Timestep respacing (docs/compatibility.md, "Respacing"): sample or train on a subset of the T steps of a base
diffusion."""

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """The set of original timesteps kept by a respacing spec, exactly as the reference computes it.

    :param num_timesteps: T of the base process.
    :param section_counts: "" (all steps); "ddimN" (the smallest stride i with len(range(0, T, i)) == N; never
        includes T-1); "N" or "a,b,c" (T split into equal sections, the first T mod n one step longer, each
        section strided by repeated float addition and rounded half-to-even); or a list of ints.
    :return: set of int timesteps in [0, T).
    """
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec == "":
            return set(range(num_timesteps))
        if spec.startswith("ddim"):
            return _ddim_timesteps(num_timesteps, spec)
        try:
            section_counts = [int(part) for part in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"--timestep_respacing {section_counts!r} is not understood; use '' (all steps), 'N', "
                "a comma list such as '130,60,60', or 'ddimN'"
            ) from None
    section_counts = list(section_counts)
    if not section_counts or any(c < 1 for c in section_counts):
        raise ValueError(f"--timestep_respacing needs positive step counts, got {section_counts}")
    if len(section_counts) > num_timesteps:
        raise ValueError(f"cannot split {num_timesteps} steps into {len(section_counts)} sections")

    size_per, extra = divmod(num_timesteps, len(section_counts))
    start = 0
    kept = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(
                f"--timestep_respacing: section {i} spans {size} steps and cannot take {count}; "
                f"use at most {size} steps there (T = {num_timesteps})"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Repeated float addition, not k*stride: the two round differently for 278 of the counts 1..1000 at
        # T = 1000, and the reference adds (docs/compatibility.md, "Respacing").
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)


def _ddim_timesteps(num_timesteps, spec):
    try:
        desired = int(spec[len("ddim"):])
    except ValueError:
        raise ValueError(f"--timestep_respacing {spec!r}: expected 'ddimN' with an integer N, e.g. ddim25") from None
    for stride in range(1, num_timesteps + 1):
        if len(range(0, num_timesteps, stride)) == desired:
            return set(range(0, num_timesteps, stride))
    raise ValueError(
        f"--timestep_respacing {spec}: no integer stride gives exactly {desired} steps out of {num_timesteps}; "
        "pick another N (e.g. one that divides T) or use the plain spacing '"
        f"{desired}'"
    )


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over a subset of a base process's timesteps.

    Betas are recomputed so that ᾱ at index j equals the base ᾱ at timestep_map[j]; the model is always called
    with the original timestep timestep_map[j] (scaled to 0..1000 when rescale_timesteps).

    :param use_timesteps: collection of original timesteps to keep.
    :param kwargs: GaussianDiffusion arguments of the base process (betas of all T steps, ...).
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        base_betas = np.asarray(kwargs["betas"], dtype=np.float64)
        self.original_num_steps = len(base_betas)
        if not self.use_timesteps or not all(0 <= t < self.original_num_steps for t in self.use_timesteps):
            raise ValueError(f"respaced timesteps must be a non-empty subset of [0, {self.original_num_steps})")

        base_alphas_cumprod = np.cumprod(1.0 - base_betas)
        self.timestep_map = sorted(self.use_timesteps)
        last_alpha_cumprod = 1.0
        new_betas = []
        for t in self.timestep_map:
            new_betas.append(1 - base_alphas_cumprod[t] / last_alpha_cumprod)
            last_alpha_cumprod = base_alphas_cumprod[t]
        kwargs["betas"] = np.array(new_betas)
        kwargs["alphas_cumprod"] = base_alphas_cumprod[self.timestep_map]
        super().__init__(**kwargs)
        self._map_tensors = {}

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self._timestep_map_on, self.rescale_timesteps, self.original_num_steps)

    def _timestep_map_on(self, device):
        table = self._map_tensors.get(device)
        if table is None:
            table = self._map_tensors[device] = torch.tensor(self.timestep_map, device=device, dtype=torch.long)
        return table

    def _scale_timesteps(self, t):
        # Scaling is done by the wrapped model, after mapping to original timesteps.
        return t


class _WrappedModel:
    """Calls `model` with original timesteps timestep_map[t] (× 1000/T_orig when rescaling)."""

    def __init__(self, model, timestep_map_on, rescale_timesteps, original_num_steps):
        self.model = model
        self.timestep_map_on = timestep_map_on
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps

    def __call__(self, x, ts, **kwargs):
        new_ts = self.timestep_map_on(ts.device)[ts]
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)
