"""Speed benchmark of one training step and one sampling step, ours against the reference (issue 8).

What is timed, per setting:
- train: one `TrainLoop.run_step` on a fixed synthetic batch, exactly the code `image_train.py` runs: timestep
  draw, P2 loss forward and backward, AdamW, EMA update. As in `run_loop`, the log row is written every
  `log_interval` steps, outside the timed region (the reference's `logger.dumpkvs()` likewise).
- sample: one `diffusion.p_sample` on a batch, in the autograd mode and at the precision `generate_batch` uses,
  with per-sample noise generators; its output feeds the next step, t counting down from T-1.

Every (setting, step) runs in its own worker process, so that compiled code, allocator caches and peak memory
of one setting never leak into another. Workers take turns, one step each (A, B, A, B, ... with the order
reversed every other round), so that a change in machine load hits every setting alike; each worker waits
blocked on its pipe while another runs. A setting is a "+"-joined set of options (`eager` alone is the plain
path): `compile`, `channels_last`, `bf16`; `reference` is the original ADM/P2 code from `--reference_path`.

Memory: on CUDA, `torch.cuda.max_memory_allocated`; on a CPU, the peak resident set size (VmHWM of
/proc/self/status, reset through /proc/self/clear_refs after the warm-up), where `resource.ru_maxrss` (peak
since the process started) stands in when that reset is not allowed. Both are reported as the increase over the
level after imports and model build, so they count optimizer state, EMA copies, activations and workspace.
"""

import contextlib
import importlib
import importlib.util
import itertools
import multiprocessing
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from .logger import Logger
from .respace import space_timesteps
from .sampling import PerSampleGenerator, network_at_precision, sampling_autograd_mode
from .script_util import create_model_and_diffusion, model_and_diffusion_defaults
from .train_util import TrainLoop, seed_everything
from .unet import apply_speed_options

PHASES = ("train", "sample")
REFERENCE_SETTING = "reference"
EAGER_SETTING = "eager"
SETTING_OPTIONS = ("compile", "channels_last", "bf16")
# Respacings of the sampling-cost table: the paper's 1000/500/250-step ancestral runs and IDDPM's DDIM grids.
SAMPLING_COST_RESPACINGS = (("1000", "ancestral"), ("500", "ancestral"), ("250", "ancestral"),
                            ("ddim50", "DDIM"), ("ddim25", "DDIM"))
_MIB = 1024**2


@dataclass(frozen=True)
class BenchmarkConfig:
    """A model, diffusion and batch sizes to time."""

    flags: dict                  # model and diffusion flags over model_and_diffusion_defaults()
    batch_size: int              # training images per step
    sample_batch_size: int       # images per sampling step
    needs_gpu: bool = False      # too large to time on a CPU in reasonable time
    description: str = ""


_TINY_FLAGS = dict(
    num_res_blocks=1, num_head_channels=32, resblock_updown=True, learn_sigma=True, use_scale_shift_norm=True,
    dropout=0.0, diffusion_steps=1000, noise_schedule="linear", rescale_learned_sigmas=True, p2_gamma=1.0,
    p2_k=1.0,
)
CONFIGS = {
    "tiny16": BenchmarkConfig(
        flags=dict(_TINY_FLAGS, image_size=16, num_channels=32, channel_mult="1,2", attention_resolutions="8"),
        batch_size=4, sample_batch_size=4,
        description="16x16, 32 channels, 1,2, attention at 8 px; for tests",
    ),
    "tiny32": BenchmarkConfig(
        flags=dict(_TINY_FLAGS, image_size=32, num_channels=64, channel_mult="1,2,2,2", attention_resolutions="16,8"),
        batch_size=16, sample_batch_size=16,
        description="32x32, 64 channels, 1,2,2,2, 1 res block, attention at 16 and 8 px (32 ch/head), "
        "BigGAN up/down, learned sigma, P2 gamma 1 k 1, linear T=1000",
    ),
    # The paper's default model (COMPAT §5 "P2 README flags", 94M parameters) at its training batch of 8.
    "p2_256": BenchmarkConfig(
        flags=dict(_TINY_FLAGS, image_size=256, num_channels=128, channel_mult="", attention_resolutions="16",
                   num_head_channels=64),
        batch_size=8, sample_batch_size=16, needs_gpu=True,
        description="the paper's 256x256 model (94M), batch 8",
    ),
}
# The paper's optimizer settings (COMPAT §11) and ADM's log interval.
TRAIN_FLAGS = dict(lr=2e-5, ema_rate="0.9999", weight_decay=0.0, log_interval=10)


