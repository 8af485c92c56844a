"""The noisy-image classifier (EncoderUNetModel): the reference's keys, shapes and parameter counts for the released
ADM classifiers and every pool, the attention pool's maths, saving and reloading, and bad input."""

import json
import math
import os

import pytest
import torch
from classifier_fixtures import tiny_classifier
from sample_tiny_model import perturb_

from guided_diffusion.classifier_util import classifier_defaults, create_classifier
from guided_diffusion.encoder_unet import AttentionPool2d, EncoderUNetModel

# Keys (in order), shapes and counts of the reference's state_dicts for the released classifiers' flags.
SHAPES_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "adm_classifier_state_dict_shapes.json")

# The guided-diffusion README's classifier flags: depth 4 at 64 px, the defaults (depth 2) at 128, 256 and 512 px.
RELEASED = {64: {"classifier_depth": 4}, 128: {}, 256: {}, 512: {}}
RELEASED_PARAMS = {64: 65_438_568, 128: 42_568_040, 256: 54_096_360, 512: 54_448_360}

# Parameter counts of the reference's EncoderUNetModel at 32 px (channel_mult 1,2,2,2, 64 channels, one ResBlock per
# level, attention at ds 2 and 4, 64-channel heads, 10 classes) for each pool, with and without BigGAN downsampling
# plus AdaGN.
POOL_PARAMS = {
    ("adaptive", True): 2_963_466,
    ("adaptive", False): 2_284_682,
    ("attention", True): 3_015_178,
    ("attention", False): 2_336_394,
    ("spatial", True): 4_950_538,
    ("spatial", False): 4_271_754,
    ("spatial_v2", True): 4_954_634,
    ("spatial_v2", False): 4_275_850,
}

def pool_model(pool, biggan_and_adagn, device=None):
    with torch.device(device or "cpu"):
        return EncoderUNetModel(
            image_size=32, in_channels=3, model_channels=64, out_channels=10, num_res_blocks=1,
            attention_resolutions=(2, 4), channel_mult=(1, 2, 2, 2), num_head_channels=64,
            use_scale_shift_norm=biggan_and_adagn, resblock_updown=biggan_and_adagn, pool=pool,
        )


def inputs(batch=2, size=16, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator), torch.tensor([3, 777, 500, 0][:batch])


# --- The reference's layout ---


@pytest.mark.parametrize("size", sorted(RELEASED))
def test_released_classifier_keys_shapes_and_counts_equal_the_reference(size):
    with open(SHAPES_JSON) as f:
        reference = json.load(f)["configs"][str(size)]
    # Meta tensors carry shapes without storage, so the 40-65M models build in milliseconds.
    with torch.device("meta"):
        model = create_classifier(**{**classifier_defaults(), "image_size": size, **RELEASED[size]})
    shapes = [[key, list(value.shape)] for key, value in model.state_dict().items()]
    assert shapes == reference["shapes"]  # same keys, in the same order, with the same shapes
    assert len(shapes) == reference["num_entries"]
    assert sum(p.numel() for p in model.parameters()) == reference["num_params"] == RELEASED_PARAMS[size]
    assert sum(math.prod(shape) for _, shape in shapes) == RELEASED_PARAMS[size]


@pytest.mark.parametrize("pool, biggan_and_adagn", sorted(POOL_PARAMS))
def test_parameter_counts_of_every_pool_equal_the_reference(pool, biggan_and_adagn):
    model = pool_model(pool, biggan_and_adagn, device="meta")
    assert sum(p.numel() for p in model.parameters()) == POOL_PARAMS[(pool, biggan_and_adagn)]


def test_head_keys_of_each_pool():
    # The spatial heads read the means of the 8 encoder blocks' outputs (the stem conv, then ResBlock and
    # downsampler per level: 64, 64, 64, 128, 128, 128, 128, 128 channels) and the middle block's (128).
    features = 3 * 64 + 5 * 128 + 128
    expected = {
        "adaptive": {"out.0.weight": [128], "out.3.weight": [10, 128, 1, 1], "out.3.bias": [10]},
        "attention": {"out.2.positional_embedding": [128, 4 * 4 + 1], "out.2.qkv_proj.weight": [384, 128, 1],
                      "out.2.c_proj.weight": [10, 128, 1]},
        "spatial": {"out.0.weight": [2048, features], "out.2.weight": [10, 2048]},
        "spatial_v2": {"out.0.weight": [2048, features], "out.1.weight": [2048], "out.3.weight": [10, 2048]},
    }
    for pool, keys in expected.items():
        state = pool_model(pool, True, device="meta").state_dict()
        head = {key: list(value.shape) for key, value in state.items() if key.startswith("out.")}
        assert {key: head[key] for key in keys} == keys, pool
        assert all(key.startswith("out.") for key in list(state)[-len(head):])


