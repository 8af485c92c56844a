"""Checkpoints: atomic writes, the reference's files, a full training state, resume lookup and checks.

The reference's files are described in docs/compatibility.md, "Training loop"; the state file and the resume rules
fix its defects #3-#5 (docs/compatibility.md, "Reference defects fixed here").

A checkpoint at step S (S = optimizer steps the weights have seen; %06d is a minimum width) is these files in the
log dir, written in this order:

    modelSSSSSS.pt           fp32 model state_dict (the reference's file; image_sample.py loads it)
    ema_{rate}_SSSSSS.pt     EMA state_dict, one per rate, the rate spelled as given (ema_0.9999_010000.pt)
    optSSSSSS.pt             optimizer state_dict
    stateSSSSSS.pt           the training state: everything an exact resume needs (see `training_state`)

The state file comes last, so its presence marks the checkpoint complete. Every file goes through `fileio.atomic_write`
(temporary file beside the target, fsync, rename), so a crash or SIGKILL leaves either the previous file or the new
one, never a torn one. Everything is stored as tensors and primitive containers, so `torch.load(weights_only=True)`
reads it all.

Every checkpoint file is read with `torch_files.read_checkpoint_file` (weights_only=True: a file torch cannot read, or
one holding other pickled objects, is one error naming it, and nothing is unpickled). A resume from a log dir skips a
newer checkpoint with a file that does not open (truncated by a full disk or a failed copy), with a warning naming
the file, and renames that checkpoint's files aside (`newest_readable_checkpoint`).

A resume must keep every flag that changes what is trained (model, diffusion and P2 weighting, optimizer, batches,
precision, seeds); `check_resume_config` compares the resumed run's flags with the checkpoint's. Which flags may
change (where files go, when to log, save or stop, speed) is the caller's classification, passed in.
"""

import hashlib
import os
import random
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import yaml

from . import fileio
from .fileio import atomic_write
from .torch_files import (
    UnreadableCheckpointError,
    read_checkpoint_file,
    torch_file_problem,
)

TRAINING_STATE_FORMAT = "p2-diffusion training state"
TRAINING_STATE_VERSION = 1
CONFIG_FILE = "config.yaml"

_MODEL_FILE = re.compile(r"^model(\d+)\.pt$")
_STATE_FILE = re.compile(r"^state(\d+)\.pt$")
_STEP_SUFFIX = re.compile(r"^(model|opt|state|ema_.+_)(\d+)\.pt$")
UNREADABLE_SUFFIX = ".unreadable"  # appended to the file names of a checkpoint a resume skipped
_GONE = "renamed or removed while it was read"  # by another rank setting the checkpoint aside


# ----------------------------------------------------------------------------------------------------------------
# Files of a run


