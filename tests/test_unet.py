"""The ADM U-Net: the reference's parameter counts and keys (docs/compatibility.md, "U-Net and checkpoint layout"),
attention maths, checkpointing, precision modes and checkpoint loading."""

import json
import math
import os

import pytest
import torch
import torch.utils.checkpoint

from guided_diffusion.script_util import create_model
from guided_diffusion.state_dict_check import CheckpointMismatchError, load_state_dict_checked
from guided_diffusion.unet import AttentionBlock, qkv_attention

# Keys, shapes, entry and parameter counts of the reference's state_dict for P2_FLAGS.
SHAPES_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "p2_unet_state_dict_shapes.json")

# The P2 README's model flags (docs/compatibility.md, "Command-line flags").
P2_FLAGS = dict(
    image_size=256,
    num_channels=128,
    num_res_blocks=1,
    attention_resolutions="16",
    num_head_channels=64,
    resblock_updown=True,
    use_scale_shift_norm=True,
    learn_sigma=True,
    dropout=0.0,
)
P2_PARAMS = 93_563_910

# docs/compatibility.md, "U-Net and checkpoint layout": flags changed from P2_FLAGS, and the parameter count.
PARAMETER_COUNTS = [
    ({}, P2_PARAMS),
    (dict(resblock_updown=False), 80_649_094),
    (dict(attention_resolutions=""), 90_408_966),
    (dict(attention_resolutions="none"), 90_408_966),
    (dict(num_res_blocks=2), 131_713_286),
    (dict(attention_resolutions="32,16,8"), 97_509_894),
    (dict(attention_resolutions="8"), P2_PARAMS),
    (dict(learn_sigma=False), 93_560_451),
    (dict(use_scale_shift_norm=False), 88_770_438),
    (dict(class_cond=True), P2_PARAMS + 512_000),
]

# The released ADM and improved-diffusion models (their published flags; docs/compatibility.md, "U-Net and
# checkpoint layout").
ADM = dict(learn_sigma=True, use_scale_shift_norm=True, attention_resolutions="32,16,8", resblock_updown=True)
IDDPM = dict(learn_sigma=True, attention_resolutions="16,8", num_heads=4)
RELEASED_COUNTS = [
    (dict(ADM, image_size=64, num_channels=192, num_res_blocks=3, num_head_channels=64, class_cond=True,
          use_new_attention_order=True), 295_904_454),
    (dict(ADM, image_size=128, num_channels=256, num_res_blocks=2, num_heads=4, class_cond=True), 421_529_606),
    (dict(ADM, image_size=256, num_channels=256, num_res_blocks=2, num_head_channels=64, class_cond=True), 553_838_086),
    (dict(ADM, image_size=256, num_channels=256, num_res_blocks=2, num_head_channels=64), 552_814_086),
    (dict(ADM, image_size=512, num_channels=256, num_res_blocks=2, num_head_channels=64, class_cond=True), 558_997_638),
    (dict(IDDPM, image_size=64, num_channels=128, num_res_blocks=3, use_scale_shift_norm=True), 121_063_942),
    (dict(IDDPM, image_size=32, num_channels=128, num_res_blocks=3, use_scale_shift_norm=True), 52_546_438),
    (dict(IDDPM, image_size=256, num_channels=128, num_res_blocks=2, attention_resolutions="16", num_heads=1),
     113_676_678),
]


def build_on_meta(**flags):
    # Meta tensors carry shapes without storage, so the 94M-500M models build in milliseconds.
    with torch.device("meta"):
        return create_model(**flags)


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def tiny_model(**overrides):
    """A 32 px model with every feature of the P2 config: AdaGN, BigGAN up/down, attention at 16 px, learned σ."""
    flags = dict(
        image_size=32,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1,2",
        attention_resolutions="16",
        num_head_channels=16,
        resblock_updown=True,
        use_scale_shift_norm=True,
        learn_sigma=True,
    )
    flags.update(overrides)
    return create_model(**flags)


