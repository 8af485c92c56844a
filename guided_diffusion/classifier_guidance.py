"""Classifier guidance (Dhariwal & Nichol 2021, Sec. 4): steer sampling towards labels y with the gradient of a
noisy-image classifier's log p_φ(y | x_t), scaled by s (--classifier_scale).

The samplers take the gradient as `cond_fn` (docs/compatibility.md, "Samplers"):
    ancestral   mean + s·Σ_t·∇_x log p_φ(y | x_t)             (GaussianDiffusion.condition_mean)
    DDIM        ε - s·√(1 - ᾱ_t)·∇_x log p_φ(y | x_t)          (GaussianDiffusion.condition_score)
Both add exactly zero for s = 0, so a guided run at scale 0 equals the unguided one bit for bit. Each sample's
gradient depends on that sample alone (the classifier has no batch statistics), so per-sample reproducibility
(guided_diffusion/sampling.py) holds with guidance too. The few-step samplers (ode_samplers.py) take no cond_fn.
"""

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


class Guidance(NamedTuple):
    """What guided sampling adds to plain sampling (scripts/image_sample.py's sample): every sample draws a label from
    `num_classes`, `cond_fn` (None: labels only) steers it, and `description` ends the summary line."""

    cond_fn: Callable | None
    num_classes: int
    description: str


def classifier_cond_fn(classifier, scale):
    """The `cond_fn` of the samplers for `classifier` at guidance scale `scale`.

    :param classifier: callable (x [N, C, H, W], timesteps [N]) -> logits [N, K] (an EncoderUNetModel, possibly
        wrapped for autocast); it receives the timesteps the diffusion model receives.
    :return: cond_fn(x, t, y) -> scale·∇_x log softmax(classifier(x, t))[y], float32 [N, C, H, W]. It runs with
        gradients also inside the samplers' inference mode.
    """

    def cond_fn(x, t, y=None, **_):
        if y is None:
            raise ValueError("classifier guidance needs class labels y for the samples")
        # Tensors made in inference mode cannot enter autograd: the inputs are cloned outside it.
        with torch.inference_mode(False), torch.enable_grad():
            x_in = x.detach().clone().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t.clone()).float(), dim=-1)
            selected = log_probs.gather(1, y.clone().view(-1, 1)).sum()
            (gradient,) = torch.autograd.grad(selected, x_in)
        return gradient.float() * scale

    return cond_fn


def label_passing_model(model, class_cond):
    """The diffusion model as the samplers call it when every sample has a label y (for the classifier): y is passed
    on to a class-conditional model and dropped for an unconditional one."""
    if class_cond:
        return model

    def unconditional(x, t, y=None, **kwargs):
        return model(x, t, **kwargs)

    return unconditional


@torch.no_grad()
def log_prob_of_labels(classifier, images, labels, timesteps=None):
    """log p_φ(y | x) of each image under the classifier, float32 [N].

    :param images: [N, C, H, W] in [-1, 1] (x_0, or x_t with `timesteps`).
    :param labels: int64 [N].
    :param timesteps: [N] timesteps the classifier is told (default: 0, clean images).
    """
    if timesteps is None:
        timesteps = torch.zeros(len(images), dtype=torch.long, device=images.device)
    log_probs = F.log_softmax(classifier(images, timesteps).float(), dim=-1)
    return log_probs.gather(1, labels.view(-1, 1)).squeeze(1)


def check_guidance_flags(class_cond, classifier_path, classifier_scale, sampler=""):
    """Refuse a guidance request that cannot be served, before any model is loaded.

    :param class_cond: whether the diffusion model is class-conditional.
    :param sampler: the few-step sampler named (--sampler), "" for ancestral / DDIM.
    """
    if classifier_path and sampler:
        raise ValueError(f"--sampler {sampler} takes no classifier guidance; use the ancestral sampler or "
                         "--use_ddim True (with --timestep_respacing) with --classifier_path")
    if classifier_scale and not classifier_path:
        model = "a class-conditional" if class_cond else "an unconditional"
        raise ValueError(f"--classifier_scale {classifier_scale:g} on {model} model needs --classifier_path (the "
                         "classifier whose gradient guides); pass --classifier_scale 0 to sample without guidance"
                         + ("" if class_cond else ", or use image_sample.py"))
    if not class_cond and not classifier_path:
        raise ValueError("an unconditional model without --classifier_path has no labels to sample for: pass "
                         "--classifier_path, or use image_sample.py")


def guidance_num_classes(model_classes, classifier_classes):
    """The number of labels to draw from: the classifier's classes, which a class-conditional model must share.

    :param model_classes: rows of the diffusion model's label embedding, None for an unconditional model.
    :param classifier_classes: the classifier's outputs, None without a classifier.
    """
    if model_classes and classifier_classes and model_classes != classifier_classes:
        raise ValueError(f"the diffusion model has {model_classes} classes and the classifier {classifier_classes}; "
                         "guidance needs the same labels for both (check --model_path and --classifier_path)")
    return classifier_classes or model_classes
