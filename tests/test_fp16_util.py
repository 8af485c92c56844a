"""guided_diffusion/fp16_util.py and UNetModel.convert_to_fp16: which parameters ADM's use_fp16 casts."""

import torch

from guided_diffusion.fp16_util import convert_module_to_f16, convert_module_to_f32
from guided_diffusion.nn import normalization
from guided_diffusion.script_util import create_model


def test_only_convolutions_are_cast():
    modules = [torch.nn.Conv2d(32, 32, 3), torch.nn.Conv1d(32, 96, 1), normalization(32), torch.nn.Linear(4, 4)]
    for module in modules:
        convert_module_to_f16(module)
    assert [{p.dtype for p in m.parameters()} for m in modules] == [{torch.float16}] * 2 + [{torch.float32}] * 2
    for module in modules:
        convert_module_to_f32(module)
    assert all(p.dtype == torch.float32 for m in modules for p in m.parameters())


def test_model_conversion_casts_block_convolutions_only_and_round_trips():
    model = create_model(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                         attention_resolutions="8", resblock_updown=True, use_scale_shift_norm=True,
                         class_cond=True, use_fp16=True)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.convert_to_fp16()
    assert model.dtype == torch.float16
    halved = {name for name, p in model.named_parameters() if p.dtype == torch.float16}
    for name, p in model.named_parameters():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        in_blocks = name.startswith(("input_blocks.", "middle_block.", "output_blocks."))
        is_conv = isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d))  # 1-D: the attention's qkv, proj_out
        assert (name in halved) == (in_blocks and is_conv), name
    assert any(name.endswith("qkv.weight") for name in halved)
    model.convert_to_fp32()
    assert model.dtype == torch.float32
    # Round trip: the cast parameters keep their fp16 rounding, the others are untouched.
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        assert torch.equal(p, original[name].half().float() if name in halved else original[name]), name
