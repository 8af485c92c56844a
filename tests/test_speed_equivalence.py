"""Speed options give the results of the plain path: the fused kernels, loss and gradients under every layout and
fold choice and torch.compile, the optimizer kernels, and inference-mode sampling (bit-identical to no_grad)."""

import contextlib
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from guided_diffusion.fused import add_upsampled, group_norm_op, group_norm_silu, upsample_conv3x3
from guided_diffusion.nn import normalization
from guided_diffusion.sampling import SamplingOptions, generate_batch, quantize_to_uint8
from guided_diffusion.speed_options import apply_speed_options
from guided_diffusion.train_util import _fast_adamw, match_state_layout
from guided_diffusion.unet import ResBlock, upsampling_layers

from sample_tiny_model import perturb_, save_tiny_checkpoint, tiny_flags, tiny_model_and_diffusion
from train_fixtures import train, train_argv

# Every layer kind of the P2 model: learned sigma (hybrid loss), BigGAN up/down, AdaGN, attention, P2 weighting.
P2_LIKE = dict(learn_sigma=True, resblock_updown=True, rescale_learned_sigmas=True, p2_gamma=1.0, p2_k=1.0)
# Different kernels sum in different orders; float32 rounding of a whole U-Net stays far below this.
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def plain():
    """The reference's computation: NCHW, every upsampling materialised before its conv."""
    model, diffusion = tiny_model_and_diffusion(**P2_LIKE)
    return apply_speed_options(perturb_(model), channels_last=False, fold_upsample=False), diffusion


def batch(diffusion, size=4):
    """Fixed x0 [size, 3, 16, 16], t (the first and last step included) and noise."""
    generator = torch.Generator().manual_seed(1)
    x0 = torch.rand(size, 3, 16, 16, generator=generator) * 2 - 1
    t = torch.tensor([0, diffusion.num_timesteps - 1] + [7] * (size - 2))
    noise = torch.randn(x0.shape, generator=generator)
    return x0, t, noise


def loss_and_gradients(model, diffusion):
    x0, t, noise = batch(diffusion)
    model.zero_grad(set_to_none=True)
    losses = diffusion.training_losses(model, x0, t, noise=noise)
    losses["loss"].mean().backward()
    return losses, {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_training_signal(plain, fast):
    model, diffusion = plain
    expected_losses, expected_grads = loss_and_gradients(model, diffusion)
    losses, grads = loss_and_gradients(fast, diffusion)
    for key in ("loss", "mse", "mse_raw", "vb"):
        torch.testing.assert_close(losses[key], expected_losses[key], **TOLERANCE, msg=key)
    for name, expected in expected_grads.items():
        torch.testing.assert_close(grads[name], expected, **TOLERANCE, msg=name)


@pytest.mark.parametrize("size", [1, 3, 8])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_upsample_conv_equals_conv_of_the_upsampled_input(size, bias, channels_last):
    generator = torch.Generator().manual_seed(size)
    conv = torch.nn.Conv2d(4, 5, 3, padding=1, bias=bias)
    x = torch.randn(2, 4, size, size + 1, generator=generator, requires_grad=True)
    if channels_last:
        conv.to(memory_format=torch.channels_last)
    grad_out = torch.randn(2, 5, 2 * size, 2 * size + 2, generator=generator)
    results = []
    for forward in (lambda: conv(F.interpolate(x, scale_factor=2, mode="nearest")), lambda: upsample_conv3x3(x, conv)):
        out = forward()
        inputs = [x, *conv.parameters()]
        results.append((out, torch.autograd.grad(out, inputs, grad_out)))
    (expected, expected_grads), (out, grads) = results
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, **TOLERANCE)


