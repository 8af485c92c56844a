"""Paired-seed ablation studies of the loss weighting (scripts/ablate.py): study flags, arms, and the training runs.

A study trains every arm (a weighting and its parameters) with every seed on one base training config. Each
(arm, seed) is an ordinary image_train.py log dir `<out_dir>/runs/<arm slug>_s<seed>/`, trained in a subprocess
with `--resume_checkpoint auto`, so a killed study resumes every run where its newest checkpoint left it and never
trains a finished run again (finished: the checkpoint of --max_steps exists).

Pairing: image_train.py seeds the initial weights from --seed before anything else draws, then the timestep and
noise streams from (seed, rank), and the data order from --seed; the weighting is a float64 table built without
drawing random numbers, so two arms with one seed see the same weights, batches, t and noise, and only the loss
weights differ. The loss-second-moment schedule sampler would break this (its t depend on the arm's losses), so a
study needs --schedule_sampler uniform.
"""

import argparse
import dataclasses
import math
import os
import re
import subprocess
import sys
import time

from . import checkpoint
from .cli import OneLineArgumentParser
from .evaluation import DEFAULT_CACHE_DIR
from .script_util import parse_args, read_config_file, str2bool, train_flag_defaults
from .weighting import WEIGHTINGS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(REPO_ROOT, "scripts", "image_train.py")
BASELINE = "baseline"
ARM_NAMES = (BASELINE,) + WEIGHTINGS
# Short parameter names of an arm, and the parameters each weighting has (docs/weightings.md).
SHORT_KEYS = {"gamma": "p2_gamma", "k": "p2_k", "normalize": "normalize_weights"}
WEIGHTING_PARAMETERS = {
    "p2": ("p2_gamma", "p2_k"),
    "min_snr": ("snr_gamma",),
    "soft_min_snr": ("sigma_data",),
    "sigmoid": ("sigmoid_bias",),
    "edm": ("sigma_data",),
    "constant": (),
}
# Flags the runner sets for every run itself: an arm may not set them.
RUNNER_FLAGS = ("config", "log_dir", "seed", "max_steps", "save_interval", "resume_checkpoint", "eval_interval",
                "keep_checkpoints", "schedule_sampler")


def study_defaults():
    """Every study flag with its default (a study YAML holds the same keys)."""
    return {
        "base_config": "",              # image_train.py YAML of every run (relative paths: to the study file)
        "arms": [BASELINE, "p2:gamma=1"],  # arm specs, e.g. baseline p2:gamma=0.5,k=1 min_snr:snr_gamma=5
        "seeds": [0, 1, 2],             # training seeds; arms with one seed are paired
        "max_steps": 2000,              # training steps of every run
        "eval_steps": [1000, 2000],     # steps whose EMA checkpoint is evaluated (each <= max_steps)
        "num_samples": 500,             # images per evaluation
        "sampler": "ddim",              # one fixed sampler for every evaluation: ddim or ancestral (respaced), or
        "sampler_steps": 25,            # dpm++2m, dpm++2m_sde, heun; its steps
        "step_schedule": "",            # time|logsnr|karras for the few-step samplers; "" = the sampler's default
        "sample_seed": 0,               # sample i of every run starts from the noise of (sample_seed, i)
        "eval_batch_size": 64,          # images per sampling batch
        "reference": "",                # reference images or statistics for FID/KID; "" = the base config's data
        "mode": "clean",                # clean-fid preprocessing mode
        "inception_path": "",           # clean-fid's inception-2015-12-05.pt (offline machines)
        "cache_dir": DEFAULT_CACHE_DIR,  # reference statistics cache
        "bootstrap_draws": 1000,        # bootstrap resamples of every confidence interval
        "ci_level": 0.95,               # confidence level of the percentile intervals
        "bootstrap_seed": 0,            # the resamples are drawn from this seed: reruns give the same intervals
        "jobs": 1,                      # runs trained at once, each a process with cores/jobs torch threads
        "out_dir": "",                  # study folder (required)
    }


_LIST_TYPES = {"arms": str, "seeds": int, "eval_steps": int}


def study_parser(description):
    """The parser of scripts/ablate.py: --config STUDY.yaml and one flag per study_defaults() entry."""
    parser = OneLineArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="", help="study YAML (keys: the flags below); flags override it")
    for key, default in study_defaults().items():
        if key in _LIST_TYPES:
            parser.add_argument(f"--{key}", nargs="+", type=_LIST_TYPES[key], default=default)
        else:
            kind = str2bool if isinstance(default, bool) else type(default)
            parser.add_argument(f"--{key}", type=kind, default=default)
    return parser


