"""A tiny noisy-image classifier, a two-class image set it can learn, and classifier_train.py runs (shared by the
classifier tests and the scripts they launch)."""

import os

import numpy as np
from PIL import Image
from sample_tiny_model import TINY_MODEL_FLAGS

from guided_diffusion.classifier_util import classifier_defaults, create_classifier

# 16 px with every feature of the released classifiers (attention pool, BigGAN downsampling, AdaGN): two levels of
# 32 and 64 channels, attention at 8 px over 64 channels (one 64-channel head).
TINY_CLASSIFIER_FLAGS = {
    **classifier_defaults(),
    "image_size": 16,
    "classifier_width": 32,
    "classifier_depth": 1,
    "classifier_channel_mult": "1,2",
    "classifier_attention_resolutions": "8",
}

# classifier_train.py flags of a tiny run: the tiny classifier on the tiny diffusion's process (T = 50).
TINY_CLASSIFIER_TRAIN_FLAGS = {
    **{key: value for key, value in TINY_CLASSIFIER_FLAGS.items() if key != "classifier_use_fp16"},
    "diffusion_steps": TINY_MODEL_FLAGS["diffusion_steps"],
    "batch_size": 4,
    "lr": 1e-3,
    "log_interval": 2,
    "eval_interval": 2,
    "save_interval": 4,
    "num_workers": 0,
}


def tiny_classifier(**overrides):
    return create_classifier(**{**TINY_CLASSIFIER_FLAGS, **overrides})


def flag_tokens(flags):
    """--key value tokens of a flag dict."""
    tokens = []
    for key, value in flags.items():
        tokens += [f"--{key}", str(value)]
    return tokens


def classifier_train_argv(data_dir, log_dir, **overrides):
    """classifier_train.py tokens for a tiny run on `data_dir` into `log_dir`."""
    return flag_tokens({**TINY_CLASSIFIER_TRAIN_FLAGS, "data_dir": data_dir, "log_dir": log_dir, **overrides})


def make_two_class_folder(folder, count=16, size=20, seed=0):
    """`count` RGB PNGs of two classes a classifier learns in a few steps: "bright_" images (pixels near 200) and
    "dark_" ones (near 50), each with uniform noise of ±40."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        name, level = (("bright", 200), ("dark", 50))[i % 2]
        pixels = np.clip(level + rng.integers(-40, 41, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{name}_{i:03d}.png"))
    return folder