@pytest.mark.parametrize("channels_last", [False, True])
def test_broadcast_add_of_the_upsampled_skip_equals_the_materialised_sum(channels_last):
    generator = torch.Generator().manual_seed(0)
    h, x = torch.randn(2, 3, 6, 8, generator=generator), torch.randn(2, 3, 3, 4, generator=generator)
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    h.requires_grad_()
    x.requires_grad_()
    expected = h + F.interpolate(x, scale_factor=2, mode="nearest")
    out = add_upsampled(h, x)
    assert torch.equal(out, expected)
    grad = torch.randn(expected.shape, generator=generator)
    for got, want in zip(torch.autograd.grad(out, (h, x), grad), torch.autograd.grad(expected, (h, x), grad)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("out_channels", [32, 64])
def test_up_resblock_equals_its_unfolded_form(out_channels):
    # The unfolded form is the reference's: upsample h and x, 3x3 conv, ..., skip(x_up) + h.
    block = perturb_(ResBlock(32, 16, 0.0, out_channels=out_channels, use_scale_shift_norm=True, up=True))
    unfolded = copy.deepcopy(block)
    unfolded.fold_upsample = False
    generator = torch.Generator().manual_seed(2)
    x, emb = torch.randn(2, 32, 4, 4, generator=generator), torch.randn(2, 16, generator=generator)
    results = []
    for module in (unfolded, block):
        out = module(x, emb)
        results.append((out, torch.autograd.grad(out.square().sum(), list(module.parameters()))))
    torch.testing.assert_close(results[1][0], results[0][0], **TOLERANCE)
    # On the scale of all gradients: the bias before a GroupNorm gets a gradient that is rounding noise (~1e-6 of
    # the others) in both forms.
    scale = max(g.abs().max().item() for g in results[0][1])
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("channels_last, fold_upsample", [(True, False), (False, True), (True, True)])
def test_every_layout_and_fold_choice_gives_the_plain_loss_and_gradients(plain, channels_last, fold_upsample):
    fast = apply_speed_options(copy.deepcopy(plain[0]), channels_last=channels_last, fold_upsample=fold_upsample)
    assert fast.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert {layer.fold_upsample for layer in upsampling_layers(fast).values()} == {fold_upsample}
    assert_same_training_signal(plain, fast)
    assert list(fast.state_dict()) == list(plain[0].state_dict())


@pytest.mark.slow
def test_compiled_model_gives_the_plain_loss_gradients_and_keys(plain):
    # One test: compiling even a tiny U-Net's forward and backward takes tens of seconds on a CPU.
    fast = apply_speed_options(copy.deepcopy(plain[0]), compile=True)
    assert_same_training_signal(plain, fast)
    assert list(fast.state_dict()) == list(plain[0].state_dict())  # checkpoints keep the reference's keys


def test_fast_adamw_steps_like_the_per_parameter_loop(plain):
    model = plain[0]
    _, grads = loss_and_gradients(model, plain[1])
    results = []
    fast_options = _fast_adamw(torch.device("cpu"))
    assert fast_options != {"foreach": False}  # else the loop would compare the per-parameter loop with itself
    for options in ({"foreach": False}, fast_options):
        params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        for p, g in zip(params, grads.values()):
            p.grad = g.clone()
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, **options)
        for _ in range(2):
            optimizer.step()
        results.append(params)
    for looped, fast in zip(*results):
        torch.testing.assert_close(fast, looped, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("saved_channels_last", [False, True])
def test_optimizer_state_from_another_layout_resumes_correctly(saved_channels_last):
    # A checkpoint written with one --channels_last setting, resumed with the other: the fused kernel would
    # otherwise pair parameter and state elements by memory position.
    generator = torch.Generator().manual_seed(0)
    weight, grad = torch.randn(8, 4, 3, 3, generator=generator), torch.randn(8, 4, 3, 3, generator=generator)
    layouts = (torch.channels_last, torch.contiguous_format)
    saved_layout, resumed_layout = layouts if saved_channels_last else layouts[::-1]

    def two_steps(first_layout, second_layout, fused):
        # Gradients come in their parameter's layout, as autograd makes them.
        param = weight.clone().contiguous(memory_format=first_layout).requires_grad_()
        optimizer = torch.optim.AdamW([param], lr=0.1, fused=fused)
        param.grad = grad.contiguous(memory_format=first_layout)
        optimizer.step()
        resumed = param.detach().clone().contiguous(memory_format=second_layout).requires_grad_()
        resumed_optimizer = torch.optim.AdamW([resumed], lr=0.1, fused=fused)
        resumed_optimizer.load_state_dict(optimizer.state_dict())
        match_state_layout(resumed_optimizer)
        assert resumed_optimizer.state[resumed]["exp_avg"].stride() == resumed.stride()
        resumed.grad = (2 * grad).contiguous(memory_format=second_layout)
        resumed_optimizer.step()
        return resumed.detach()

    expected = two_steps(torch.contiguous_format, torch.contiguous_format, fused=False)
    torch.testing.assert_close(two_steps(saved_layout, resumed_layout, fused=True), expected, rtol=1e-6, atol=1e-7)


def test_inference_mode_sampling_equals_no_grad_sampling():
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="5", **P2_LIKE)
    model = perturb_(model).eval()
    options = SamplingOptions(image_size=16, seed=3)
    images, _ = generate_batch(model, diffusion, np.arange(3), options, "cpu")
    with torch.no_grad():
        # generate_batch's own body, under no_grad instead of inference mode.
        expected, _ = generate_batch.__wrapped__(model, diffusion, np.arange(3), options, "cpu")
    np.testing.assert_array_equal(images, expected)
    assert images.std() > 0