# --- The forward pass ---


@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial", "spatial_v2"])
def test_every_pool_gives_logits_and_gradients_for_every_parameter(pool):
    model = perturb_(tiny_classifier(classifier_pool=pool))
    x, t = inputs()
    logits = model(x, t)
    assert logits.shape == (2, 1000) and logits.dtype == torch.float32
    torch.log_softmax(logits, dim=-1)[:, 1].sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_samples_are_classified_independently_and_the_timestep_matters():
    model = perturb_(tiny_classifier()).eval()
    x, t = inputs(batch=2)
    with torch.no_grad():
        both = model(x, t)
        first = model(x[:1], t[:1])
        later = model(x, torch.tensor([900, 900]))
    torch.testing.assert_close(both[:1], first, rtol=1e-5, atol=1e-6)
    assert (both[0] - later[0]).abs().max() > 1e-3


def test_attention_pool_equals_full_attention_read_at_the_mean_token():
    torch.manual_seed(0)
    pool = AttentionPool2d(spatial_size=4, channels=128, head_channels=64, out_channels=5)
    x = torch.randn(3, 128, 4, 4)
    # The reference's computation: every token attends, [Q, K, V] channel layout, heads of 64 channels.
    tokens = torch.cat([x.flatten(2).mean(dim=2, keepdim=True), x.flatten(2)], dim=2) + pool.positional_embedding
    qkv = torch.nn.functional.conv1d(tokens, pool.qkv_proj.weight, pool.qkv_proj.bias)
    q, k, v = (part.reshape(3 * 2, 64, 17) for part in qkv.chunk(3, dim=1))
    weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(64), dim=-1)
    attended = torch.einsum("bts,bcs->bct", weights, v).reshape(3, 128, 17)
    expected = torch.nn.functional.conv1d(attended, pool.c_proj.weight, pool.c_proj.bias)[:, :, 0]
    torch.testing.assert_close(pool(x), expected, rtol=1e-5, atol=1e-6)


def test_fp16_torso_runs_close_to_fp32():
    model = perturb_(tiny_classifier()).eval()
    x, t = inputs()
    with torch.no_grad():
        full = model(x, t)
        model.convert_to_fp16()
        assert model.input_blocks[0][0].weight.dtype == torch.float16
        assert model.out[2].c_proj.weight.dtype == torch.float32  # the head stays fp32, as the reference's
        half = model(x, t)
    assert half.dtype == torch.float32
    assert ((half - full).norm() / full.norm()).item() < 1e-2


def test_saved_state_dict_reloads_strictly_and_reproduces_outputs(tmp_path):
    model = perturb_(tiny_classifier()).eval()
    path = tmp_path / "model000010.pt"
    torch.save(model.state_dict(), path)
    fresh = tiny_classifier().eval()
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(fresh(x, t), model(x, t))


# --- Bad input ---


def test_bad_flags_and_inputs_are_refused():
    with pytest.raises(ValueError, match="--classifier_pool 'max'"):
        tiny_classifier(classifier_pool="max")
    with pytest.raises(ValueError, match="--classifier_attention_resolutions: resolution 32 is never reached"):
        tiny_classifier(classifier_attention_resolutions="32")
    with pytest.raises(ValueError, match="--classifier_channel_mult"):
        tiny_classifier(classifier_channel_mult="", image_size=48)
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny_classifier(classifier_width=48)
    model = tiny_classifier()
    x, t = inputs(size=32)
    with pytest.raises(ValueError, match="--image_size"):
        model(x, t)
    with pytest.raises(ValueError, match="timesteps has shape"):
        model(inputs()[0], torch.tensor([1]))


def test_reference_style_imports_from_script_util_give_the_classifier_factories():
    from guided_diffusion import classifier_util
    from guided_diffusion.script_util import (
        classifier_and_diffusion_defaults,
        classifier_defaults,
        create_classifier,
        create_classifier_and_diffusion,
    )

    assert create_classifier is classifier_util.create_classifier
    assert classifier_defaults is classifier_util.classifier_defaults
    assert classifier_and_diffusion_defaults is classifier_util.classifier_and_diffusion_defaults
    assert create_classifier_and_diffusion is classifier_util.create_classifier_and_diffusion
    with pytest.raises(ImportError):
        from guided_diffusion.script_util import create_classifer  # noqa: F401 (misspelt on purpose)
