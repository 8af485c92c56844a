"""Run a paired-seed ablation study of loss weightings: every arm x every seed trained, evaluated and compared.

    python scripts/ablate.py --config configs/studies/emoji_cpu.yaml --out_dir studies/emoji_cpu
    python scripts/ablate.py --config configs/studies/emoji_cpu.yaml --out_dir studies/quick --seeds 0 1 \
        --max_steps 500 --eval_steps 250 500
    python scripts/ablate.py --base_config configs/demo.yaml --arms baseline p2:gamma=1 min_snr:snr_gamma=5 \
        --seeds 0 1 2 --out_dir studies/mine

Flag values: the defaults (--help) -> --config STUDY.yaml (the same keys; base_config relative to that file) ->
command-line flags. An arm is `baseline` (P2 with gamma 0: the plain ε-MSE of the hybrid loss) or a --weighting of
image_train.py with parameters: `p2:gamma=0.5,k=1`, `min_snr:snr_gamma=5`, `p2:gamma=1,normalize=true` (gamma, k,
normalize are short for p2_gamma, p2_k, normalize_weights; any other training flag may be set too, e.g. lr=1e-3).
The differences to the baseline arm (`baseline` if listed, else the first arm) are paired by seed: arms with one seed
start from the same weights and see the same batches, timesteps and noise (guided_diffusion/ablation.py).

Steps (each resumable: rerun the same command after a kill or Ctrl-C, and nothing finished is done again):
1. training: every (arm, seed) is an image_train.py log dir <out_dir>/runs/<arm>_s<seed>/ trained in a subprocess
   (output in <out_dir>/logs/), checkpointed at every --eval_steps step; --jobs J trains J runs at once on one
   machine, each with cores/J torch threads;
2. evaluation: for every run and eval step, --num_samples images from the EMA checkpoint with one sampler and the
   same sample seeds for every run; Inception features cached in <out_dir>/evals/<run>/step<N>.npz, scores in .json;
3. statistics: per arm and step, FID and KID (unbiased MMD², clean-fid's kernel, all images) averaged over seeds,
   with percentile bootstrap intervals over seeds and images, and the paired difference to the baseline arm with
   its interval and the number of seeds it wins (guided_diffusion/study_stats.py says what the intervals cover).
Outputs in --out_dir: study.md (tables), study.csv (long format: guided_diffusion/study_report.py), study.json
(everything: flags, arms, per-run scores and ε-MSE per stage, versions), study_fid.png (FID against images seen,
with bands) and study_mse.png (unweighted ε-MSE per SNR stage at the end of training).
"""

import os

from tqdm.auto import tqdm

from guided_diffusion import dist_util
from guided_diffusion.ablation import (
    BASELINE,
    check_study,
    is_finished,
    parse_study_args,
    plan_runs,
    study_parser,
    train_runs,
)
from guided_diffusion.cli import script_main
from guided_diffusion.study_eval import StudyEvaluator, sampler_fields
from guided_diffusion.study_report import summarise, write_report


def parse_args(argv=None):
    return parse_study_args(study_parser(__doc__), argv)


def run(args):
    """Train, evaluate and compare; returns the summary {step: {metric: {arm: ...}}}."""
    arms = check_study(args)
    sampler_fields(args)  # a bad sampler fails before hours of training
    baseline = next((arm.spec for arm in arms if arm.spec == BASELINE), arms[0].spec)
    runs = plan_runs(arms, args.seeds, args.out_dir)
    os.makedirs(args.out_dir, exist_ok=True)
    evaluator = StudyEvaluator(args, str(dist_util.dev()))  # loads the feature network: fails before training
    todo = len(runs) * (1 + len(args.eval_steps))
    with tqdm(total=todo, desc="study", unit="task", dynamic_ncols=True) as bar:
        bar.update(sum(1 for step in args.eval_steps for r in runs if evaluator.cached(r, step) is not None))
        bar.update(sum(1 for r in runs if is_finished(r, args.max_steps)))
        train_runs(runs, args, on_finished=lambda finished: bar.update(1))
        evaluations = []
        for run_ in runs:
            for step in sorted(args.eval_steps):
                cached = evaluator.cached(run_, step) is not None
                evaluations.append(evaluator.evaluate(run_, step))
                if not cached:
                    bar.update(1)
    summary = summarise(args, arms, runs, evaluator, baseline)
    text = write_report(args, arms, runs, summary, evaluations, baseline)
    print(text + f"wrote {args.out_dir}/study.md, study.csv, study.json, study_fid.png, study_mse.png")
    return summary


@script_main(interrupted="rerun the same command to resume the study")
def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