# ----------------------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Setting:
    """How one benchmarked run executes: the reference code, or ours with speed options."""

    name: str
    reference: bool = False
    compile: bool = False        # torch.compile of the U-Net (Module.compile, in place)
    channels_last: bool = False  # NHWC memory order of the 4-D weights (and hence the activations)
    precision: str = "fp32"      # fp32, or bf16 autocast

    @property
    def matmul_dtype(self):
        return "bf16" if self.precision == "bf16" else "fp32"


def parse_setting(name):
    """'eager' (the plain NCHW path), 'reference', or '+'-joined options such as 'compile+channels_last'."""
    name = name.strip()
    if name == REFERENCE_SETTING:
        return Setting(name, reference=True)
    if name == EAGER_SETTING:
        return Setting(name)
    options = name.split("+")
    unknown = [o for o in options if o not in SETTING_OPTIONS]
    if unknown or len(set(options)) != len(options):
        raise ValueError(
            f"setting {name!r} is not understood: use {REFERENCE_SETTING!r}, {EAGER_SETTING!r}, or a '+'-joined "
            f"set of {', '.join(SETTING_OPTIONS)} (e.g. compile+channels_last)"
        )
    return Setting(
        name,
        compile="compile" in options,
        channels_last="channels_last" in options,
        precision="bf16" if "bf16" in options else "fp32",
    )


def get_config(name):
    if name not in CONFIGS:
        raise ValueError(f"--config {name!r} is unknown; choose one of {', '.join(CONFIGS)}")
    return CONFIGS[name]


def model_flags(config):
    """Every model and diffusion flag of `config` (defaults filled in)."""
    return {**model_and_diffusion_defaults(), **config.flags}


# ----------------------------------------------------------------------------------------------------------------
# Steps (run inside a worker process)


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(function, device):
    """Wall seconds of function(), the device's queued work included."""
    _synchronize(device)
    start = time.perf_counter()
    function()
    _synchronize(device)
    return time.perf_counter() - start


def synthetic_batch(config, seed, batch_size):
    """Images in [-1, 1], float32 [batch_size, 3, S, S], the same for every setting of one run."""
    size = config.flags["image_size"]
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1


class _Countdown:
    """Timesteps T-1, T-2, ..., 0, T-1, ... for consecutive sampling steps."""

    def __init__(self, num_timesteps):
        self.num_timesteps = num_timesteps
        self.index = num_timesteps - 1

    def next_t(self, batch_size, device):
        t = torch.full((batch_size,), self.index, device=device, dtype=torch.long)
        self.index = self.index - 1 if self.index > 0 else self.num_timesteps - 1
        return t


def train_loop_arguments(config):
    """TrainLoop arguments that ours and the reference's take alike."""
    return dict(
        batch_size=config.batch_size,
        microbatch=-1,
        lr=TRAIN_FLAGS["lr"],
        ema_rate=TRAIN_FLAGS["ema_rate"],
        log_interval=TRAIN_FLAGS["log_interval"],
        save_interval=10**9,
        resume_checkpoint="",
        weight_decay=TRAIN_FLAGS["weight_decay"],
    )


