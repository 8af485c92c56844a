"""The reference code base (jychoi118/P2-weighting, or openai/guided-diffusion) imported beside ours, and its
timed steps.

Its package is also called `guided_diffusion` and its modules import each other relatively, so it is imported
under another name, `reference_guided_diffusion`: the two never mix in one process.
"""

import importlib
import importlib.util
import os
import sys
import tempfile

import torch

from guided_diffusion.script_util import model_and_diffusion_defaults

from .settings import model_flags, train_loop_arguments
from .steps import Countdown, synthetic_batch
from .timing import timed

REFERENCE_PACKAGE_NAME = "reference_guided_diffusion"


def find_reference_package(path):
    """The package folder of the reference code at `path`: a clone of jychoi118/P2-weighting or
    openai/guided-diffusion (holding guided_diffusion/), or such a package folder itself."""
    candidates = [path, os.path.join(path, "guided_diffusion"), os.path.join(path, "guided_diffusion_ref")]
    for candidate in candidates:
        if all(os.path.isfile(os.path.join(candidate, name)) for name in ("__init__.py", "train_util.py")):
            return candidate
    raise FileNotFoundError(
        f"--reference_path {path!r} holds no reference package (looked for __init__.py and train_util.py in "
        f"{', '.join(candidates)}); pass the folder of a clone of https://github.com/jychoi118/P2-weighting"
    )


def load_reference_package(path):
    """Import the reference package at `path` under the name `reference_guided_diffusion`.

    :return: {module name: module} for dist_util, logger, resample, script_util and train_util.
    """
    package_dir = find_reference_package(path)
    if REFERENCE_PACKAGE_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            REFERENCE_PACKAGE_NAME, os.path.join(package_dir, "__init__.py"), submodule_search_locations=[package_dir]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[REFERENCE_PACKAGE_NAME] = package
        spec.loader.exec_module(package)
    names = ("dist_util", "logger", "resample", "script_util", "train_util")
    return {name: importlib.import_module(f"{REFERENCE_PACKAGE_NAME}.{name}") for name in names}


class _Reference:
    """The reference's model and diffusion for `config` (flags it does not know, such as P2's on an ADM clone,
    are left out and listed in `dropped_flags`)."""

    def __init__(self, config, reference_path, seed, log_dir):
        self.modules = load_reference_package(reference_path)
        torch.manual_seed(seed)
        self.modules["dist_util"].setup_dist()
        self.modules["logger"].configure(dir=log_dir, format_strs=["log", "csv"])
        defaults = self.modules["script_util"].model_and_diffusion_defaults()
        flags = model_flags(config)
        ours = model_and_diffusion_defaults()
        self.dropped_flags = sorted(k for k in flags if k not in defaults and flags[k] != ours[k])
        defaults.update({k: v for k, v in flags.items() if k in defaults})
        self.model, self.diffusion = self.modules["script_util"].create_model_and_diffusion(**defaults)


class ReferenceTrainStep:
    """One `TrainLoop.run_step` of the reference, followed (untimed) by `run_loop`'s bookkeeping."""

    def __init__(self, config, device, seed, memory, reference_path):
        self._log_dir = tempfile.TemporaryDirectory(prefix="benchmark_reference_")
        reference = _Reference(config, reference_path, seed, self._log_dir.name)
        self.logger = reference.modules["logger"]
        reference.model.to(device)
        memory.set_baseline()
        self.loop = reference.modules["train_util"].TrainLoop(
            model=reference.model,
            diffusion=reference.diffusion,
            data=None,
            **train_loop_arguments(config),
            schedule_sampler=reference.modules["resample"].create_named_schedule_sampler(
                "uniform", reference.diffusion
            ),
        )
        self.batch = synthetic_batch(config, seed, config.batch_size)
        self.device = device
        self.dropped_flags = reference.dropped_flags

    def __call__(self):
        seconds = timed(lambda: self.loop.run_step(self.batch, {}), self.device)
        if self.loop.step % self.loop.log_interval == 0:
            self.logger.dumpkvs()
        self.loop.step += 1
        return seconds


class ReferenceSampleStep:
    """One reference `p_sample` under torch.no_grad(), as its p_sample_loop runs it."""

    def __init__(self, config, device, seed, memory, reference_path):
        self._log_dir = tempfile.TemporaryDirectory(prefix="benchmark_reference_")
        reference = _Reference(config, reference_path, seed, self._log_dir.name)
        self.model = reference.model.to(device).eval()
        memory.set_baseline()
        self.diffusion = reference.diffusion
        size = config.flags["image_size"]
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(config.sample_batch_size, 3, size, size, generator=generator).to(device)
        self.countdown = Countdown(self.diffusion.num_timesteps)
        self.device = device
        self.dropped_flags = reference.dropped_flags

    def _step(self):
        with torch.no_grad():
            t = self.countdown.next_t(self.x.shape[0], self.device)
            self.x = self.diffusion.p_sample(self.model, self.x, t, clip_denoised=True)["sample"]

    def __call__(self):
        return timed(self._step, self.device)
