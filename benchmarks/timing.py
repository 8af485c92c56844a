"""Wall-clock time of one step, and the statistics a run reports on many: spread, throughput, speed-ups."""

import statistics
import time

import torch


def synchronize(device):
    """Wait for the work queued on `device` (a no-op on a CPU, whose work is done when a call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device):
    """Wall seconds of function(), the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def time_statistics(seconds, batch_size):
    """Median, spread and throughput of per-step wall times (seconds; images_per_s at `batch_size` per step)."""
    ordered = sorted(seconds)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    median = statistics.median(ordered)
    return dict(
        median_s=median, min_s=ordered[0], max_s=ordered[-1], q1_s=q1, q3_s=q3, iqr_s=q3 - q1,
        images_per_s=batch_size / median, times_s=list(seconds),
    )


def speed_ratios(result):
    """Speed-up of every setting over the first (median over median, and per round, paired by interleaving).

    :param result: a run's result: meta.settings, and per setting and phase the entry of `time_statistics` with
        memory.peak_increase_mib.
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