class OurTrainStep:
    """One `TrainLoop.run_step` of this code base, with the speed options of `setting`."""

    def __init__(self, config, setting, device, seed, memory):
        seed_everything(seed)
        model, diffusion = create_model_and_diffusion(**model_flags(config))
        model.to(device)
        memory.set_baseline()
        apply_speed_options(model, compile=setting.compile, channels_last=setting.channels_last)
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
        seconds = _timed(lambda: self.loop.run_step(batch, cond), self.device)
        if self.loop.step % self.loop.log_interval == 0:
            self.loop.log_step()
        return seconds


class OurSampleStep:
    """One ancestral `p_sample` of this code base as `generate_batch` runs it (autograd mode, precision, noise)."""

    def __init__(self, config, setting, device, seed, memory):
        seed_everything(seed)
        model, self.diffusion = create_model_and_diffusion(**model_flags(config))
        model.to(device).eval()
        memory.set_baseline()
        apply_speed_options(model, compile=setting.compile, channels_last=setting.channels_last)
        self.network = network_at_precision(model, setting.precision, device)
        batch_size = config.sample_batch_size
        self.noise = PerSampleGenerator(seed, range(batch_size), device)
        self.x = self.noise.randn((batch_size, 3, config.flags["image_size"], config.flags["image_size"]))
        self.countdown = _Countdown(self.diffusion.num_timesteps)
        self.device = device

    def _step(self):
        with sampling_autograd_mode():
            t = self.countdown.next_t(self.x.shape[0], self.device)
            out = self.diffusion.p_sample(self.network, self.x, t, clip_denoised=True, noise_fn=self.noise.randn_like)
        self.x = out["sample"]

    def __call__(self):
        return _timed(self._step, self.device)


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

    Its modules import each other relatively, so the alias keeps them apart from this project's
    `guided_diffusion`, which has the same name in a clone. :return: {module name: module}.
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

    def __init__(self, config, setting, device, seed, memory, reference_path):
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
        seconds = _timed(lambda: self.loop.run_step(self.batch, {}), self.device)
        if self.loop.step % self.loop.log_interval == 0:
            self.logger.dumpkvs()
        self.loop.step += 1
        return seconds


class ReferenceSampleStep:
    """One reference `p_sample` under torch.no_grad(), as its p_sample_loop runs it."""

    def __init__(self, config, setting, device, seed, memory, reference_path):
        self._log_dir = tempfile.TemporaryDirectory(prefix="benchmark_reference_")
        reference = _Reference(config, reference_path, seed, self._log_dir.name)
        self.model = reference.model.to(device).eval()
        memory.set_baseline()
        self.diffusion = reference.diffusion
        size = config.flags["image_size"]
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(config.sample_batch_size, 3, size, size, generator=generator).to(device)
        self.countdown = _Countdown(self.diffusion.num_timesteps)
        self.device = device
        self.dropped_flags = reference.dropped_flags

    def _step(self):
        with torch.no_grad():
            t = self.countdown.next_t(self.x.shape[0], self.device)
            self.x = self.diffusion.p_sample(self.model, self.x, t, clip_denoised=True)["sample"]

    def __call__(self):
        return _timed(self._step, self.device)


# ----------------------------------------------------------------------------------------------------------------
# Peak memory (inside a worker process)


def _proc_status_bytes(field_name):
    """A size field of /proc/self/status in bytes; None where the platform has no such file or field."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _max_rss_bytes():
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakMemory:
    """Peak memory of the timed steps and of warm-up plus timed steps, over a baseline after the model build."""

    METHODS = {
        "cuda": "torch.cuda.max_memory_allocated",
        "vmhwm": "peak RSS (VmHWM, reset after warm-up via /proc/self/clear_refs)",
        "maxrss": "peak RSS since process start (ru_maxrss)",
    }

    def __init__(self, device):
        self.device = device
        self.baseline = None
        self.warmup_peak = 0
        if device.type == "cuda":
            self.kind = "cuda"
        elif _proc_status_bytes("VmHWM") is not None and os.access("/proc/self/clear_refs", os.W_OK):
            self.kind = "vmhwm"
        else:
            self.kind = "maxrss"

    def _current(self):
        if self.kind == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _proc_status_bytes("VmRSS") or _max_rss_bytes()

    def _peak(self):
        if self.kind == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self.kind == "vmhwm":
            return _proc_status_bytes("VmHWM")
        return _max_rss_bytes()

    def set_baseline(self):
        """Mark the level after imports and model build (the model on its device)."""
        _synchronize(self.device)
        self.baseline = self._current()

    def end_warmup(self):
        """Start measuring the timed steps' peak (where the platform allows a reset)."""
        _synchronize(self.device)
        self.warmup_peak = self._peak()
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "vmhwm":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)

    def summary(self):
        _synchronize(self.device)
        peak = self._peak()
        return dict(
            method=self.METHODS[self.kind],
            baseline_mib=self.baseline / _MIB,
            peak_mib=peak / _MIB,
            peak_increase_mib=(peak - self.baseline) / _MIB,
            peak_increase_with_warmup_mib=(max(peak, self.warmup_peak) - self.baseline) / _MIB,
        )