def parse_study_args(parser, argv=None):
    """Namespace of the study: defaults -> --config YAML -> flags, checked; base_config made absolute (a relative
    path in the YAML is taken relative to the YAML file, on the command line relative to the working folder)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(parser, argv)
    if args.config and not _given_on_command_line(argv, "base_config") and not os.path.isabs(args.base_config):
        args.base_config = os.path.join(os.path.dirname(os.path.abspath(args.config)), args.base_config)
    check_study(args)
    args.base_config = os.path.abspath(args.base_config)
    args.out_dir = os.path.abspath(args.out_dir)
    return args


def _given_on_command_line(argv, flag):
    return any(token == f"--{flag}" or token.startswith(f"--{flag}=") for token in argv)


def check_study(args):
    """Refuse a study that cannot run as asked, naming the flag and what to do.

    :raises ValueError: or FileNotFoundError for a missing base config.
    """
    if not args.out_dir:
        raise ValueError("--out_dir is required (the study folder; rerun with the same one to resume)")
    if not args.base_config:
        raise ValueError("--base_config is required (the image_train.py YAML every run trains with)")
    base = read_config_file(args.base_config)
    if base.get("schedule_sampler", "uniform") != "uniform":
        raise ValueError(
            f"--base_config {args.base_config}: schedule_sampler {base['schedule_sampler']!r} draws t from each arm's "
            "own losses, so arms with one seed would not be paired; use schedule_sampler: uniform"
        )
    if args.max_steps < 1:
        raise ValueError(f"--max_steps {args.max_steps} must be >= 1")
    bad_steps = [s for s in args.eval_steps if not 1 <= s <= args.max_steps]
    if bad_steps or not args.eval_steps:
        raise ValueError(f"--eval_steps {' '.join(map(str, args.eval_steps))}: each must lie in 1..--max_steps "
                         f"({args.max_steps})")
    if len(set(args.seeds)) != len(args.seeds) or any(s < 0 for s in args.seeds):
        raise ValueError(f"--seeds {' '.join(map(str, args.seeds))}: give distinct seeds >= 0")
    for flag, minimum in (("num_samples", 2), ("eval_batch_size", 1), ("bootstrap_draws", 1), ("jobs", 1)):
        if getattr(args, flag) < minimum:
            raise ValueError(f"--{flag} {getattr(args, flag)} must be >= {minimum}")
    if not 0 < args.ci_level < 1:
        raise ValueError(f"--ci_level {args.ci_level} must lie strictly between 0 and 1 (e.g. 0.95)")
    arms = [parse_arm(spec) for spec in args.arms]
    slugs = [arm.slug for arm in arms]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"--arms {' '.join(args.arms)}: an arm is listed twice")
    return arms


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm of a study: its spec as written, a folder-safe slug, and the image_train.py flags it sets."""

    spec: str
    slug: str
    flags: dict

    def argv(self):
        """The arm's flags as image_train.py tokens."""
        return [token for key, value in self.flags.items() for token in (f"--{key}", str(value))]


def parse_arm(spec):
    """An Arm from "name" or "name:key=value,key=value".

    name: `baseline` (P2 with gamma 0: the plain ε-MSE of the hybrid loss) or a --weighting. Keys: gamma, k,
    normalize (short for p2_gamma, p2_k, normalize_weights), the parameters of the weighting named, and any other
    training flag except those the runner sets (RUNNER_FLAGS). Weightings other than p2 get p2_gamma 0, since the
    base config may carry a P2 gamma.
    :raises ValueError: naming the arm, the bad part and the valid choices.
    """
    name, _, rest = spec.strip().partition(":")
    if name not in ARM_NAMES:
        raise ValueError(f"arm {spec!r}: {name!r} is not an arm name; use one of {', '.join(ARM_NAMES)}")
    weighting = "p2" if name == BASELINE else name
    flags = {"weighting": weighting}
    if weighting != "p2":
        flags["p2_gamma"] = 0.0
    defaults = train_flag_defaults()
    other_parameters = {p for w, ps in WEIGHTING_PARAMETERS.items() if w != weighting for p in ps}
    other_parameters -= set(WEIGHTING_PARAMETERS[weighting])
    for item in filter(None, (part.strip() for part in rest.split(","))) if rest else []:
        key, equals, text = item.partition("=")
        key = SHORT_KEYS.get(key.strip(), key.strip())
        if not equals or not text.strip():
            raise ValueError(f"arm {spec!r}: {item!r} is not key=value (e.g. p2:gamma=0.5,k=1)")
        valid = sorted(set(SHORT_KEYS) | set(WEIGHTING_PARAMETERS[weighting]) | {"normalize_weights"})
        if key not in defaults or key in RUNNER_FLAGS or key == "weighting":
            raise ValueError(f"arm {spec!r}: {key!r} is not a key an arm can set; use {', '.join(valid)} or a "
                             "training flag of image_train.py (not one the study sets for every run: "
                             f"{', '.join(RUNNER_FLAGS)})")
        if key in other_parameters or (name == BASELINE and key in ("p2_gamma", "p2_k")):
            raise ValueError(f"arm {spec!r}: {key} is not a parameter of {name}; its keys: "
                             f"{', '.join(k for k in valid if name != BASELINE or k == 'normalize')}")
        flags[key] = _convert(key, text.strip(), defaults[key], spec)
    if name == BASELINE:
        flags["p2_gamma"] = 0.0
    return Arm(spec=spec.strip(), slug=arm_slug(spec), flags=flags)


