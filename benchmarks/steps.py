"""The timed steps of this code base, built inside a worker process: one training step, one sampling step.

Each step is a callable returning the wall seconds of one step; its constructor builds the model, marks the
memory baseline (`PeakMemory.set_baseline`) once the model is on its device, then applies the setting.
"""

import itertools
import tempfile

import torch

from guided_diffusion.logger import Logger
from guided_diffusion.precision import network_at_precision, sampling_autograd_mode
from guided_diffusion.sampling import PerSampleGenerator
from guided_diffusion.script_util import create_model_and_diffusion
from guided_diffusion.speed_options import applied_speed_options, apply_speed_options
from guided_diffusion.train_util import TrainLoop, seed_everything

from .settings import model_flags, train_loop_arguments
from .timing import timed


def synthetic_batch(config, seed, batch_size):
    """Images in [-1, 1], float32 [batch_size, 3, S, S], the same for every setting of one run."""
    size = config.flags["image_size"]
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1


class Countdown:
    """Timesteps T-1, T-2, ..., 0, T-1, ... for consecutive sampling steps."""

    def __init__(self, num_timesteps):
        self.num_timesteps = num_timesteps
        self.index = num_timesteps - 1

    def next_t(self, batch_size, device):
        """The next timestep for every image: int64 [batch_size] on `device`."""
        t = torch.full((batch_size,), self.index, device=device, dtype=torch.long)
        self.index = self.index - 1 if self.index > 0 else self.num_timesteps - 1
        return t


def _build_model(config, setting, device, seed, memory, training):
    """Our model and diffusion for `config`, the model on `device` with the speed options of `setting` ("auto" ones
    measured for the training or the sampling step, as image_train.py and image_sample.py do); the memory baseline is
    taken once the model is on its device, before the options change it. Also what the options left on the model
    (speed_options.applied_speed_options), which the report records per setting."""
    seed_everything(seed)
    model, diffusion = create_model_and_diffusion(**model_flags(config, setting))
    model.to(device)
    memory.set_baseline()
    batch_size = config.batch_size if training else config.sample_batch_size
    apply_speed_options(model, compile=setting.compile, channels_last=setting.channels_last,
                        fold_upsample=setting.fold_upsample, device=device, batch_size=batch_size, training=training,
                        log=lambda line: None)
    return model, diffusion, applied_speed_options(model)


class OurTrainStep:
    """One `TrainLoop.run_step` of this code base, with the speed options of `setting`."""

    def __init__(self, config, setting, device, seed, memory):
        model, diffusion, self.applied = _build_model(config, setting, device, seed, memory, training=True)
        self._log_dir = tempfile.TemporaryDirectory(prefix="benchmark_train_")
        self.loop = TrainLoop(
            model=model,
            diffusion=diffusion,
            data=itertools.repeat((synthetic_batch(config, seed, config.batch_size), {})),
            **train_loop_arguments(config),
            log_dir=self._log_dir.name,
            precision=setting.precision,
            logger=Logger(self._log_dir.name, enabled=False),
            progress=False,
        )
        self.device = device

    def __call__(self):
        batch, cond = next(self.loop.data)
        seconds = timed(lambda: self.loop.run_step(batch, cond), self.device)
        if self.loop.step % self.loop.log_interval == 0:
            self.loop.log_step()
        return seconds


class OurSampleStep:
    """One ancestral `p_sample` of this code base as `generate_batch` runs it (autograd mode, precision, noise)."""

    def __init__(self, config, setting, device, seed, memory):
        model, self.diffusion, self.applied = _build_model(config, setting, device, seed, memory, training=False)
        model.eval()
        self.network = network_at_precision(model, setting.precision, device)
        batch_size = config.sample_batch_size
        self.noise = PerSampleGenerator(seed, range(batch_size), device)
        self.x = self.noise.randn((batch_size, 3, config.flags["image_size"], config.flags["image_size"]))
        self.countdown = Countdown(self.diffusion.num_timesteps)
        self.device = device

    def _step(self):
        with sampling_autograd_mode():
            t = self.countdown.next_t(self.x.shape[0], self.device)
            out = self.diffusion.p_sample(self.network, self.x, t, clip_denoised=True, noise_fn=self.noise.randn_like)
        self.x = out["sample"]

    def __call__(self):
        return timed(self._step, self.device)