def saved_for_backward_bytes(function, parameters):
    """Bytes of the distinct tensor storages autograd keeps for backward while `function()` runs, parameters
    excluded: the activation memory of a training step, exact and independent of the allocator (unlike peak RSS).
    """
    parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return sum(saved.values())


# ----------------------------------------------------------------------------------------------------------------
# Worker processes


@dataclass(frozen=True)
class WorkerRequest:
    config_name: str
    setting_name: str
    phase: str
    threads: int
    seed: int
    device: str
    reference_path: str = ""


def _build_step(request, memory):
    config = get_config(request.config_name)
    setting = parse_setting(request.setting_name)
    device = torch.device(request.device)
    if setting.reference:
        step_class = {"train": ReferenceTrainStep, "sample": ReferenceSampleStep}[request.phase]
        return step_class(config, setting, device, request.seed, memory, request.reference_path)
    step_class = {"train": OurTrainStep, "sample": OurSampleStep}[request.phase]
    return step_class(config, setting, device, request.seed, memory)


def _worker_main(connection, request):
    """Build one step, then serve commands: ("steps", n) -> seconds of n steps; ("end_warmup",); ("finish",)."""
    try:
        torch.set_num_threads(request.threads)
        device = torch.device(request.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        memory = PeakMemory(device)
        step = _build_step(request, memory)
        connection.send({"ready": {"dropped_flags": getattr(step, "dropped_flags", [])}})
        while True:
            command = connection.recv()
            if command[0] == "steps":
                connection.send({"seconds": [step() for _ in range(command[1])]})
            elif command[0] == "end_warmup":
                memory.end_warmup()
                connection.send({"ok": True})
            else:
                summary = memory.summary()
                # One more, untimed step under saved-tensor hooks (compiled graphs would recompile under them).
                if request.phase == "train" and not parse_setting(request.setting_name).compile:
                    saved = saved_for_backward_bytes(step, step.loop.model.parameters())
                    summary["saved_for_backward_mib"] = saved / _MIB
                connection.send({"memory": summary})
                return
    except BaseException:
        connection.send({"error": traceback.format_exc()})


class _Worker:
    """A process holding one (setting, phase) step; each call blocks until the worker answers."""

    def __init__(self, context, request):
        self.label = f"{request.setting_name}/{request.phase}"
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child_end, request), daemon=True)
        self.process.start()
        child_end.close()
        try:
            self.info = self._receive()["ready"]
        except RuntimeError:
            self.close()
            raise

    def _receive(self):
        while not self.connection.poll(1.0):
            if not self.process.is_alive():
                raise RuntimeError(f"benchmark worker {self.label} exited with code {self.process.exitcode}")
        message = self.connection.recv()
        if "error" in message:
            raise RuntimeError(f"benchmark worker {self.label} failed:\n{message['error']}")
        return message

    def steps(self, count):
        self.connection.send(("steps", count))
        return self._receive()["seconds"]

    def end_warmup(self):
        self.connection.send(("end_warmup",))
        self._receive()

    def finish(self):
        self.connection.send(("finish",))
        memory = self._receive()["memory"]
        self.process.join()
        return memory

    def close(self):
        if self.process.is_alive():
            self.process.terminate()
        self.process.join()


