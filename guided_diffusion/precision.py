"""Network precisions shared by training, sampling and the benchmark: fp32, or bf16 / fp16 autocast.

The weights stay fp32 in every precision; only the network's arithmetic runs in the lower precision, under
torch.autocast (the U-Net returns the dtype of its input x).
"""

import contextlib

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(precision, device_type):
    """The context a network runs in at `precision`: nothing for fp32, torch.autocast for bf16 / fp16."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def network_at_precision(model, precision, device):
    """The model itself for fp32; otherwise a callable running it under autocast (the U-Net returns x's dtype)."""
    if PRECISIONS[precision] is None:
        return model

    def network(x, t, **kwargs):
        with autocast_for(precision, torch.device(device).type):
            return model(x, t, **kwargs)

    return network


def sampling_autograd_mode():
    """The autograd state of sample generation: inference mode, which records no graph and, unlike no_grad,
    also skips version counting and view tracking (the sampling loops need no gradients; classifier guidance's
    `cond_fn` leaves inference mode for its own: classifier_guidance.py)."""
    return torch.inference_mode()