def test_sampling_runs_without_autograd_state():
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="2")
    seen = []
    original_forward = model.forward

    def recording_forward(*args, **kwargs):
        seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return original_forward(*args, **kwargs)

    model.forward = recording_forward
    generate_batch(model.eval(), diffusion, np.arange(2), SamplingOptions(image_size=16), "cpu")
    assert seen == [(True, False)] * 2


def test_quantised_channels_last_samples_equal_plain_samples():
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="3", **P2_LIKE)
    model = perturb_(model).eval()
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    samples = []
    for fast in (model, apply_speed_options(copy.deepcopy(model), channels_last=True)):
        torch.manual_seed(0)
        with torch.inference_mode():
            samples.append(diffusion.p_sample_loop(fast, noise.shape, noise=noise.clone()))
    # Rounding differences of 1e-6 grow through the chain of steps (the perturbed net has large outputs).
    torch.testing.assert_close(samples[1], samples[0], rtol=0, atol=1e-3)
    # A pixel may sit within rounding of a quantisation step; nearly all must be identical.
    equal = (quantize_to_uint8(samples[1]) == quantize_to_uint8(samples[0])).float().mean()
    assert equal > 0.99


# --- The scripts' flags ---


def test_image_sample_channels_last_gives_the_plain_samples(tmp_path):
    import image_sample

    checkpoint = save_tiny_checkpoint(str(tmp_path / "ema_0.9999_000010.pt"))
    pixels = []
    for name, flags in (("plain", ["--channels_last", "False"]), ("fast", ["--channels_last", "True"])):
        argv = tiny_flags(timestep_respacing="5") + ["--model_path", checkpoint, "--num_samples", "3"]
        result = image_sample.main(argv + ["--sample_dir", str(tmp_path / name), *flags])
        with np.load(result.npz_path) as npz:
            pixels.append(npz["arr_0"].astype(int))
    # Float rounding may move a pixel lying within ~1e-6 of a quantisation step by one level.
    assert np.abs(pixels[1] - pixels[0]).max() <= 1
    assert (pixels[1] == pixels[0]).mean() > 0.99