# ----------------------------------------------------------------------------------------------------------------
# Machine and model measurements (in the coordinating process, while every worker waits)


def default_threads():
    """All cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def default_device():
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


class MatmulPeak:
    """The machine's measured matmul peak per dtype: the best GFLOP/s of a [size, size] @ [size, size] product,
    sampled again between rounds of steps so that a moment of load elsewhere does not lower it.

    :param dtype_names: "fp32" (TF32 off) and/or "bf16".
    :param size: matrix side (default 2048 on a CPU, 8192 on a GPU).
    """

    DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

    def __init__(self, dtype_names, device, size=None):
        size = size or (8192 if device.type == "cuda" else 2048)
        generator = torch.Generator().manual_seed(0)
        self.device = device
        self.flop = 2 * size**3
        self.operands = {
            name: [torch.randn(size, size, generator=generator).to(device, self.DTYPES[name]) for _ in range(2)]
            for name in dtype_names
        }
        self.gflops = {name: 0.0 for name in dtype_names}
        self.sample()  # the first product of a size and dtype also pays for allocation and kernel selection

    def sample(self, repeats=1):
        """Time `repeats` products per dtype; keep the best rate."""
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            for name, (a, b) in self.operands.items():
                for _ in range(repeats):
                    rate = self.flop / _timed(lambda: a @ b, self.device) / 1e9
                    self.gflops[name] = max(self.gflops[name], rate)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        return self.gflops


def model_flops_per_image(config, device):
    """Nominal FLOPs of one image through the U-Net: {"forward": ..., "forward_backward": ...}.

    Nominal: the architecture as written, with every upsampling followed by its 3×3 conv (the reference's
    work), so that the share of the matmul peak compares settings and code bases doing the same job; the folded
    upsample convs of this code base execute 4/9 of those multiply-adds. Counted by torch.utils.flop_counter on
    the math attention path, whose matmuls it sees (the fused CPU attention kernel is not counted); the loss,
    optimizer and EMA add element-wise work only.
    """
    seed_everything(0)
    model, _ = create_model_and_diffusion(**model_flags(config))
    for module in model.modules():
        if hasattr(module, "fold_upsample"):
            module.fold_upsample = False
    model.to(device)
    size = config.flags["image_size"]
    x = torch.randn(1, 3, size, size, device=device)
    t = torch.full((1,), 500, device=device, dtype=torch.long)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as forward:
            with torch.no_grad():
                model(x, t)
        with FlopCounterMode(display=False) as forward_backward:
            model(x, t).square().mean().backward()
    return {"forward": forward.get_total_flops(), "forward_backward": forward_backward.get_total_flops()}


def machine_description(device, threads):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            cpu = match.group(1).strip() if match else cpu
    return f"{cpu}, {threads} thread(s)"


# ----------------------------------------------------------------------------------------------------------------
# The run


def time_statistics(seconds, batch_size):
    """Median, spread and throughput of per-step wall times."""
    ordered = sorted(seconds)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    median = statistics.median(ordered)
    return dict(
        median_s=median, min_s=ordered[0], max_s=ordered[-1], q1_s=q1, q3_s=q3, iqr_s=q3 - q1,
        images_per_s=batch_size / median, times_s=list(seconds),
    )


@dataclass
class BenchmarkPlan:
    """What one run measures."""

    config_name: str = "tiny32"
    settings: list = field(default_factory=lambda: [EAGER_SETTING])
    phases: tuple = PHASES
    warmup: int = 2              # untimed steps per worker (compilation happens here)
    repeats: int = 7             # timed steps per worker
    threads: int = 0             # torch threads per worker; 0 = all cores
    seed: int = 0
    device: str = ""             # "" = cuda:0 if present, else cpu
    reference_path: str = ""     # folder of the reference code, needed by the "reference" setting
    progress: bool = True

    def check(self):
        """Raise on a plan that cannot run, naming the flag; returns (config, [Setting], device)."""
        config = get_config(self.config_name)
        settings = [parse_setting(name) for name in self.settings]
        if not settings or len({s.name for s in settings}) != len(settings):
            raise ValueError(f"--settings {','.join(self.settings)!r}: name each setting once")
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError(f"--warmup {self.warmup} must be >= 0 and --repeats {self.repeats} >= 1")
        unknown = [p for p in self.phases if p not in PHASES]
        if unknown or not self.phases:
            raise ValueError(f"--phases {','.join(self.phases)!r}: choose from {', '.join(PHASES)}")
        device = torch.device(self.device) if self.device else default_device()
        if config.needs_gpu and device.type != "cuda":
            raise ValueError(f"--config {self.config_name} is timed on a GPU only; this machine has none")
        if any(s.reference for s in settings):
            if not self.reference_path:
                raise ValueError(
                    "the 'reference' setting needs --reference_path: a clone of "
                    "https://github.com/jychoi118/P2-weighting (see the README's performance section)"
                )
            find_reference_package(self.reference_path)
        return config, settings, device


def run_benchmark(plan):
    """Time every setting of `plan`, interleaved; returns the result dict written as JSON."""
    config, settings, device = plan.check()
    threads = plan.threads or default_threads()
    previous_threads = torch.get_num_threads()
    # The matmul probe runs in this process, with the workers' thread count, while every worker waits.
    torch.set_num_threads(threads)
    try:
        dtypes = ["fp32"] + (["bf16"] if device.type == "cuda" or any(s.precision == "bf16" for s in settings) else [])
        matmul = MatmulPeak(dtypes, device)
        matmul.sample(repeats=3)
        result = dict(
            meta=dict(
                config=plan.config_name,
                config_description=config.description,
                flags=model_flags(config),
                batch_size={"train": config.batch_size, "sample": config.sample_batch_size},
                device=str(device),
                machine=machine_description(device, threads),
                threads=threads,
                torch=torch.__version__,
                python=platform.python_version(),
                warmup=plan.warmup,
                repeats=plan.repeats,
                seed=plan.seed,
                settings=[s.name for s in settings],
                load_average_start=_load_average(),
            ),
            model_flops_per_image=model_flops_per_image(config, device),
            results={s.name: {} for s in settings},
        )
        for phase in plan.phases:
            _run_phase(plan, settings, phase, threads, device, config, result, matmul)
    finally:
        torch.set_num_threads(previous_threads)
    result["meta"]["load_average_end"] = _load_average()
    result["matmul_peak_gflops"] = dict(matmul.gflops)
    for setting in settings:
        for phase, entry in result["results"][setting.name].items():
            entry.update(_achieved(result, setting, phase, entry["images_per_s"]))
    result["ratios"] = speed_ratios(result)
    return result


def _load_average():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _run_phase(plan, settings, phase, threads, device, config, result, matmul):
    batch_size = config.batch_size if phase == "train" else config.sample_batch_size
    context = multiprocessing.get_context("spawn")
    workers = []
    total = len(settings) * (plan.warmup + plan.repeats)
    bar = tqdm(total=total, desc=f"{phase} steps", unit="step", disable=not plan.progress, dynamic_ncols=True)
    try:
        warmup_seconds = {}
        for setting in settings:
            request = WorkerRequest(
                config_name=plan.config_name, setting_name=setting.name, phase=phase, threads=threads,
                seed=plan.seed, device=str(device), reference_path=plan.reference_path,
            )
            bar.set_postfix_str(f"building {setting.name}")
            worker = _Worker(context, request)
            workers.append(worker)
            bar.set_postfix_str(f"warming up {setting.name}")
            warmup_seconds[setting.name] = []
            for _ in range(plan.warmup):
                warmup_seconds[setting.name] += worker.steps(1)
                bar.update(1)
            worker.end_warmup()
        times = {s.name: [] for s in settings}
        for round_index in range(plan.repeats):
            order = list(zip(settings, workers))
            for setting, worker in order if round_index % 2 == 0 else reversed(order):
                bar.set_postfix_str(setting.name)
                times[setting.name] += worker.steps(1)
                bar.update(1)
            matmul.sample()
        for setting, worker in zip(settings, workers):
            memory = worker.finish()
            entry = time_statistics(times[setting.name], batch_size)
            entry.update(
                batch_size=batch_size,
                warmup_s=warmup_seconds[setting.name],
                memory=memory,
                dropped_reference_flags=worker.info["dropped_flags"],
            )
            result["results"][setting.name][phase] = entry
    finally:
        bar.close()
        for worker in workers:
            worker.close()


def _achieved(result, setting, phase, images_per_s):
    """Model GFLOP/s at this throughput and its share of the measured matmul peak of the setting's dtype."""
    flops = result["model_flops_per_image"]["forward_backward" if phase == "train" else "forward"]
    gflops = flops * images_per_s / 1e9
    peak = result["matmul_peak_gflops"].get(setting.matmul_dtype)
    return dict(model_gflops_per_s=gflops, matmul_peak_fraction=gflops / peak if peak else None,
                matmul_peak_dtype=setting.matmul_dtype)


