"""Stopping training cleanly on a signal, and the per-step decisions every rank must share.

While `TrainLoop.run_loop` runs (in the main thread), SIGTERM (preemption, a time limit), SIGUSR1 (Slurm's
`--signal`) and SIGINT (Ctrl-C) request a stop instead of ending the process: every rank finishes its current
optimizer step, the ranks agree on the step, a complete checkpoint of it is written, progress.csv gets its row and
the run raises `Stopped`, which image_train.py turns into exit code 128 + the signal number:

    SIGINT 130 (Ctrl-C)     SIGUSR1 138 (Linux)     SIGTERM 143

A SIGINT while a stop is already under way (a second Ctrl-C) raises KeyboardInterrupt at once (exit 130, no
checkpoint of that step). One arriving within REPEAT_WINDOW_S of the first request counts as the same Ctrl-C: a
launcher that forwards the terminal's Ctrl-C to workers which the terminal interrupted too (torchrun does) delivers
it twice.

Agreement: after every optimizer step each rank contributes [the signal it received, else 0; whether
--save_interval_minutes has passed on rank 0's clock] to an all-reduce MAX of two int32s, so all ranks stop and save
at the same step even when the scheduler signalled only some of them. On the CPU (gloo) that is a few microseconds
per step and the decision applies to the step just finished. On CUDA the flags travel through pinned memory and are
read one step later (`decision_lag`), so no step waits for the GPU: the stop and the wall-clock save come one step
after the request there. A single process needs no collective at all.
"""

import collections
import contextlib
import signal
import threading
import time

import torch
import torch.distributed as dist

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, name))
REPEAT_WINDOW_S = 1.0

# The wall clock of the time-based decisions (seconds); tests replace it.
clock = time.monotonic


def signal_name(signum):
    return signal.Signals(signum).name


class Stopped(Exception):
    """Training stopped at `step` on signal `signum`, after writing that step's checkpoint into `log_dir`."""

    def __init__(self, signum, step, log_dir):
        super().__init__(f"stopped by {signal_name(signum)} at step {step}; its checkpoint is in {log_dir}")
        self.signum, self.step, self.log_dir = signum, step, log_dir

    @property
    def exit_code(self):
        return 128 + self.signum


def ignore_stop_signals(worker_id=None):
    """Ignore the stop signals in this process (a DataLoader worker_init_fn): a Ctrl-C in a terminal or a
    scheduler's SIGTERM reaches the whole process group, and the main process decides when to stop."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def signal_handlers(handler, signums=STOP_SIGNALS):
    """While entered, `handler(signum, frame)` handles `signums`; the previous handlers are restored on exit.
    Only in the main thread (Python allows no other); elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, old in previous.items():
            # None: a handler installed outside Python, which cannot be reinstalled; the default is the closest.
            signal.signal(signum, signal.SIG_DFL if old is None else old)


class StopRequest:
    """`handle` as the stop signals' handler sets `signum` (the first signal received; 0 = none); a later SIGINT
    outside REPEAT_WINDOW_S raises KeyboardInterrupt."""

    def __init__(self):
        self.signum = 0
        self._requested_at = None

    def handle(self, signum, frame):
        now = clock()
        if not self.signum:
            self.signum, self._requested_at = signum, now
        elif signum == signal.SIGINT and now - self._requested_at >= REPEAT_WINDOW_S:
            raise KeyboardInterrupt


def decision_lag(device, world_size):
    """Steps between a rank's flags and the decision they feed: 1 with several CUDA ranks (no host sync), else 0."""
    return 1 if device.type == "cuda" and world_size > 1 else 0


class StepDecisions:
    """Per-step (stop signal, save now) agreed by every rank; see the module docstring.

    :param device: the training device (the all-reduce runs there).
    :param rank, world_size: this process's place in the group.
    :param save_interval_minutes: wall-clock minutes between checkpoints on rank 0's clock (0: off).
    """

    def __init__(self, device, rank, world_size, save_interval_minutes=0.0):
        self.device = device
        self.world_size = world_size
        self.save_interval_s = save_interval_minutes * 60.0 if rank == 0 else 0.0
        self.lag = decision_lag(device, world_size)
        self._pending = collections.deque()  # (flags being reduced, CUDA event or None, saves made before)
        self._saves = 0
        self._last_save = clock()

    def saved(self):
        """A checkpoint was just written: the wall-clock interval starts again (flags still in flight are stale)."""
        self._saves += 1
        self._last_save = clock()

    def after_step(self, signum):
        """(signal number or 0, whether to save now), equal on every rank, given this rank's received `signum`."""
        save_due = 0 < self.save_interval_s <= clock() - self._last_save
        flags = [int(signum), int(save_due)]
        if self.world_size == 1:
            return flags[0], bool(flags[1])
        host = torch.tensor(flags, dtype=torch.int32)
        if self.device.type == "cuda":
            host = host.pin_memory()
        agreed = host.to(self.device, non_blocking=True)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        if self.device.type == "cuda":
            result = torch.empty(2, dtype=torch.int32, pin_memory=True)
            result.copy_(agreed, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            result, done = agreed, None
        self._pending.append((result, done, self._saves))
        if len(self._pending) <= self.lag:
            return 0, False
        result, done, saves_before = self._pending.popleft()
        if done is not None:
            done.synchronize()  # waits for the previous step's flags only, not for the step just queued
        signum, save_due = result.tolist()
        return signum, bool(save_due) and saves_before == self._saves
