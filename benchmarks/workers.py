"""Worker processes, one per (setting, phase), and the interleaved rounds in which they take turns.

Every (setting, step) runs in its own process, so that compiled code, allocator caches and peak memory of one
setting never leak into another. Workers take turns, one step each (A, B, A, B, ... with the order reversed every
other round), so that a change in machine load hits every setting alike; each worker waits blocked on its pipe
while another runs. Workers are spawned: they import this module afresh, so it and everything it imports must be
importable by name (the `benchmarks` package from the repository root, the installed `guided_diffusion`).
"""

import multiprocessing
import traceback
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .probes import MIB, PeakMemory, saved_for_backward_bytes
from .reference import ReferenceSampleStep, ReferenceTrainStep
from .settings import get_config, parse_setting
from .steps import OurSampleStep, OurTrainStep
from .timing import time_statistics


@dataclass(frozen=True)
class WorkerRequest:
    """What one worker builds: the step of `phase` for one setting of one config."""

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
        return step_class(config, device, request.seed, memory, request.reference_path)
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
        # The reference's steps drop flags it lacks; ours report the speed options applied.
        connection.send({"ready": {"dropped_flags": getattr(step, "dropped_flags", []),
                                   "applied": getattr(step, "applied", None)}})
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
                    summary["saved_for_backward_mib"] = saved / MIB
                connection.send({"memory": summary})
                return
    except BaseException:
        connection.send({"error": traceback.format_exc()})


class Worker:
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
        """Run `count` steps; their wall seconds."""
        self.connection.send(("steps", count))
        return self._receive()["seconds"]

    def end_warmup(self):
        self.connection.send(("end_warmup",))
        self._receive()

    def finish(self):
        """End the worker; its memory summary (PeakMemory.summary, plus saved_for_backward_mib for training)."""
        self.connection.send(("finish",))
        memory = self._receive()["memory"]
        self.process.join()
        return memory

    def close(self):
        if self.process.is_alive():
            self.process.terminate()
        self.process.join()


def run_interleaved(plan, settings, phase, threads, device, between_rounds):
    """Warm up a worker per setting, then time `plan.repeats` rounds of one step per worker, the order reversed
    every other round; `between_rounds()` runs after each round, while every worker waits.

    :param plan: a BenchmarkPlan (config_name, warmup, repeats, seed, reference_path, progress).
    :return: {setting name: time_statistics of the timed steps, with batch_size, warmup_s (seconds of each
        warm-up step), memory (Worker.finish), dropped_reference_flags and applied_speed_options (None for the
        reference)}.
    """
    config = get_config(plan.config_name)
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
            worker = Worker(context, request)
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
            between_rounds()
        entries = {}
        for setting, worker in zip(settings, workers):
            entries[setting.name] = time_statistics(times[setting.name], batch_size)
            entries[setting.name].update(
                batch_size=batch_size,
                warmup_s=warmup_seconds[setting.name],
                memory=worker.finish(),
                dropped_reference_flags=worker.info["dropped_flags"],
                applied_speed_options=worker.info["applied"],
            )
        return entries
    finally:
        bar.close()
        for worker in workers:
            worker.close()