def speed_ratios(result):
    """Speed-up of every setting over the first (median over median, and per round, paired by interleaving).

    :return: {"baseline": name, setting: {phase: {"speedup": x, "paired_median": x, "paired_min": x,
        "paired_max": x, "memory_ratio": peak increase / baseline's}}}.
    """
    names = result["meta"]["settings"]
    baseline = names[0]
    ratios = {"baseline": baseline}
    for name in names[1:]:
        ratios[name] = {}
        for phase, entry in result["results"][name].items():
            base = result["results"][baseline][phase]
            paired = [b / t for b, t in zip(base["times_s"], entry["times_s"])]
            base_memory = base["memory"]["peak_increase_mib"]
            ratios[name][phase] = dict(
                speedup=base["median_s"] / entry["median_s"],
                paired_median=statistics.median(paired),
                paired_min=min(paired),
                paired_max=max(paired),
                memory_ratio=entry["memory"]["peak_increase_mib"] / base_memory if base_memory > 0 else None,
            )
    return ratios


# ----------------------------------------------------------------------------------------------------------------
# Reports


TABLE_COLUMNS = ("setting", "step", "batch", "median ms", "min–max ms", "images/s", "speed-up", "paired speed-ups",
                 "peak memory +MiB", "saved for backward MiB", "model GFLOP/s", "of matmul peak")


