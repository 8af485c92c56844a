"""Respacing reproduces the reference's step sets exactly (docs/compatibility.md, "Respacing")."""

import numpy as np
import pytest
import torch

from guided_diffusion.respace import space_timesteps
from helpers import make_diffusion

# docs/compatibility.md, "Respacing", verified outputs (T = 1000): spec, count, first steps, last steps.
VERIFIED = [
    ("250", 250, [0, 4, 8, 12, 16, 20], [987, 991, 995, 999]),
    ("100", 100, [0, 10, 20, 30], [969, 979, 989, 999]),
    ("50", 50, [0, 20, 41, 61, 82, 102], [938, 958, 979, 999]),
    ("25", 25, [0, 42, 83, 125, 166], [874, 916, 957, 999]),
    ("ddim25", 25, [0, 40, 80], [880, 920, 960]),
    ("ddim50", 50, [0, 20, 40], [940, 960, 980]),
    ("130,60,60", 250, [0, 3, 5, 8, 10, 13], [982, 988, 993, 999]),
]


@pytest.mark.parametrize("spec, count, first, last", VERIFIED)
def test_verified_step_sets(spec, count, first, last):
    steps = sorted(space_timesteps(1000, spec))
    assert len(steps) == count
    assert steps[: len(first)] == first
    assert steps[-len(last):] == last


def test_section_schedule_places_steps_per_section():
    steps = np.array(sorted(space_timesteps(1000, "130,60,60")))
    assert (steps < 334).sum() == 130
    assert ((steps >= 334) & (steps < 667)).sum() == 60
    assert (steps >= 667).sum() == 60


def test_repeated_addition_not_multiplication():
    """k*stride would change 278 of the sets N = 1..1000 (docs/compatibility.md, "Respacing"); ours follow
    repeated addition."""
    differing = 0
    for n in range(1, 1001):
        ours = space_timesteps(1000, str(n))
        assert len(ours) == n and min(ours) == 0 and max(ours) == 999 if n > 1 else ours == {0}
        stride = 999 / (n - 1) if n > 1 else 1
        differing += ours != {round(k * stride) for k in range(n)}
    assert differing == 278


def test_empty_spec_keeps_all_steps_and_ddim_never_includes_last():
    assert space_timesteps(1000, "") == set(range(1000))
    for n in (5, 10, 25, 50, 100):
        assert 999 not in space_timesteps(1000, f"ddim{n}")


@pytest.mark.parametrize(
    "spec, message",
    [("ddim600", "600 steps"), ("ddimx", "ddimN"), ("abc", "not understood"), ("400,400,400", "section 0"), ("0", "positive")],
)
def test_impossible_specs_fail_clearly(spec, message):
    with pytest.raises(ValueError, match=message):
        space_timesteps(1000, spec)


def test_respaced_betas_ddim5():
    diffusion = make_diffusion(respacing="ddim5")
    assert diffusion.timestep_map == [0, 200, 400, 600, 800]
    np.testing.assert_allclose(diffusion.betas, [1e-4, 0.3436, 0.7051, 0.8679, 0.9410], atol=5e-5)


@pytest.mark.parametrize("spec", ["250", "130,60,60", "ddim25", "7"])
def test_respaced_snr_equals_base_snr_at_mapped_steps(spec):
    base = make_diffusion(p2_gamma=1.0)
    spaced = make_diffusion(respacing=spec, p2_gamma=1.0)
    np.testing.assert_array_equal(spaced.snr, base.snr[spaced.timestep_map])
    np.testing.assert_array_equal(spaced.p2_weight, base.p2_weight[spaced.timestep_map])


def test_model_sees_original_timesteps():
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 6, *x.shape[2:])

    spaced = make_diffusion(respacing="ddim5")
    spaced.training_losses(model, torch.zeros(3, 3, 2, 2), torch.tensor([0, 2, 4]))
    assert seen[0].tolist() == [0, 400, 800]
