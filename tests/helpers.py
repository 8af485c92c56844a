"""Shared test helpers: small diffusions and models, and comparison against printed reference values."""

import decimal

import numpy as np
import torch
import torch.nn.functional as F

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.respace import SpacedDiffusion, space_timesteps


def assert_matches_printed(value, printed):
    """`value` equals the decimal string `printed` (e.g. "0.170", "4.036e-5") as printed: within half a unit of
    its last digit, or within 1e-3 relative (docs/compatibility.md prints 0.0070150 as "0.00702")."""
    exponent = decimal.Decimal(printed).as_tuple().exponent
    tolerance = max(0.5 * 10.0**exponent * (1 + 1e-9), 1e-3 * abs(float(printed)))
    assert abs(value - float(printed)) <= tolerance, f"{value} does not match the printed {printed}"


def make_diffusion(
    steps=1000,
    schedule="linear",
    respacing="",
    learn_sigma=True,
    p2_gamma=0.0,
    p2_k=1.0,
    mean_type=gd.ModelMeanType.EPSILON,
    var_type=None,
    loss_type=gd.LossType.RESCALED_MSE,
):
    """A SpacedDiffusion as the factory would build it, with every knob reachable from tests."""
    if var_type is None:
        var_type = gd.ModelVarType.LEARNED_RANGE if learn_sigma else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, respacing),
        betas=gd.get_named_beta_schedule(schedule, steps),
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
        p2_gamma=p2_gamma,
        p2_k=p2_k,
    )


class OracleEpsModel(torch.nn.Module):
    """Returns the exact ε for data that is a single known point x0 (all mass at x0).

    The model receives original timesteps, so it uses the base process's ᾱ.
    """

    def __init__(self, x0, base_alphas_cumprod, learn_sigma=False):
        super().__init__()
        self.x0 = x0
        self.alphas_cumprod = torch.from_numpy(np.asarray(base_alphas_cumprod))
        self.learn_sigma = learn_sigma

    def forward(self, x_t, t):
        abar = self.alphas_cumprod[t.long()].float().view(-1, 1, 1, 1)
        eps = (x_t - abar.sqrt() * self.x0) / (1 - abar).sqrt()
        if self.learn_sigma:
            return torch.cat([eps, torch.zeros_like(eps)], dim=1)
        return eps


class StandInInception(torch.nn.Module):
    """Two random convolutions and a global average: [N, 3, 299, 299] in [-1, 1) -> [N, 16, 1, 1]."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 5, stride=4),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
        )

    def forward(self, img, return_features: bool = False):
        x = F.interpolate(img, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128)


def save_standin_inception(path):
    """Write StandInInception as TorchScript laid out like clean-fid's Inception file; returns `path`."""
    torch.jit.script(StandInInception().eval()).save(str(path))
    return str(path)