def _table_rows(result):
    """One list of cells (TABLE_COLUMNS) per setting and step, training steps first."""
    ratios = result["ratios"]
    for phase in PHASES:
        for name in result["meta"]["settings"]:
            entry = result["results"][name].get(phase)
            if entry is None:
                continue
            ratio = ratios.get(name, {}).get(phase)
            fraction = entry["matmul_peak_fraction"]
            saved = entry["memory"].get("saved_for_backward_mib")
            yield [
                name,
                phase,
                str(entry["batch_size"]),
                f"{entry['median_s'] * 1e3:.0f}",
                f"{entry['min_s'] * 1e3:.0f}–{entry['max_s'] * 1e3:.0f}",
                f"{entry['images_per_s']:.1f}",
                f"{ratio['speedup']:.2f}×" if ratio else "1.00×",
                f"{ratio['paired_min']:.2f}–{ratio['paired_max']:.2f}" if ratio else "",
                f"{entry['memory']['peak_increase_mib']:.0f}",
                f"{saved:.0f}" if saved is not None else "-",
                f"{entry['model_gflops_per_s']:.1f}",
                f"{100 * fraction:.1f}% ({entry['matmul_peak_dtype']})" if fraction is not None else "-",
            ]


def _summary(result):
    """Sentences on the run: config, machine, FLOPs, matmul peak, memory method and how to read the ratios."""
    meta = result["meta"]
    flops = result["model_flops_per_image"]
    memory_method = next(
        (entry["memory"]["method"] for per_phase in result["results"].values() for entry in per_phase.values()), ""
    )
    load = meta.get("load_average_start"), meta.get("load_average_end")
    load_text = f"{load[0][0]:.1f} -> {load[1][0]:.1f}" if all(load) else "n/a"
    return [
        f"Config `{meta['config']}`: {meta['config_description']}; training batch {meta['batch_size']['train']}, "
        f"sampling batch {meta['batch_size']['sample']}. Machine: {meta['machine']} ({meta['device']}), torch "
        f"{meta['torch']}; {meta['warmup']} warm-up and {meta['repeats']} timed steps per setting, interleaved "
        f"(load average {load_text}).",
        f"Model FLOPs per image (nominal): {flops['forward'] / 1e9:.2f} GFLOP forward, "
        f"{flops['forward_backward'] / 1e9:.2f} GFLOP forward+backward. Measured matmul peak: "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in result["matmul_peak_gflops"].items())
        + f". Memory: {memory_method}, as the increase over the level after imports and model build; saved for "
        "backward: the tensors autograd keeps during one training step, parameters excluded (not measured for "
        "compiled settings).",
        f"Speed-up: median of {result['ratios']['baseline']} / median; paired: range of the per-round ratios of "
        "interleaved steps.",
    ]


