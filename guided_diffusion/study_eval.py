"""Evaluation of a study's checkpoints: sample the EMA weights of a run at a step with the study's one sampler and
sample seeds, and keep the Inception features of the images (for bootstrapping without resampling) and their FID/KID.

Cache (per run and step, under <out_dir>/evals/<run>/): step<NNNNNN>.npz (features float32 [N, D]) and then
step<NNNNNN>.json (the scores and the settings that made them), both written atomically; the JSON marks a finished
evaluation, which a resumed study reads back instead of sampling again. A cached evaluation made with other
settings (sampler, samples, seeds, reference, feature network) is an error: use the same flags or another out_dir.
"""

import json
import os

import numpy as np

from . import checkpoint, evaluation, inception
from .fileio import write_json
from .image_datasets import DEMO_DATASET
from .model_loading import (
    checkpoint_parser,
    load_model_and_diffusion,
    parse_checkpoint_args,
)
from .sampler_flags import RESPACED_SAMPLERS, resolve_sampler
from .sampling import SamplingOptions, generate_batch, plan_batches
from .script_util import read_config_file
from .study_stats import FeatureSetTerms, ReferenceTerms
from .train_util import parse_ema_rates


def reference_of(args):
    """The study's FID/KID reference: --reference, else the base config's data_dir, else the bundled emoji set."""
    return args.reference or read_config_file(args.base_config).get("data_dir") or DEMO_DATASET


def sampler_fields(args):
    """SamplingOptions fields and the timestep respacing of the study's sampler (a respaced sampler steps through
    `sampler_steps` evenly spaced steps; a few-step sampler places them on the full schedule)."""
    respaced = args.sampler in RESPACED_SAMPLERS
    try:
        fields = resolve_sampler(args.sampler, 0 if respaced else args.sampler_steps, args.step_schedule)
    except ValueError as err:
        raise ValueError(f"--sampler {args.sampler} --sampler_steps {args.sampler_steps}: {err}") from None
    if args.sampler_steps < 1:
        raise ValueError(f"--sampler_steps {args.sampler_steps} must be >= 1")
    return fields, str(args.sampler_steps) if respaced else ""


class StudyEvaluator:
    """Evaluates (run, step) pairs of one study; the feature network and reference statistics are loaded once."""

    def __init__(self, args, device="cpu"):
        self.args = args
        self.device = device
        self.fields, self.respacing = sampler_fields(args)
        self.network = inception.load_feature_network(args.mode, args.inception_path or None, device)
        self.reference = reference_of(args)
        stats, _ = evaluation.reference_statistics(self.reference, self.network, True, args.cache_dir,
                                                   batch_size=args.eval_batch_size, device=device)
        self.reference_terms = ReferenceTerms.from_statistics(stats)
        reference = os.path.abspath(self.reference) if os.path.exists(self.reference) else self.reference
        self.settings = {"sampler": args.sampler, "sampler_steps": args.sampler_steps,
                         "step_schedule": args.step_schedule, "sample_seed": args.sample_seed,
                         "num_samples": args.num_samples, "mode": args.mode, "reference": reference,
                         "feature_network_sha256": self.network.sha256}

    def paths(self, run, step):
        """(features npz, result json) of `run` at `step`."""
        stem = os.path.join(self.args.out_dir, "evals", run.name, f"step{step:06d}")
        return stem + ".npz", stem + ".json"

    def cached(self, run, step):
        """The cached result of (run, step), or None; refused when made with other settings."""
        _, json_path = self.paths(run, step)
        if not os.path.isfile(json_path):
            return None
        with open(json_path) as f:
            result = json.load(f)
        changed = sorted(k for k in self.settings if result["settings"].get(k) != self.settings[k])
        if changed:
            details = "; ".join(f"{k}: cached {result['settings'].get(k)!r}, now {self.settings[k]!r}" for k in changed)
            raise ValueError(f"{json_path} was evaluated with other settings ({details}); rerun with the study's "
                             "flags, or use another --out_dir")
        return result

    def evaluate(self, run, step):
        """The result dict of (run, step): fid, kid, kid_x1e3 and where it came from; from the cache if there."""
        result = self.cached(run, step)
        if result is not None:
            return result
        model_path = ema_checkpoint(run.log_dir, step)
        features = self._features(model_path)
        features_path, json_path = self.paths(run, step)
        os.makedirs(os.path.dirname(features_path), exist_ok=True)
        evaluation.save_features(features_path, features)
        terms = FeatureSetTerms(features, self.reference_terms)
        kid = terms.kid()
        result = {"run": run.name, "arm": run.arm.spec, "seed": run.seed, "step": step, "fid": terms.fid(), "kid": kid,
                      "kid_x1e3": kid * 1e3, "checkpoint": model_path, "features": os.path.basename(features_path),
                      "settings": self.settings}
        write_json(json_path, result)
        return result

    def features(self, run, step):
        """The cached features [N, D] of (run, step)."""
        return evaluation.load_features(self.paths(run, step)[0])

    def terms(self, run, step):
        """FeatureSetTerms of the cached features of (run, step) (study_stats: FID and KID of resamples)."""
        return FeatureSetTerms(self.features(run, step), self.reference_terms)

    def _features(self, model_path):
        parser = checkpoint_parser("", {"model_path": ""})
        model_args = parse_checkpoint_args(parser, ["--model_path", model_path,
                                                    "--timestep_respacing", self.respacing])
        model, diffusion, _ = load_model_and_diffusion(model_args)
        options = SamplingOptions(image_size=model_args.image_size, class_cond=model_args.class_cond,
                                  num_classes=model.num_classes or 0, seed=self.args.sample_seed, **self.fields)
        rounds = plan_batches(range(self.args.num_samples), self.args.eval_batch_size, 1)
        images = np.concatenate([generate_batch(model, diffusion, batches[0], options, self.device)[0]
                                 for batches in rounds])
        return evaluation.image_features(images, self.network, batch_size=self.args.eval_batch_size,
                                         device=self.device, description="features")


def ema_checkpoint(log_dir, step):
    """The EMA weights file of the first --ema_rate of the run in `log_dir` at `step`."""
    rate = parse_ema_rates(checkpoint.read_config(log_dir)["ema_rate"])[0]
    path = checkpoint.ema_path(log_dir, rate, step)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the run has no checkpoint at step {step}; delete {log_dir} "
                                "to train it again")
    return path
