"""Measurements beside the step times: peak memory and saved activations (inside a worker), the machine's matmul
peak, the model's nominal FLOPs and a description of the machine (in the coordinating process, while every worker
waits).

Memory: on CUDA, `torch.cuda.max_memory_allocated`; on a CPU, the peak resident set size (VmHWM of
/proc/self/status, reset through /proc/self/clear_refs after the warm-up), where `resource.ru_maxrss` (peak
since the process started) stands in when that reset is not allowed. Both are reported as the increase over the
level after imports and model build, so they count optimizer state, EMA copies, activations and workspace.
"""

import contextlib
import os
import platform
import re
import resource
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from guided_diffusion.script_util import create_model_and_diffusion
from guided_diffusion.train_util import seed_everything

from .settings import model_flags
from .timing import synchronize, timed

MIB = 1024**2


# ----------------------------------------------------------------------------------------------------------------
# Memory (inside a worker process)


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
        synchronize(self.device)
        self.baseline = self._current()

    def end_warmup(self):
        """Start measuring the timed steps' peak (where the platform allows a reset)."""
        synchronize(self.device)
        self.warmup_peak = self._peak()
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "vmhwm":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)

    def summary(self):
        """{"method", "baseline_mib", "peak_mib", "peak_increase_mib", "peak_increase_with_warmup_mib"} (MiB)."""
        synchronize(self.device)
        peak = self._peak()
        return dict(
            method=self.METHODS[self.kind],
            baseline_mib=self.baseline / MIB,
            peak_mib=peak / MIB,
            peak_increase_mib=(peak - self.baseline) / MIB,
            peak_increase_with_warmup_mib=(max(peak, self.warmup_peak) - self.baseline) / MIB,
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
# Machine and model (in the coordinating process)


def default_threads():
    """All cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def default_device():
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def load_average():
    """The 1, 5 and 15 minute load averages; None where the platform has none."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_description(device, threads):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            cpu = match.group(1).strip() if match else cpu
    return f"{cpu}, {threads} thread(s)"


class MatmulPeak:
    """The machine's measured matmul peak per dtype: the best GFLOP/s of a [size, size] @ [size, size] product,
    sampled again between rounds of steps so that a moment of load elsewhere does not lower it.

    :param dtype_names: any of "fp32" (TF32 off), "tf32" (fp32 tensors, TF32 on: what cuDNN's fp32 convolutions run
        by default on a GPU) and "bf16".
    :param size: matrix side (default 2048 on a CPU, 8192 on a GPU).
    """

    DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}

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
        try:
            for name, (a, b) in self.operands.items():
                torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
                for _ in range(repeats):
                    rate = self.flop / timed(lambda: a @ b, self.device) / 1e9
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