def test_image_train_channels_last_resumes_without_it(images, tmp_path):
    import image_train

    fast = train(images, tmp_path / "run", max_steps=2, channels_last=True)
    assert fast.model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    args = image_train.parse_args(
        train_argv(images, str(tmp_path / "run"), max_steps=4, resume_checkpoint=str(tmp_path / "run"),
                   channels_last=False)
    )
    with contextlib.ExitStack() as held:
        resumed, data, _ = image_train.build(args, held)
        data.close()
    assert resumed.model.input_blocks[0][0].weight.is_contiguous()
    # The saved optimizer state now has each parameter's (plain) layout and the same values.
    for saved_param, param in zip(fast.params, resumed.params):
        for key in ("exp_avg", "exp_avg_sq"):
            state = resumed.opt.state[param][key]
            assert state.stride() == param.stride()
            assert torch.equal(state, fast.opt.state[saved_param][key])


@pytest.mark.parametrize("channels_last", [False, True])
def test_opaque_group_norm_operator_equals_group_norm(channels_last):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 5, 6, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(8, generator=generator), torch.randn(8, generator=generator)
    args = (x, weight, bias, 4, 1e-5)
    torch.library.opcheck(group_norm_op, args)  # schema, fake (shape) function, autograd registration
    inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
    expected_inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = group_norm_op(*inputs, 4, 1e-5)[0]
    expected = F.group_norm(expected_inputs[0], 4, expected_inputs[1], expected_inputs[2], 1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    grad = torch.randn(expected.shape, generator=generator)
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, expected_inputs, grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _stepwise_group_norm_silu(x, norm, scale, shift):
    h = norm(x)
    if scale is not None:
        h = h * (1 + scale[..., None, None]) + shift[..., None, None]
    return F.silu(h)


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_group_norm_silu_equals_the_stepwise_layers(modulated, channels_last):
    generator = torch.Generator().manual_seed(4)
    norm = normalization(64)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(64, generator=generator))
        norm.bias.copy_(0.3 * torch.randn(64, generator=generator))
    # An offset mean makes the one-pass form a·x + b face cancellation, as real activations can.
    x = 3 + torch.randn(2, 64, 5, 6, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    scale, shift = (torch.randn(2, 64, generator=generator, requires_grad=True) if modulated else None for _ in "ab")
    inputs = [t for t in (x, norm.weight, norm.bias, scale, shift) if t is not None]
    grad = torch.randn(2, 64, 5, 6, generator=generator)
    fused = group_norm_silu(x, norm, scale, shift)
    expected = _stepwise_group_norm_silu(x, norm, scale, shift)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(fused, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fused_group_norm_silu_keeps_only_its_input_for_backward():
    norm = normalization(32)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    scale, shift = torch.randn(2, 32, requires_grad=True), torch.randn(2, 32, requires_grad=True)
    for function, expected_activations in ((group_norm_silu, 1), (_stepwise_group_norm_silu, 3)):
        saved = {}  # storage address -> elements

        def pack(tensor):
            saved[tensor.untyped_storage().data_ptr()] = tensor.numel()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            function(x, norm, scale, shift)
        assert sum(1 for numel in saved.values() if numel == x.numel()) == expected_activations


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_group_norm_silu_runs_in_float32_for_low_precision_inputs(dtype):
    generator = torch.Generator().manual_seed(5)
    norm = normalization(64)
    x, scale, shift = (t.to(dtype) for t in (3 + torch.randn(2, 64, 8, 8, generator=generator),
                                             torch.randn(2, 64, generator=generator),
                                             torch.randn(2, 64, generator=generator)))
    out = group_norm_silu(x, norm, scale, shift)
    assert out.dtype == dtype
    # Computed in float32 from GN(x), 1 + scale (formed in the input's dtype, as the model hands it over) and
    # shift, and rounded once: within half a rounding step (eps/2, relative) of the float32 result. A norm, AdaGN
    # product or sum rounded in the low precision is not.
    one_plus_scale = (1 + scale).float()
    expected = _stepwise_group_norm_silu(x.float(), norm, one_plus_scale - 1, shift.float())
    torch.testing.assert_close(out.float(), expected, rtol=torch.finfo(dtype).eps / 2 + 1e-5, atol=1e-6)