def save_torch(obj, path):
    """torch.save, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_config(log_dir, config):
    """Write the resolved flags as YAML (config.yaml) in `log_dir`; sampling and resume read it back."""
    text = yaml.safe_dump(dict(config), sort_keys=True).encode()
    atomic_write(os.path.join(log_dir, CONFIG_FILE), lambda f: f.write(text))


def read_config(log_dir):
    """The flags saved by `save_config`, or None when `log_dir` has no config.yaml."""
    path = os.path.join(log_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return yaml.safe_load(f)


def check_log_dir(log_dir, start_step, remove_temporaries=True):
    """Create `log_dir` for a run starting at `start_step`; refuse one whose checkpoints it would overwrite.

    :param remove_temporaries: delete the temporary files of writes that were killed (pass True on one rank).
    :raises FileExistsError: when `log_dir` holds complete checkpoints newer than `start_step`.
    """
    os.makedirs(log_dir, exist_ok=True)
    newer = [step for step in complete_steps(log_dir) if step > start_step]
    if newer:
        raise FileExistsError(
            f"--log_dir {log_dir} already holds checkpoints of step(s) {', '.join(map(str, newer))}, after the "
            f"start step {start_step}; continuing there would overwrite them. Resume with --resume_checkpoint "
            f"auto (or {log_dir}), or choose another --log_dir"
        )
    if remove_temporaries:
        fileio.remove_temporaries(log_dir)


# ----------------------------------------------------------------------------------------------------------------
# File names and listing


def model_path(log_dir, step):
    return os.path.join(log_dir, f"model{step:06d}.pt")


def ema_path(log_dir, rate, step):
    return os.path.join(log_dir, f"ema_{rate}_{step:06d}.pt")


def opt_path(log_dir, step):
    return os.path.join(log_dir, f"opt{step:06d}.pt")


def state_path(log_dir, step):
    return os.path.join(log_dir, f"state{step:06d}.pt")


def complete_steps(log_dir):
    """Sorted steps of the complete checkpoints (those with a state file) in `log_dir`."""
    return sorted(int(m.group(1)) for m in map(_STATE_FILE.match, os.listdir(log_dir)) if m)


def checkpoint_files_by_step(log_dir):
    """{step: [file names]} of every checkpoint file (complete or not) in `log_dir`."""
    files = {}
    for name in os.listdir(log_dir):
        match = _STEP_SUFFIX.match(name)
        if match:
            files.setdefault(int(match.group(2)), []).append(name)
    return files


def state_file_first(names):
    """File names of one checkpoint with the state file first: removing or renaming them in this order makes the
    checkpoint incomplete at once."""
    return sorted(names, key=lambda name: not name.startswith("state"))


# ----------------------------------------------------------------------------------------------------------------
# Saving and pruning


def save_checkpoint(log_dir, state):
    """Write the checkpoint of a training state (see `training_state`): reference files first, state file last.

    An existing complete checkpoint of the same step is never replaced (docs/compatibility.md, "Reference defects
    fixed here" #5); reference files of the
    same step without a state file are the remains of an interrupted write and are replaced, with a warning.
    """
    step = state["step"]
    if os.path.exists(state_path(log_dir, step)):
        raise FileExistsError(
            f"{state_path(log_dir, step)} already exists; refusing to overwrite a complete checkpoint. "
            "Resume from it with --resume_checkpoint, or train into another --log_dir"
        )
    leftovers = checkpoint_files_by_step(log_dir).get(step, [])
    if leftovers:
        warnings.warn(
            f"replacing {', '.join(sorted(leftovers))} in {log_dir}: an interrupted run left this incomplete "
            "checkpoint (no state file)",
            stacklevel=2,
        )
    save_torch(state["model"], model_path(log_dir, step))
    for rate, ema_state in state["ema"].items():
        save_torch(ema_state, ema_path(log_dir, rate, step))
    save_torch(state["optimizer"], opt_path(log_dir, step))
    save_torch(state, state_path(log_dir, step))


def prune_checkpoints(log_dir, keep):
    """Delete every file of all but the newest `keep` complete checkpoints (keep <= 0: keep all).

    The newest complete checkpoint is always kept. Returns the steps deleted.
    """
    if keep <= 0:
        return []
    steps = complete_steps(log_dir)
    if not steps:
        return []
    oldest_kept = steps[-keep] if keep <= len(steps) else steps[0]
    files = checkpoint_files_by_step(log_dir)
    deleted = sorted(step for step in files if step < oldest_kept)
    for step in deleted:
        # The state file goes first: a checkpoint whose deletion is interrupted is incomplete, never half-valid.
        for name in state_file_first(files[step]):
            os.remove(os.path.join(log_dir, name))
    return deleted


# ----------------------------------------------------------------------------------------------------------------
# The training state


def training_state(*, step, model, ema, optimizer, grad_scaler, schedule_sampler, rng, data, config):
    """The dict stored in stateNNNNNN.pt; every value is a tensor, a primitive or a container of those.

    :param step: optimizer steps the weights have seen.
    :param model: model state_dict (fp32).
    :param ema: {rate as spelled in --ema_rate: EMA state_dict}.
    :param optimizer: optimizer state_dict.
    :param grad_scaler: GradScaler state_dict ({} without fp16).
    :param schedule_sampler: the timestep sampler's state_dict (loss history of loss-second-moment).
    :param rng: per-rank list of `capture_rng_state()` results, indexed by rank.
    :param data: the data iterator's state_dict (position of the next batch).
    :param config: the resolved flags (dict of primitives).
    """
    return dict(
        format=TRAINING_STATE_FORMAT,
        version=TRAINING_STATE_VERSION,
        step=int(step),
        model=model,
        ema=dict(ema),
        optimizer=optimizer,
        grad_scaler=dict(grad_scaler),
        schedule_sampler=dict(schedule_sampler),
        rng=list(rng),
        data=dict(data),
        config=dict(config),
    )


def is_training_state(obj):
    return isinstance(obj, dict) and obj.get("format") == TRAINING_STATE_FORMAT


def capture_rng_state():
    """This process's random states (torch CPU and CUDA, numpy, Python) as tensors and primitives."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_rng_state(state):
    """Inverse of `capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))


# ----------------------------------------------------------------------------------------------------------------
# Resuming


@dataclass
class ResumePoint:
    """What a resume starts from.

    :param step: optimizer steps the weights have seen.
    :param model: model state_dict.
    :param ema: {rate: EMA state_dict} for the rates found (missing rates start from the model weights).
    :param optimizer: optimizer state_dict, or None when not found.
    :param state: the whole training state for an exact resume, or None for a reference-style model file.
    :param source: the file the weights came from.
    :param changed_flags: [(flag, checkpoint's value, run's value)] of the allowed flag changes, for the log.
    """

    step: int
    model: dict
    ema: dict = field(default_factory=dict)
    optimizer: dict = None
    state: dict = None
    source: str = ""
    changed_flags: list = field(default_factory=list)

    @property
    def log_dir(self):
        return os.path.dirname(os.path.abspath(self.source))


def load_resume_point(path, ema_rates, config=None, may_change=frozenset(), defaults=None):
    """Find and read what `--resume_checkpoint path` names; every rank calls this.

    Every rank reads the files itself, with no collective (the reference's rank-0-only load hung multi-GPU runs:
    docs/compatibility.md, "Reference defects fixed here" #3).

    :param path: a training-state file (stateNNNNNN.pt), a reference modelNNNNNN.pt (its EMA and optimizer files
        are looked up beside it, with a warning for each one missing), or a log dir (`newest_readable_checkpoint`).
    :param ema_rates: rates (strings as in --ema_rate) the run keeps.
    :param config: the run's resolved flags; when given, they are checked against the checkpoint's (the state
        file's, or the config.yaml beside a reference-style file) with `check_resume_config`.
    :param may_change: names of the flags that may differ from the checkpoint's (see `check_resume_config`).
    :param defaults: flag defaults for flags the checkpoint's config lacks (see `check_resume_config`).
    :raises ValueError: for files that do not say their step (ema_/opt files, renamed files), or a flag outside
        `may_change` that differs from the checkpoint's; UnreadableCheckpointError for a file torch cannot read.
    """
    from_folder = os.path.isdir(path)
    if from_folder:
        path = newest_readable_checkpoint(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume_checkpoint {path!r} does not exist")
    try:
        loaded = read_checkpoint_file(path, "--resume_checkpoint")
    except UnreadableCheckpointError as err:
        if from_folder:
            raise
        folder = os.path.dirname(os.path.abspath(path))
        raise UnreadableCheckpointError(
            f"{err}. (--resume_checkpoint {folder} resumes from the newest readable checkpoint there)"
        ) from None
    if is_training_state(loaded):
        point = _resume_from_state(loaded, path, ema_rates)
        saved_config = loaded["config"]
    else:
        point = _resume_from_reference_files(loaded, path, ema_rates)
        saved_config = read_config(point.log_dir)
    if config is not None and saved_config is not None:
        point.changed_flags = check_resume_config(saved_config, config, may_change, source=path, step=point.step,
                                                  defaults=defaults)
    return point


def resolve_auto_resume(log_dir):
    """What `--resume_checkpoint auto` resumes from: the state file of `log_dir`'s newest readable complete checkpoint
    (`newest_readable_checkpoint`), or "" (start fresh) when `log_dir` does not exist or holds none. Incomplete
    checkpoints and temporary files are ignored, so a job requeued after being killed at any moment reruns the same
    command."""
    if not os.path.isdir(log_dir) or not complete_steps(log_dir):
        return ""
    return newest_readable_checkpoint(log_dir)


def newest_readable_checkpoint(log_dir):
    """The file a resume from `log_dir` reads: the state file of its newest complete checkpoint whose files all
    open, else (no complete checkpoint at all) its newest reference-style modelNNNNNN.pt whose files open.

    A newer checkpoint with a file that does not open (truncated by a full disk, a failed copy) is skipped with a
    warning naming the file, and its files are renamed to NAME.unreadable, so that training can write that step
    again. Each rank may call this: a file another rank renamed meanwhile counts as unreadable, and renaming is
    idempotent.

    :raises FileNotFoundError: when `log_dir` holds no checkpoint.
    :raises UnreadableCheckpointError: when none of its checkpoints opens (then nothing is renamed).
    """
    steps, path_of = complete_steps(log_dir), state_path
    if not steps:
        steps, path_of = sorted(int(m.group(1)) for m in map(_MODEL_FILE.match, os.listdir(log_dir)) if m), model_path
    if not steps:
        raise FileNotFoundError(
            f"--resume_checkpoint {log_dir!r} is a directory without checkpoints (stateNNNNNN.pt or modelNNNNNN.pt)"
        )
    skipped = []
    for step in reversed(steps):
        problem = _unreadable_file(log_dir, step, path_of(log_dir, step))
        if problem is None:
            for skipped_step, (name, reason) in skipped:
                warnings.warn(
                    f"{os.path.join(log_dir, name)} is unreadable ({reason}): skipping checkpoint {skipped_step} "
                    f"(its files are renamed to *{UNREADABLE_SUFFIX}); resuming from checkpoint {step}",
                    stacklevel=3,
                )
                _set_aside(log_dir, skipped_step)
            return path_of(log_dir, step)
        skipped.append((step, problem))
    problems = "; ".join(f"{name}: {reason}" for _, (name, reason) in skipped)
    raise UnreadableCheckpointError(f"--resume_checkpoint {log_dir}: none of its checkpoints can be read ({problems})")


def _unreadable_file(log_dir, step, resume_file):
    """(file name, reason) of the first file of checkpoint `step` that torch cannot open (`torch_file_problem`), else
    None.

    :param resume_file: the file a resume would read (state or model file), which must be there.
    """
    names = state_file_first(checkpoint_files_by_step(log_dir).get(step, []))
    if os.path.basename(resume_file) not in names:
        return os.path.basename(resume_file), _GONE
    for name in names:
        try:
            problem = torch_file_problem(os.path.join(log_dir, name))
        except FileNotFoundError:
            problem = _GONE
        if problem:
            return name, problem
    return None


def _set_aside(log_dir, step):
    """Rename every file of checkpoint `step` to NAME.unreadable, the state file first (so the step is incomplete
    at once); files another rank renamed already are skipped."""
    for name in state_file_first(checkpoint_files_by_step(log_dir).get(step, [])):
        path = os.path.join(log_dir, name)
        try:
            os.replace(path, path + UNREADABLE_SUFFIX)
        except FileNotFoundError:
            pass


def _resume_from_state(state, path, ema_rates):
    if state["version"] != TRAINING_STATE_VERSION:
        raise ValueError(
            f"{path} is a training state of version {state['version']}; this code reads version "
            f"{TRAINING_STATE_VERSION}"
        )
    ema = {rate: state["ema"][rate] for rate in ema_rates if rate in state["ema"]}
    _warn_ema_rates(path, ema_rates, ema, unused=sorted(set(state["ema"]) - set(ema_rates)))
    return ResumePoint(
        step=state["step"], model=state["model"], ema=ema, optimizer=state["optimizer"], state=state, source=path
    )


def _resume_from_reference_files(model_state, path, ema_rates):
    name = os.path.basename(path)
    match = _MODEL_FILE.match(name)
    if match is None:
        raise ValueError(
            f"--resume_checkpoint {path!r}: cannot tell which step this file holds. Pass a "
            "stateNNNNNN.pt, a modelNNNNNN.pt (its ema_ and opt files are read from beside it) or a log dir. "
            "To start from released weights at step 0, copy them to model000000.pt"
        )
    step = int(match.group(1))
    log_dir = os.path.dirname(os.path.abspath(path))
    ema = {}
    for rate in ema_rates:
        candidate = ema_path(log_dir, rate, step)
        if os.path.isfile(candidate):
            ema[rate] = read_checkpoint_file(candidate)
    _warn_ema_rates(path, ema_rates, ema, unused=[])
    optimizer = None
    if os.path.isfile(opt_path(log_dir, step)):
        optimizer = read_checkpoint_file(opt_path(log_dir, step))
    else:
        warnings.warn(f"{opt_path(log_dir, step)} not found: the optimizer starts afresh", stacklevel=3)
    warnings.warn(
        f"resuming from the reference-style file {path}: random states, data position, loss scale and sampler "
        "history are not stored there, so this resume is not exact",
        stacklevel=3,
    )
    return ResumePoint(step=step, model=model_state, ema=ema, optimizer=optimizer, source=path)


def _warn_ema_rates(path, ema_rates, found, unused):
    for rate in ema_rates:
        if rate not in found:
            warnings.warn(f"{path}: no EMA at rate {rate}; it starts from the model weights", stacklevel=4)
    if unused:
        warnings.warn(f"{path}: EMA rate(s) {', '.join(unused)} not in --ema_rate are dropped", stacklevel=4)


def check_resume_config(saved, current, may_change, source, step, defaults=None):
    """Refuse a resume that changes the maths; return the allowed changes.

    A flag the checkpoint's config lacks (added since it was written) is compared through its default in `defaults`,
    which is what the code that wrote the checkpoint did; flags without a default there, and flags removed since,
    are not compared.

    :param saved: the checkpoint's resolved flags {flag: value}.
    :param current: the resumed run's resolved flags.
    :param may_change: names of the flags that may differ (where files go, when to log, save or stop, speed):
        every other flag changes what is trained, so a resume with another value would silently switch the
        objective mid-run.
    :param source, step: the checkpoint file and its step, for the message.
    :param defaults: {flag: default value} of the resuming script, for flags the checkpoint's config lacks.
    :return: [(flag, saved value, current value)] of the flags in `may_change` that differ, in name order.
    :raises ValueError: naming every other differing flag with both values, and what to do.
    """
    saved = {**{key: value for key, value in (defaults or {}).items() if key in current}, **saved}
    changed = [(key, saved[key], current[key]) for key in sorted(saved.keys() & current.keys())
               if saved[key] != current[key]]
    forbidden = [f"--{key} {old!r} in the checkpoint vs {new!r} now" for key, old, new in changed
                 if key not in may_change]
    if forbidden:
        raise ValueError(
            f"cannot resume from {source}: flags that change what is trained differ from the checkpoint's "
            f"({'; '.join(forbidden)}). To resume, pass the checkpoint's values (e.g. --config "
            f"{os.path.join(os.path.dirname(source), CONFIG_FILE)}, the flags of the run that last trained there); "
            "flags such as --max_steps, --save_interval or --log_interval may change. To use the new values, "
            f"{restart_advice(os.path.dirname(source), step)}"
        )
    return [change for change in changed if change[0] in may_change]


def restart_advice(log_dir, step):
    """How to train on from checkpoint `step` with flags a resume may not change: a new run from its weights."""
    return (
        f"start a new run from its weights: copy {model_path(log_dir, step)} and its ema_ files into a new folder, "
        "renamed to step 0 (model000000.pt, ema_<rate>_000000.pt), and pass --resume_checkpoint that folder"
    )


def state_dict_fingerprint(state):
    """SHA-256 of a state (a state_dict, or nested dicts/lists of tensors and primitives): equal iff bit-identical.

    Hashes every tensor's name, dtype, shape and bytes and every other value's repr, in key order. A flat
    state_dict's fingerprint names the weights whatever file or format held them (sample folders record it).
    """
    digest = hashlib.sha256()
    _add_to_digest(digest, "", state)
    return digest.hexdigest()


def _add_to_digest(digest, name, value):
    if torch.is_tensor(value):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            _add_to_digest(digest, f"{name}.{key}" if name else str(key), value[key])
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _add_to_digest(digest, f"{name}[{index}]", item)
    else:
        digest.update(f"{name}={value!r};".encode())
