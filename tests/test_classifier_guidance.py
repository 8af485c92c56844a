"""Classifier guidance in the samplers: the gradient cond_fn, the mean shift (ancestral) and the score correction
(DDIM) against their formulas, scale 0 equal to unguided sampling bit for bit, per-sample reproducibility, and the
requests that are refused."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from classifier_fixtures import tiny_classifier
from sample_tiny_model import perturb_, tiny_model_and_diffusion

from guided_diffusion.classifier_guidance import (
    check_guidance_flags,
    classifier_cond_fn,
    guidance_num_classes,
    label_passing_model,
    log_prob_of_labels,
)
from guided_diffusion.sampling import (
    PerSampleGenerator,
    SamplingArgumentError,
    SamplingOptions,
    generate_batch,
)

LABELS = torch.tensor([0, 1, 1])


@pytest.fixture(scope="module")
def setup():
    """A tiny unconditional U-Net with learned sigmas (10 of T = 50 steps) and a tiny random classifier."""
    model, diffusion = tiny_model_and_diffusion(learn_sigma=True, timestep_respacing="10")
    classifier = perturb_(tiny_classifier(), seed=3).eval().requires_grad_(False)
    return label_passing_model(perturb_(model).eval(), class_cond=False), diffusion, classifier


def counting(cond_fn):
    """cond_fn that also counts its calls."""
    def counted(*args, **kwargs):
        counted.calls += 1
        return cond_fn(*args, **kwargs)

    counted.calls = 0
    return counted


def run_loop(setup, sampler, cond_fn=None, eta=0.0):
    """A whole sampling loop with per-sample noise, in inference mode as sampling.generate_batch runs it."""
    model, diffusion, _ = setup
    generator = PerSampleGenerator(seed=0, indices=[0, 1, 2], device="cpu")
    shape = (3, 3, 16, 16)
    kwargs = {"noise": generator.randn(shape), "model_kwargs": {"y": LABELS}, "noise_fn": generator.randn_like,
              "cond_fn": cond_fn}
    with torch.inference_mode():
        if sampler == "ancestral":
            return diffusion.p_sample_loop(model, shape, **kwargs)
        return diffusion.ddim_sample_loop(model, shape, eta=eta, **kwargs)


@pytest.mark.parametrize("sampler, eta", [("ancestral", 0.0), ("ddim", 0.0), ("ddim", 0.5)])
def test_scale_zero_equals_unguided_sampling_bit_for_bit(setup, sampler, eta):
    cond_fn = counting(classifier_cond_fn(setup[2], 0.0))
    guided = run_loop(setup, sampler, cond_fn, eta)
    assert cond_fn.calls == 10  # the classifier ran at every step and added exactly nothing
    assert torch.equal(guided, run_loop(setup, sampler, None, eta))
    assert not torch.equal(run_loop(setup, sampler, classifier_cond_fn(setup[2], 1.0), eta), guided)


def test_cond_fn_is_the_scaled_gradient_of_log_p_also_in_inference_mode(setup):
    classifier = setup[2]
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([3, 20, 49])
    x_in = x.clone().requires_grad_(True)
    selected = F.log_softmax(classifier(x_in, t), dim=-1)[torch.arange(3), LABELS].sum()
    (expected,) = torch.autograd.grad(selected, x_in)
    with torch.inference_mode():
        gradient = classifier_cond_fn(classifier, 2.5)(x, t, y=LABELS)
    torch.testing.assert_close(gradient, 2.5 * expected)
    assert gradient.abs().max() > 0
    with pytest.raises(ValueError, match="class labels y"):
        classifier_cond_fn(classifier, 1.0)(x, t)


def test_ancestral_step_shifts_the_mean_by_the_variance_times_the_gradient(setup):
    model, diffusion, classifier = setup
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([9, 5, 1])
    noise = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    step = {"model_kwargs": {"y": LABELS}, "noise_fn": lambda _: noise}
    cond_fn = classifier_cond_fn(classifier, 4.0)
    guided = diffusion.p_sample(model, x, t, cond_fn=cond_fn, **step)["sample"]
    plain = diffusion.p_sample(model, x, t, **step)["sample"]
    variance = diffusion.p_mean_variance(model, x, t, model_kwargs={"y": LABELS})["variance"]
    original_t = torch.tensor(diffusion.timestep_map)[t]  # the classifier sees the original timesteps
    torch.testing.assert_close(guided - plain, variance * cond_fn(x, original_t, y=LABELS), rtol=1e-4, atol=1e-6)


def test_ddim_step_corrects_epsilon_by_the_scaled_gradient(setup):
    model, diffusion, classifier = setup
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([9, 5, 1])
    cond_fn = classifier_cond_fn(classifier, 4.0)
    guided = diffusion.ddim_sample(model, x, t, cond_fn=cond_fn, model_kwargs={"y": LABELS})["sample"]
    # DDIM (η = 0) with ε' = ε(clipped x̂₀) - √(1-ᾱ_t)·s·∇ log p(y | x_t), x̂₀' from ε'.
    pred_xstart = diffusion.p_mean_variance(model, x, t, model_kwargs={"y": LABELS})["pred_xstart"]
    abar = torch.tensor(diffusion.alphas_cumprod, dtype=torch.float32)[t].view(-1, 1, 1, 1)
    abar_prev = torch.tensor(diffusion.alphas_cumprod_prev, dtype=torch.float32)[t].view(-1, 1, 1, 1)
    eps = (x - abar.sqrt() * pred_xstart) / (1 - abar).sqrt()
    eps = eps - (1 - abar).sqrt() * cond_fn(x, torch.tensor(diffusion.timestep_map)[t], y=LABELS)
    xstart = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    expected = abar_prev.sqrt() * xstart + (1 - abar_prev).sqrt() * eps
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)
    assert (guided - diffusion.ddim_sample(model, x, t, model_kwargs={"y": LABELS})["sample"]).abs().max() > 1e-3


def test_guided_samples_do_not_depend_on_the_batch(setup):
    model, diffusion, classifier = setup
    options = SamplingOptions(image_size=16, class_cond=True, num_classes=2)
    cond_fn = classifier_cond_fn(classifier, 3.0)
    whole, labels = generate_batch(model, diffusion, [0, 1, 2, 3], options, "cpu", cond_fn)
    halves = [generate_batch(model, diffusion, part, options, "cpu", cond_fn) for part in ([0, 1], [2, 3])]
    assert np.array_equal(labels, np.concatenate([part[1] for part in halves]))
    # Other batch sizes may round the network differently (sampling.py): at most one level, on rare pixels.
    difference = np.abs(whole.astype(int) - np.concatenate([part[0] for part in halves]).astype(int))
    assert difference.max() <= 1 and (difference == 0).mean() > 0.99


def test_log_prob_of_labels(setup):
    classifier = setup[2]
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    log_probs = log_prob_of_labels(classifier, images, LABELS)
    expected = F.log_softmax(classifier(images, torch.zeros(3, dtype=torch.long)), dim=-1)[torch.arange(3), LABELS]
    torch.testing.assert_close(log_probs, expected)


def test_unserviceable_guidance_requests_are_refused(setup):
    with pytest.raises(ValueError, match="--classifier_scale 1 on an unconditional model needs --classifier_path"):
        check_guidance_flags(class_cond=False, classifier_path="", classifier_scale=1.0)
    with pytest.raises(ValueError, match="--classifier_scale 2 on a class-conditional model needs --classifier_path"):
        check_guidance_flags(class_cond=True, classifier_path="", classifier_scale=2.0)
    with pytest.raises(ValueError, match="unconditional model without --classifier_path"):
        check_guidance_flags(class_cond=False, classifier_path="", classifier_scale=0.0)
    with pytest.raises(ValueError, match="--sampler heun takes no classifier guidance"):
        check_guidance_flags(class_cond=True, classifier_path="c.pt", classifier_scale=1.0, sampler="heun")
    check_guidance_flags(class_cond=True, classifier_path="", classifier_scale=0.0)  # plain class-conditional
    with pytest.raises(ValueError, match="diffusion model has 10 classes and the classifier 1000"):
        guidance_num_classes(10, 1000)
    assert [guidance_num_classes(*pair) for pair in ((None, 1000), (10, None), (5, 5))] == [1000, 10, 5]
    model, diffusion, classifier = setup
    few_step = SamplingOptions(image_size=16, class_cond=True, num_classes=2, sampler="dpm++2m", steps=3)
    with pytest.raises(SamplingArgumentError, match="not with --sampler dpm\\+\\+2m"):
        generate_batch(model, diffusion, [0], few_step, "cpu", classifier_cond_fn(classifier, 1.0))