def perturb_(model, seed=0):
    """Add noise to every parameter: a fresh model outputs zeros, which would hide every other path."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator).to(p.dtype))
    return model


def inputs(batch=2, size=32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=generator)
    timesteps = torch.tensor([3, 777, 500, 0][:batch])
    return x, timesteps


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# --- Parameter counts and checkpoint keys ---


@pytest.mark.parametrize("overrides, expected", PARAMETER_COUNTS)
def test_parameter_counts_of_paper_configs(overrides, expected):
    assert num_params(build_on_meta(**{**P2_FLAGS, **overrides})) == expected


@pytest.mark.parametrize("flags, expected", RELEASED_COUNTS)
def test_parameter_counts_of_released_adm_and_iddpm_models(flags, expected):
    assert num_params(build_on_meta(**flags)) == expected


def test_state_dict_keys_and_shapes_equal_the_reference():
    with open(SHAPES_JSON) as f:
        reference = json.load(f)
    state = build_on_meta(**P2_FLAGS).state_dict()
    shapes = {key: list(value.shape) for key, value in state.items()}
    assert list(shapes) == list(reference["shapes"])  # same keys, in the same order
    assert shapes == reference["shapes"]
    assert len(shapes) == reference["num_entries"] == 362
    assert sum(math.prod(s) for s in shapes.values()) == reference["num_params"] == P2_PARAMS


def test_heads_follow_num_head_channels_then_num_heads():
    # At 256 px, attention at ds 16 and in the middle block runs over 512 channels: 512 / 64 = 8 heads.
    model = build_on_meta(**P2_FLAGS)
    heads = {m.num_heads for m in model.modules() if isinstance(m, AttentionBlock)}
    assert heads == {8}
    model = build_on_meta(**{**P2_FLAGS, "num_head_channels": -1, "num_heads": 4, "num_heads_upsample": 2})
    assert model.middle_block[1].num_heads == 4 and model.input_blocks[9][1].num_heads == 4
    decoder = {m.num_heads for m in model.output_blocks.modules() if isinstance(m, AttentionBlock)}
    assert decoder == {2}


def test_bad_head_and_channel_flags_are_refused():
    with pytest.raises(ValueError, match="num_head_channels=48"):
        tiny_model(num_head_channels=48)
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny_model(num_channels=48)


# --- Behaviour of the forward pass ---


def test_fresh_model_outputs_zeros():
    x, t = inputs()
    out = tiny_model()(x, t)
    assert out.shape == (2, 6, 32, 32) and out.dtype == torch.float32
    assert torch.count_nonzero(out) == 0


def test_forward_and_backward_reach_every_parameter():
    model = perturb_(tiny_model())
    x, t = inputs()
    out = model(x, t)
    assert out.shape == (2, 6, 32, 32)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_timesteps_change_the_output():
    model = perturb_(tiny_model()).eval()
    x, _ = inputs()
    with torch.no_grad():
        early, late = model(x, torch.tensor([3, 3])), model(x, torch.tensor([900, 900]))
    assert relative_error(early, late) > 1e-3


def test_class_conditional_model_uses_the_labels():
    model = perturb_(tiny_model(class_cond=True)).eval()
    assert model.label_emb.weight.shape == (1000, 128)
    x, t = inputs()
    with torch.no_grad():
        a, b = model(x, t, y=torch.tensor([1, 2])), model(x, t, y=torch.tensor([7, 2]))
    assert relative_error(a[0], b[0]) > 1e-3  # the label moved sample 0 ...
    torch.testing.assert_close(a[1], b[1])  # ... and only sample 0
    with pytest.raises(ValueError, match="class_cond"):
        model(x, t)
    with pytest.raises(ValueError, match="class_cond"):
        tiny_model()(x, t, y=torch.tensor([1, 2]))


def test_bad_input_shapes_are_refused():
    model = tiny_model()
    x, t = inputs()
    with pytest.raises(ValueError, match="multiples of 2"):
        model(x[..., :31], t)
    with pytest.raises(ValueError, match="timesteps"):
        model(x, t[:1])
    with pytest.raises(ValueError, match=r"expected \[N, 3, H, W\]"):
        model(x[:, :2], t)


# --- Attention ---


def explicit_attention(qkv, num_heads, new_order):
    """softmax(qᵀk/√d)v per head, softmax in float32 as in the reference. qkv: [N, 3·H·d, T] -> [N, H·d, T]."""
    n, width, tokens = qkv.shape
    d = width // (3 * num_heads)
    if new_order:
        q, k, v = (part.reshape(n * num_heads, d, tokens) for part in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(n * num_heads, 3 * d, tokens).split(d, dim=1)
    logits = torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d)
    weights = torch.softmax(logits.float(), dim=-1).type(logits.dtype)
    return torch.einsum("bts,bcs->bct", weights, v).reshape(n, num_heads * d, tokens)


@pytest.mark.parametrize("new_order", [False, True])
def test_sdpa_attention_equals_the_explicit_formula(new_order):
    qkv = torch.randn(2, 3 * 4 * 8, 37, generator=torch.Generator().manual_seed(0))  # N=2, H=4, d=8, T=37
    ours = qkv_attention(qkv.transpose(1, 2), num_heads=4, new_order=new_order).transpose(1, 2)
    torch.testing.assert_close(ours, explicit_attention(qkv, 4, new_order), atol=1e-5, rtol=1e-5)


def test_the_two_qkv_layouts_read_the_weights_differently():
    qkv = torch.randn(1, 3 * 2 * 8, 10, generator=torch.Generator().manual_seed(0)).transpose(1, 2)
    assert relative_error(qkv_attention(qkv, 2, new_order=False), qkv_attention(qkv, 2, new_order=True)) > 0.1


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_block_equals_the_reference_computation(new_order):
    block = perturb_(AttentionBlock(64, num_head_channels=16, use_new_attention_order=new_order))
    x = torch.randn(2, 64, 4, 6, generator=torch.Generator().manual_seed(2))
    tokens = x.reshape(2, 64, -1)
    qkv = block.qkv(block.norm(tokens))  # the reference's Conv1d over [N, C, T]
    expected = (tokens + block.proj_out(explicit_attention(qkv, 4, new_order))).reshape(x.shape)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


# --- Gradient checkpointing (docs/compatibility.md, "Reference defects fixed here") ---


def count_checkpoint_calls(monkeypatch):
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    return calls


def test_checkpointing_leaves_gradients_unchanged(monkeypatch):
    calls = count_checkpoint_calls(monkeypatch)
    plain = perturb_(tiny_model(dropout=0.1))
    checkpointed = tiny_model(dropout=0.1, use_checkpoint=True)
    checkpointed.load_state_dict(plain.state_dict())
    x, t = inputs()
    for model in (plain, checkpointed):
        torch.manual_seed(5)  # the same dropout masks; the recomputation must replay them
        model(x, t).square().mean().backward()
    blocks = [m for m in checkpointed.modules() if getattr(m, "use_checkpoint", False) and m is not checkpointed]
    assert calls == [False] * len(blocks)  # only the checkpointed model, once per block, non-reentrant
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_no_checkpointing_without_gradients(monkeypatch):
    calls = count_checkpoint_calls(monkeypatch)
    x, t = inputs()
    with torch.no_grad():
        tiny_model(use_checkpoint=True)(x, t)
    assert calls == []


# --- Precision ---


def test_fp16_model_runs_close_to_fp32():
    reference = perturb_(tiny_model()).eval()
    half = tiny_model(use_fp16=True).eval()
    half.load_state_dict(reference.state_dict())
    x, t = inputs()
    with pytest.raises(RuntimeError, match="convert_to_fp16"):
        half(x, t)
    half.convert_to_fp16()
    with torch.no_grad():
        out = half(x, t)
        expected = reference(x, t)
    assert out.dtype == torch.float32
    assert relative_error(out, expected) < 1e-2


def test_bf16_autocast_runs_close_to_fp32():
    model = perturb_(tiny_model(class_cond=True))
    x, t = inputs()
    y = torch.tensor([4, 9])
    expected = model(x, t, y=y)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(x, t, y=y)
    assert out.dtype == torch.float32  # the output head runs in float32
    # bf16 keeps 8 significant bits (rounding error up to 2^-9 per operation); through this net the output moves
    # by a few times that. The lower bound shows the blocks did run in bf16; the upper one fails for precision
    # lost where autocast must not reach, e.g. timesteps rounded to bf16 (777 -> 776) before the embedding.
    assert 1e-3 < relative_error(out, expected) < 3e-2
    out.square().mean().backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


# --- Saving and loading ---


def test_saved_state_dict_reloads_strictly_and_reproduces_outputs(tmp_path):
    model = perturb_(tiny_model(class_cond=True)).eval()
    path = tmp_path / "model000000.pt"
    torch.save(model.state_dict(), path)
    reloaded = tiny_model(class_cond=True).eval()
    load_state_dict_checked(reloaded, torch.load(path, map_location="cpu", weights_only=True), str(path))
    x, t = inputs()
    y = torch.tensor([0, 999])
    with torch.no_grad():
        assert torch.equal(reloaded(x, t, y=y), model(x, t, y=y))


# (flags the checkpoint was trained with, flags of the model, texts the error must contain)
MISMATCHES = [
    (dict(class_cond=True), {}, ["label_emb.weight", "--class_cond True"]),
    ({}, dict(class_cond=True), ["label_emb.weight", "--class_cond False"]),
    ({}, dict(learn_sigma=False), ["out.2.weight", "--learn_sigma", "outputs 6 channels, this model 3"]),
    (dict(resblock_updown=False), {}, [".op.weight", ".in_layers.0.weight", "--resblock_updown False"]),
    ({}, dict(resblock_updown=False), [".op.weight", ".in_layers.0.weight", "--resblock_updown True"]),
    ({}, dict(attention_resolutions="none"), ["input_blocks.3.1.norm.weight", "--attention_resolutions"]),
    ({}, dict(use_scale_shift_norm=False), ["emb_layers.1.weight", "--use_scale_shift_norm", "set it True"]),
    (dict(num_res_blocks=2), {}, ["input_blocks", "--num_res_blocks"]),
    (dict(channel_mult="1,2,2"), {}, ["input_blocks", "--channel_mult"]),
    (dict(num_channels=64), {}, ["time_embed.0.weight", "--num_channels"]),
]


@pytest.mark.parametrize("checkpoint_flags, model_flags, expected_texts", MISMATCHES)
def test_mismatched_checkpoint_names_the_key_and_the_flag(checkpoint_flags, model_flags, expected_texts):
    state_dict = tiny_model(**checkpoint_flags).state_dict()
    model = tiny_model(**model_flags)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as error:
        load_state_dict_checked(model, state_dict, "ckpt/model.pt")
    message = str(error.value)
    assert message.startswith("ckpt/model.pt does not fit")
    for text in expected_texts:
        assert text in message, f"{text!r} not in:\n{message}"
    assert "no flag explains" not in message, message
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())  # left untouched


def test_ddp_prefixed_checkpoint_is_explained():
    state_dict = {f"module.{key}": value for key, value in tiny_model().state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="'module.' prefix"):
        load_state_dict_checked(tiny_model(), state_dict, "model.pt")


def test_a_dict_that_is_not_a_state_dict_is_explained():
    with pytest.raises(CheckpointMismatchError, match="key 'model' holds a dict"):
        load_state_dict_checked(tiny_model(), {"model": {}, "step": 10}, "state.pt")
