"""Tiny training runs shared by the training tests and the launched multi-rank scripts.

A 16 px, 32-channel, two-level U-Net with learned sigmas and T = 100 trains a step in about 0.1 s on one CPU
thread. Every run uses one torch thread so that results are bit-comparable between processes.
"""

import os

import numpy as np
import torch
from PIL import Image

from sample_tiny_model import TINY_MODEL_FLAGS

from guided_diffusion.checkpoint import state_dict_fingerprint
from guided_diffusion.logger import read_progress  # noqa: F401 (the tests import it from here with the fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository

TINY_TRAIN_FLAGS = dict(
    TINY_MODEL_FLAGS,
    diffusion_steps=100,
    learn_sigma=True,
    rescale_learned_sigmas=True,
    p2_gamma=1.0,
    batch_size=4,
    lr=1e-3,
    ema_rate="0.9,0.99",
    log_interval=2,
    save_interval=2,
    num_workers=0,
)


def train(data_dir, log_dir, **flags):
    """Run image_train.py in this process; returns the finished TrainLoop."""
    import image_train

    return image_train.main(train_argv(data_dir, str(log_dir), **flags))


def train_argv(data_dir, log_dir, **overrides):
    """image_train.py tokens for a tiny run on `data_dir` into `log_dir`."""
    tokens = []
    for key, value in {**TINY_TRAIN_FLAGS, "data_dir": data_dir, "log_dir": log_dir, **overrides}.items():
        tokens += [f"--{key}", str(value)]
    return tokens


def make_image_folder(folder, count=16, size=20, seed=0):
    """`count` random RGB PNGs of size x size pixels, two classes by name prefix ("a_", "b_")."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{'ab'[i % 2]}_{i:03d}.png"))
    return folder


def checkpoint_digests(log_dir, step, ema_rates=("0.9", "0.99")):
    """{file name: state_dict_fingerprint} of the reference files of checkpoint `step`."""
    names = [f"model{step:06d}.pt", f"opt{step:06d}.pt"] + [f"ema_{r}_{step:06d}.pt" for r in ema_rates]
    return {
        name: state_dict_fingerprint(torch.load(os.path.join(log_dir, name), map_location="cpu", weights_only=True))
        for name in names
    }