def _convert(key, text, default, spec):
    kind = str2bool if isinstance(default, bool) else type(default)
    try:
        return kind(text)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
        raise ValueError(f"arm {spec!r}: {key}={text!r} is not a valid {kind.__name__} ({err})") from None


def arm_slug(spec):
    """A folder-safe name of an arm spec: "p2:gamma=0.5,k=1" -> "p2_gamma0p5_k1"."""
    slug = spec.strip().replace(":", "_").replace(",", "_").replace("=", "").replace(".", "p")
    return re.sub(r"[^A-Za-z0-9_+-]", "-", slug)


# ---------------------------------------------------------------------------------------------------------------
# Runs


@dataclasses.dataclass(frozen=True)
class Run:
    """One (arm, seed) of a study and its image_train.py log dir."""

    arm: Arm
    seed: int
    log_dir: str

    @property
    def name(self):
        return os.path.basename(self.log_dir)


def plan_runs(arms, seeds, out_dir):
    """Every (arm, seed), seed-major (the first seed of every arm trains first, so a partial study is paired)."""
    return [Run(arm, seed, os.path.join(out_dir, "runs", f"{arm.slug}_s{seed}")) for seed in seeds for arm in arms]


def save_interval(eval_steps, max_steps):
    """The --save_interval that leaves a checkpoint at every eval step and at max_steps: their gcd."""
    return math.gcd(*eval_steps, max_steps)


def is_finished(run, max_steps):
    return os.path.isdir(run.log_dir) and max_steps in checkpoint.complete_steps(run.log_dir)


def train_command(run, args):
    """The image_train.py command of `run` (the venv's python), resumable with the same command."""
    return [
        sys.executable, TRAIN_SCRIPT, "--config", args.base_config, "--log_dir", run.log_dir,
        "--seed", str(run.seed), "--max_steps", str(args.max_steps),
        "--save_interval", str(save_interval(args.eval_steps, args.max_steps)),
        "--resume_checkpoint", "auto", "--eval_interval", "0", "--keep_checkpoints", "0",
        "--schedule_sampler", "uniform", *run.arm.argv(),
    ]


def train_environment(jobs):
    """The environment of a training subprocess: with several jobs, cores/jobs threads each."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH", "")]))
    if jobs > 1:
        threads = str(max(1, (os.cpu_count() or 1) // jobs))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    return env


class RunFailed(ValueError):
    """A training run of the study ended with an error (its log says which)."""


def train_runs(runs, args, on_finished=lambda run: None, poll_s=0.5):
    """Train the unfinished runs, `args.jobs` at a time; each one's output goes to <out_dir>/logs/<run>.txt.

    :param on_finished: called with each run as it finishes (e.g. to advance a progress bar).
    :raises RunFailed: when a run fails (after the other running ones ended), naming its log.
    """
    todo = [run for run in runs if not is_finished(run, args.max_steps)]
    logs_dir = os.path.join(args.out_dir, "logs")
    os.makedirs(logs_dir, exist_ok=True)
    env = train_environment(args.jobs)
    running, failed = [], []
    try:
        while todo or running:
            while todo and len(running) < args.jobs and not failed:
                run = todo.pop(0)
                log_path = os.path.join(logs_dir, f"{run.name}.txt")
                with open(log_path, "a") as log:
                    process = subprocess.Popen(train_command(run, args), stdout=log, stderr=subprocess.STDOUT,
                                               env=env, cwd=REPO_ROOT)
                running.append((run, process, log_path))
            if failed and not running:
                break
            time.sleep(poll_s)
            for entry in list(running):
                run, process, log_path = entry
                if process.poll() is None:
                    continue
                running.remove(entry)
                if process.returncode == 0 and is_finished(run, args.max_steps):
                    on_finished(run)
                else:
                    failed.append((run, process.returncode, log_path))
    finally:
        for _, process, _ in running:  # an interrupt: the runs stop with a checkpoint (image_train.py's SIGINT)
            process.wait()
    if failed:
        run, code, log_path = failed[0]
        raise RunFailed(f"training run {run.log_dir} failed (exit code {code}); its output is in {log_path}:\n"
                           + _tail(log_path))


def _tail(path, lines=15):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])
