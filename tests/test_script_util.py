"""Flags, defaults and config precedence (COMPAT §5): defaults -> YAML config -> command-line flags."""

import argparse

import pytest

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion import script_util as su

REFERENCE_DIFFUSION_DEFAULTS = dict(
    learn_sigma=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="", use_kl=False,
    predict_xstart=False, rescale_timesteps=False, rescale_learned_sigmas=False,
)
REFERENCE_MODEL_DEFAULTS = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1, num_head_channels=-1,
    attention_resolutions="16,8", channel_mult="", dropout=0.0, class_cond=False, use_checkpoint=False,
    use_scale_shift_norm=True, resblock_updown=False, use_fp16=False, use_new_attention_order=False,
)


def test_reference_defaults_kept():
    defaults = su.model_and_diffusion_defaults()
    for key, value in {**REFERENCE_DIFFUSION_DEFAULTS, **REFERENCE_MODEL_DEFAULTS}.items():
        assert defaults[key] == value and type(defaults[key]) is type(value), key
    # FIX (COMPAT §12 #2): P2 flags are floats.
    assert defaults["p2_gamma"] == 0.0 and isinstance(defaults["p2_gamma"], float)
    assert defaults["p2_k"] == 1.0 and isinstance(defaults["p2_k"], float)


def _parser():
    parser = argparse.ArgumentParser()
    su.add_dict_to_argparser(parser, su.model_and_diffusion_defaults())
    return parser


def test_p2_float_flags_parse():
    args = _parser().parse_args(["--p2_gamma", "0.5", "--p2_k", "1"])
    assert args.p2_gamma == 0.5 and args.p2_k == 1.0


def test_reference_p2_command_line_parses():
    argv = (
        "--attention_resolutions 16 --class_cond False --diffusion_steps 1000 --dropout 0.0 --image_size 256 "
        "--learn_sigma True --noise_schedule linear --num_channels 128 --num_head_channels 64 --num_res_blocks 1 "
        "--resblock_updown True --use_fp16 False --use_scale_shift_norm True --p2_gamma 1 --p2_k 1 "
        "--rescale_learned_sigmas True"
    ).split()
    args = _parser().parse_args(argv)
    assert args.p2_gamma == 1.0 and args.resblock_updown is True and args.num_head_channels == 64


@pytest.mark.parametrize("text, value", [("yes", True), ("T", True), ("1", True), ("no", False), ("F", False), ("0", False)])
def test_str2bool(text, value):
    assert su.str2bool(text) is value


def test_str2bool_rejects_other_words():
    with pytest.raises(argparse.ArgumentTypeError, match="maybe"):
        su.str2bool("maybe")


def test_factory_precedence_rules():
    kwargs = dict(REFERENCE_DIFFUSION_DEFAULTS, p2_gamma=0.0, p2_k=1.0, sigma_small=False)
    steps = kwargs.pop("diffusion_steps")
    make = lambda **kw: su.create_gaussian_diffusion(steps=steps, **{**kwargs, **kw})  # noqa: E731
    assert make().loss_type == gd.LossType.MSE and make().model_var_type == gd.ModelVarType.FIXED_LARGE
    assert make(rescale_learned_sigmas=True).loss_type == gd.LossType.RESCALED_MSE
    assert make(use_kl=True, rescale_learned_sigmas=True).loss_type == gd.LossType.RESCALED_KL
    assert make(learn_sigma=True, sigma_small=True).model_var_type == gd.ModelVarType.LEARNED_RANGE
    assert make(sigma_small=True).model_var_type == gd.ModelVarType.FIXED_SMALL
    assert make(predict_xstart=True).model_mean_type == gd.ModelMeanType.START_X
    assert make(timestep_respacing="250").num_timesteps == 250


@pytest.mark.parametrize(
    "text, rates", [("16,8", (16, 32)), ("16", (16,)), ("", ()), ("none", ()), ("None", ()), ("512", (0,))]
)
def test_attention_resolutions(text, rates):
    assert su.parse_attention_resolutions(text, 256) == rates


def test_channel_mult_defaults_and_errors():
    assert su.parse_channel_mult("", 32) == (1, 2, 2, 2)
    assert su.parse_channel_mult("", 256) == (1, 1, 2, 2, 4, 4)
    assert su.parse_channel_mult("1,2,2", 32) == (1, 2, 2)
    with pytest.raises(ValueError, match="channel_mult"):
        su.parse_channel_mult("", 48)
    with pytest.raises(ValueError, match="channel_mult"):
        su.parse_channel_mult("1,x", 32)


def test_config_then_flags_precedence(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("p2_gamma: 0.5\nnum_channels: 32\nlearn_sigma: true\nchannel_mult: [1, 2]\n")
    defaults = su.model_and_diffusion_defaults()
    args = su.parse_args_with_config(defaults, ["--config", str(config), "--num_channels", "64"])
    assert args.p2_gamma == 0.5  # from the config
    assert args.num_channels == 64  # the flag wins over the config
    assert args.learn_sigma is True and args.channel_mult == "1,2"
    assert args.image_size == 64  # untouched default


def test_config_unknown_key_named(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("p2_gamma: 1.0\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        su.parse_args_with_config(su.model_and_diffusion_defaults(), ["--config", str(config)])


def test_config_missing_file_and_bad_values(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        su.load_config(str(tmp_path / "nope.yaml"), {})
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_channels: many\n")
    with pytest.raises(ValueError, match="num_channels"):
        su.parse_args_with_config(su.model_and_diffusion_defaults(), ["--config", str(bad)])
