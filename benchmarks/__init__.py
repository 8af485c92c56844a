"""Speed benchmark of one training step and one sampling step: this code base against the reference.

A developer tool beside the library, run from the repository root as `python -m benchmarks ...` (see
__main__.py for the flags). What is timed, per setting:

- train: one `TrainLoop.run_step` on a fixed synthetic batch, exactly the code `image_train.py` runs: timestep
  draw, P2 loss forward and backward, AdamW, EMA update. As in `run_loop`, the log row is written every
  `log_interval` steps, outside the timed region (the reference's `logger.dumpkvs()` likewise).
- sample: one `diffusion.p_sample` on a batch, in the autograd mode and at the precision `generate_batch` uses,
  with per-sample noise generators; its output feeds the next step, t counting down from T-1.

Every (setting, step) runs in its own worker process, so that compiled code, allocator caches and peak memory
of one setting never leak into another; the workers take turns one step at a time (workers.py). A setting is a
"+"-joined set of options (`eager` alone is the plain path): `compile`, `channels_last`, `bf16`; `reference` is
the original ADM/P2 code from `--reference_path` (reference.py). Memory, FLOP and matmul-peak measurements:
probes.py; tables: report.py.

Modules, in the order they build on each other: settings (configs and settings), timing (wall clock and its
statistics), probes, steps (ours), reference (theirs), workers, run (the whole run), report, __main__ (the CLI).
"""
