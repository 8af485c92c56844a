"""A tiny random ADM U-Net checkpoint and the image_sample flags that fit it (shared by the sampling tests and the
scripts they launch)."""

import torch

from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

# 16 px, 32 channels (GroupNorm needs multiples of 32), two levels, attention at 8 px; T = 50 keeps sampling
# fast on a CPU.
TINY_MODEL_FLAGS = dict(
    image_size=16,
    num_channels=32,
    channel_mult="1,2",
    num_res_blocks=1,
    attention_resolutions="8",
    num_heads=2,
    diffusion_steps=50,
)


def tiny_flags(**overrides):
    """Command-line tokens of TINY_MODEL_FLAGS updated by `overrides`."""
    tokens = []
    for key, value in {**TINY_MODEL_FLAGS, **overrides}.items():
        tokens += [f"--{key}", str(value)]
    return tokens


def tiny_model_and_diffusion(**overrides):
    return create_model_and_diffusion(**{**model_and_diffusion_defaults(), **TINY_MODEL_FLAGS, **overrides})


def perturb_(model, seed=0, scale=0.1):
    """Add seeded Gaussian noise to every parameter: a fresh ADM U-Net outputs zeros (zero-initialised head)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model


def save_tiny_checkpoint(path, seed=0, **overrides):
    """Save a perturbed tiny U-Net as a plain state_dict, the reference's checkpoint layout (model*.pt)."""
    model, _ = tiny_model_and_diffusion(**overrides)
    torch.save(perturb_(model, seed).state_dict(), path)
    return path