def format_table(result):
    """Plain-text table of a run, for the terminal."""
    rows = [list(TABLE_COLUMNS)] + list(_table_rows(result))
    widths = [max(len(row[k]) for row in rows) for k in range(len(TABLE_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) if k < 2 else cell.rjust(width) for k, (cell, width) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(_summary(result)[:1] + lines + _summary(result)[1:])


def format_markdown(result, command=""):
    """The README's performance table for a run (and the sampling cost at its sampling speed)."""
    lines = _summary(result)[:1] + [""]
    lines.append("| " + " | ".join(TABLE_COLUMNS) + " |")
    lines.append("|---|---|" + "---:|" * (len(TABLE_COLUMNS) - 2))
    lines += ["| " + " | ".join(row) + " |" for row in _table_rows(result)]
    lines += [""] + _summary(result)[1:]
    if command:
        lines += ["", "Reproduce with:", "", "```", command, "```"]
    if any("sample" in per_phase for per_phase in result["results"].values()):
        lines += ["", "Sampling cost at the measured sampling speed:", "", format_sampling_cost(result=result)]
    return "\n".join(lines)


def sampling_cost_rows(diffusion_steps=1000, respacings=SAMPLING_COST_RESPACINGS):
    """Network evaluations per image of each respacing, counted from `space_timesteps` (one per kept step)."""
    rows = []
    for spec, sampler in respacings:
        evaluations = len(space_timesteps(diffusion_steps, spec))
        rows.append(dict(respacing=spec, sampler=sampler, network_evaluations=evaluations,
                         share_of_full=evaluations / diffusion_steps))
    return rows


def format_sampling_cost(diffusion_steps=1000, result=None):
    """Markdown table of sampling cost; with a run's result, also seconds per image at its sampling speed."""
    timed = []
    if result is not None:
        timed = [(name, per_phase["sample"]) for name, per_phase in result["results"].items() if "sample" in per_phase]
    header = "| respacing | sampler | network evaluations per image | share of 1000 steps |"
    rule = "|---|---|---:|---:|"
    for name, _ in timed:
        header += f" est. s per image, {name} ({result['meta']['config']}) |"
        rule += "---:|"
    lines = [header, rule]
    for row in sampling_cost_rows(diffusion_steps):
        line = (f"| `{row['respacing']}` | {row['sampler']} | {row['network_evaluations']} | "
                f"{row['share_of_full']:.3f} |")
        for _, entry in timed:
            line += f" {row['network_evaluations'] * entry['median_s'] / entry['batch_size']:.2f} |"
        lines.append(line)
    return "\n".join(lines)
