"""FID/KID during training (the paper's Fig. 4): sample with the EMA weights and score against a reference.

Every `eval_interval` steps the TrainLoop hands the EMA model to `TrainingEvaluator`. Each rank generates its share
of the `num_samples` images (same seeds at every evaluation, so the curve shows the model changing, not the noise),
rank 0 gathers them and computes the metrics with clean-fid (guided_diffusion/evaluation.py); the reference's
statistics are computed once and cached. The feature network is loaded when the evaluator is built, so a missing
Inception file stops the run before training starts, not hours into it.
"""

import numpy as np
import torch.distributed as dist

from . import evaluation, inception
from .sampler_flags import resolve_sampler
from .sampling import SamplingOptions, generate_batch, plan_batches

EVAL_SEED = 0  # the same noise at every evaluation


class TrainingEvaluator:
    """Samples `num_samples` images from a model and returns FID/KID against `reference` (on rank 0).

    :param diffusion: the (respaced) diffusion to sample with.
    :param options: SamplingOptions (image size, DDIM, precision, class conditioning).
    :param reference: what evaluation.evaluate accepts as a reference.
    :param rank, world_size: this process's place; rank 0 computes the metrics.
    """

    def __init__(
        self,
        *,
        diffusion,
        options,
        num_samples,
        batch_size,
        reference,
        metrics="fid,kid",
        mode="clean",
        inception_path=None,
        cache_dir=evaluation.DEFAULT_CACHE_DIR,
        device="cpu",
        rank=0,
        world_size=1,
    ):
        if num_samples < 2:
            raise ValueError(f"--eval_samples {num_samples} must be >= 2 (FID needs a covariance)")
        if batch_size < 1:
            raise ValueError(f"--eval_batch_size {batch_size} must be >= 1")
        self.diffusion = diffusion
        self.options = options
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.reference = reference
        self.metrics = evaluation.check_metrics(metrics)
        self.cache_dir = cache_dir
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.network = inception.load_feature_network(mode, inception_path or None, device) if rank == 0 else None

    def __call__(self, model):
        """Scores of `model` (eval mode, on the device): {"fid", "kid", "kid_x1e3", "eval_samples"} on rank 0, and
        "eval_reference_unreadable" (reference images skipped as unreadable) for a folder or zip reference; None on
        other ranks. Every rank must call it."""
        images = self._generate(model)
        if self.world_size > 1:
            gathered = [None] * self.world_size if self.rank == 0 else None
            dist.gather_object(images, gathered, dst=0)
            images = np.concatenate(gathered) if self.rank == 0 else None
        if self.rank != 0:
            return None
        results = evaluation.evaluate(
            images,
            self.reference,
            self.network,
            metrics=self.metrics,
            cache_dir=self.cache_dir,
            device=self.device,
        )
        scores = {key: results[key] for key in ("fid", "kid", "kid_x1e3") if results[key] is not None}
        if results["num_reference_unreadable"] is not None:
            scores["eval_reference_unreadable"] = results["num_reference_unreadable"]
        return {**scores, "eval_samples": self.num_samples}

    def _generate(self, model):
        """This rank's samples, uint8 [n, H, W, 3], in global-index order of its batches."""
        rounds = plan_batches(range(self.num_samples), self.batch_size, self.world_size)
        mine = [batches[self.rank] for batches in rounds if self.rank < len(batches)]
        shape = (0, self.options.image_size, self.options.image_size, 3)
        images = [generate_batch(model, self.diffusion, indices, self.options, self.device)[0] for indices in mine]
        return np.concatenate(images) if images else np.zeros(shape, dtype=np.uint8)


def sampling_options(image_size, class_cond, use_ddim, precision, sampler="", steps=0, step_schedule=""):
    """SamplingOptions of in-training evaluation (fixed seed, eta 0, clipped x0).

    :param sampler, steps, step_schedule: --eval_sampler, --eval_steps, --eval_step_schedule; a few-step sampler
        (guided_diffusion/ode_samplers.py) ignores `use_ddim` (--eval_use_ddim, True by default).
    """
    choice = resolve_sampler(sampler or ("ddim" if use_ddim else "ancestral"), steps, step_schedule, prefix="eval_")
    return SamplingOptions(image_size=image_size, class_cond=class_cond, precision=precision, seed=EVAL_SEED, **choice)


def evaluation_respacing(options, eval_timestep_respacing):
    """The respacing the evaluation's diffusion is built with: --eval_timestep_respacing for ancestral and DDIM
    sampling, none for a few-step sampler, which places its steps on the full schedule."""
    return "" if options.sampler else eval_timestep_respacing

