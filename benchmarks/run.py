"""One benchmark run: a plan checked flag by flag, then every phase timed and the result dict assembled."""

import platform
from dataclasses import dataclass, field

import torch

from .probes import (
    MatmulPeak,
    default_device,
    default_threads,
    load_average,
    machine_description,
    model_flops_per_image,
)
from .reference import find_reference_package
from .settings import EAGER_SETTING, PHASES, get_config, model_flags, parse_setting
from .timing import speed_ratios
from .workers import run_interleaved


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
        dtypes = ["fp32"] + (["tf32"] if device.type == "cuda" else [])
        dtypes += ["bf16"] if device.type == "cuda" or any(s.precision == "bf16" for s in settings) else []
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
                load_average_start=load_average(),
            ),
            model_flops_per_image=model_flops_per_image(config, device),
            results={s.name: {} for s in settings},
        )
        for phase in plan.phases:
            entries = run_interleaved(plan, settings, phase, threads, device, between_rounds=matmul.sample)
            for name, entry in entries.items():
                result["results"][name][phase] = entry
    finally:
        torch.set_num_threads(previous_threads)
    result["meta"]["load_average_end"] = load_average()
    result["matmul_peak_gflops"] = dict(matmul.gflops)
    for setting in settings:
        for phase, entry in result["results"][setting.name].items():
            entry.update(_achieved(result, setting, phase, entry["images_per_s"], device))
    result["ratios"] = speed_ratios(result)
    return result


def _achieved(result, setting, phase, images_per_s, device):
    """Model GFLOP/s at this throughput and its share of the measured matmul peak of the setting's dtype (for fp32 on
    a GPU the TF32 peak, as cuDNN runs the fp32 convolutions, nearly all of the U-Net's FLOPs, in TF32 by default)."""
    flops = result["model_flops_per_image"]["forward_backward" if phase == "train" else "forward"]
    gflops = flops * images_per_s / 1e9
    dtype = setting.matmul_dtype
    if dtype == "fp32" and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        dtype = "tf32"
    peak = result["matmul_peak_gflops"].get(dtype)
    return dict(model_gflops_per_s=gflops, matmul_peak_fraction=gflops / peak if peak else None,
                matmul_peak_dtype=dtype)
