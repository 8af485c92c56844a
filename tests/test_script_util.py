"""Flags, defaults and config precedence (docs/compatibility.md, "Command-line flags"): defaults -> YAML config
(its base chain first) -> command-line flags."""

import argparse

import pytest
import yaml

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
    # Fixed here (docs/compatibility.md, "Reference defects fixed here"): P2 flags are floats.
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


@pytest.mark.parametrize("text, rates", [("16,8", (16, 32)), ("16", (16,)), ("8", (32,)), ("256", (1,)), ("", ()),
                                         ("none", ()), ("None", ())])
def test_attention_resolutions(text, rates):
    assert su.parse_attention_resolutions(text, 256, (1, 1, 2, 2, 4, 4)) == rates


@pytest.mark.parametrize("text", ["512", "24", "4", "16,3"])
def test_attention_resolution_the_unet_never_reaches_is_named(text):
    # 256 px with six levels runs at 256, 128, 64, 32, 16 and 8 pixels: 512 would be rate 0, 24 rate 10, 4 a
    # seventh level; each would silently leave the model without that attention.
    bad = text.split(",")[-1]
    with pytest.raises(ValueError, match=f"resolution {bad} is never reached .* reachable: 256,128,64,32,16,8"):
        su.parse_attention_resolutions(text, 256, (1, 1, 2, 2, 4, 4))
    with pytest.raises(ValueError, match=f"resolution {bad} is never reached"):
        su.create_model(256, 32, 1, attention_resolutions=text)


def test_channel_mult_defaults_and_errors():
    assert su.parse_channel_mult("", 32) == (1, 2, 2, 2)
    assert su.parse_channel_mult("", 256) == (1, 1, 2, 2, 4, 4)
    assert su.parse_channel_mult("1,2,2", 32) == (1, 2, 2)
    with pytest.raises(ValueError, match="channel_mult"):
        su.parse_channel_mult("", 48)
    with pytest.raises(ValueError, match="channel_mult"):
        su.parse_channel_mult("1,x", 32)


def _parse(argv, defaults=None, **kwargs):
    return su.parse_args(su.build_parser(defaults or su.model_and_diffusion_defaults(), "test"), argv, **kwargs)


def test_config_then_flags_precedence(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("p2_gamma: 0.5\nnum_channels: 32\nlearn_sigma: true\nchannel_mult: [1, 2]\n")
    args = _parse(["--config", str(config), "--num_channels", "64"])
    assert args.p2_gamma == 0.5  # from the config
    assert args.num_channels == 64  # the flag wins over the config
    assert args.learn_sigma is True and args.channel_mult == "1,2"
    assert args.image_size == 64  # untouched default
    assert args.config == str(config)
    assert _parse([]).config == "" and _parse([]).p2_gamma == 0.0


def test_config_unknown_key_named(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("p2_gamma: 1.0\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown key\\(s\\) learning_rate"):
        _parse(["--config", str(config)])


@pytest.mark.parametrize("line, message", [
    ("num_channels: many", "num_channels: 'many' is not a valid int"),
    ("num_channels: 2.7", "num_channels: '2.7' is not a valid int"),   # not truncated to 2, as --num_channels 2.7
    ("num_channels: true", "num_channels: 'true' is not a valid int"),
    ("learn_sigma: maybe", "learn_sigma: 'maybe' is not a valid str2bool"),
    ("p2_gamma: [1, 2]", "p2_gamma: \\['1', '2'\\] is not a valid float"),
    ("dropout:", "dropout has no value"),
    ("image_size: {a: 1}", "image_size holds a mapping"),
])
def test_config_values_go_through_the_flag_types(tmp_path, line, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(line + "\n")
    with pytest.raises(ValueError, match=f"bad.yaml'?: {message}"):
        _parse(["--config", str(bad)])
    flag, _, value = line.partition(": ")
    if flag == "num_channels" and value in ("many", "2.7"):
        with pytest.raises(SystemExit):  # argparse refuses the same text on the command line
            _parse([f"--{flag}", value])


# (flag, text): the text as a YAML value and as a command-line token must give the same value, or both be refused.
# YAML 1.1 alone would read 0x10 and 1:30 as ints, on as a bool, 0.99990 as 0.9999 and true as a bool.
SAME_AS_THE_COMMAND_LINE = [
    ("batch_size", "2.7"), ("batch_size", "0x10"), ("batch_size", "1:30"), ("batch_size", "true"),
    ("batch_size", "1_000"), ("batch_size", "12"),
    ("use_fp16", "on"), ("use_fp16", "yes"), ("use_fp16", "True"), ("use_fp16", "1"), ("use_fp16", "2"),
    ("lr", "1e-4"), ("lr", "3"), ("lr", "true"), ("lr", "inf"),
    ("data_dir", "true"), ("data_dir", "0x10"), ("data_dir", "2021-01-01"), ("data_dir", "0.10"),
    ("ema_rate", "0.99990"), ("ema_rate", "0.9999,0.99"),
]


@pytest.mark.parametrize("flag, text", SAME_AS_THE_COMMAND_LINE)
def test_config_values_follow_the_command_line_rules(tmp_path, capsys, flag, text):
    defaults = {**su.model_and_diffusion_defaults(), **su.train_defaults()}
    config = tmp_path / "c.yaml"
    config.write_text(f"{flag}: {text}\n")
    try:
        from_command_line = getattr(_parse([f"--{flag}", text], defaults), flag)
    except SystemExit:
        assert f"--{flag}" in capsys.readouterr().err   # argparse's refusal names the flag
        with pytest.raises(ValueError, match=f"c.yaml'?: {flag}: '{text}' is not a valid"):
            _parse(["--config", str(config)], defaults)
        return
    from_config = getattr(_parse(["--config", str(config)], defaults), flag)
    assert from_config == from_command_line and type(from_config) is type(from_command_line)


def test_saved_configs_read_back_with_their_types(tmp_path):
    # image_sample.py reads the config.yaml that training saved (yaml.safe_dump) through the same rules.
    saved = {"lr": 1e-5, "save_interval_minutes": float("inf"), "use_fp16": True, "ema_rate": "0.9999",
             "data_dir": "", "resume_checkpoint": "", "batch_size": 8}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(saved))
    args = _parse(["--config", str(config)], {**su.model_and_diffusion_defaults(), **su.train_defaults()})
    assert {key: getattr(args, key) for key in saved} == saved


def test_config_choices_and_list_flags_convert_like_the_command_line(tmp_path):
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--config", default="")
    parser.add_argument("--mode", default="a", choices=("a", "b"))
    parser.add_argument("--sizes", nargs="+", type=int, default=[1])
    config = tmp_path / "c.yaml"
    config.write_text("sizes: [3, 4]\n")
    assert su.parse_args(parser, ["--config", str(config)]).sizes == [3, 4]
    config.write_text("mode: c\n")
    with pytest.raises(ValueError, match="mode: 'c' is not one of a, b"):
        su.parse_args(parser, ["--config", str(config)])


def test_config_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        su.read_config_file(str(tmp_path / "nope.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        su.read_config_file(str(tmp_path / "list.yaml"))
    (tmp_path / "broken.yaml").write_text("a: [1\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        su.read_config_file(str(tmp_path / "broken.yaml"))


def test_base_chain_resolves_relative_to_each_file_and_later_files_win(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("num_channels: 32\np2_gamma: 1.0\ndropout: 0.1\n")
    (tmp_path / "sub" / "middle.yaml").write_text("base: ../root.yaml\np2_gamma: 0.5\n")
    (tmp_path / "sub" / "leaf.yaml").write_text("base: middle.yaml\ndropout: 0.0\n")
    leaf = str(tmp_path / "sub" / "leaf.yaml")
    assert su.read_config_file(leaf) == {"num_channels": "32", "p2_gamma": "0.5", "dropout": "0.0"}   # texts
    args = _parse(["--config", leaf, "--p2_gamma", "2"])
    assert (args.num_channels, args.p2_gamma, args.dropout) == (32, 2.0, 0.0)


def test_base_cycle_and_missing_base_are_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="cycle: a.yaml -> b.yaml -> a.yaml"):
        su.read_config_file(str(tmp_path / "a.yaml"))
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ValueError, match="cycle: self.yaml -> self.yaml"):
        su.read_config_file(str(tmp_path / "self.yaml"))
    (tmp_path / "orphan.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(FileNotFoundError, match="gone.yaml.*the base of .*orphan.yaml"):
        su.read_config_file(str(tmp_path / "orphan.yaml"))


def test_ignored_keys_are_dropped_even_where_the_script_has_the_flag(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("seed: 7\nlr: 0.5\nnum_channels: 32\n")
    args = _parse(["--config", str(config)], {**su.model_and_diffusion_defaults(), "seed": 0},
                  ignored_keys=frozenset({"seed", "lr"}))
    assert (args.seed, args.num_channels) == (0, 32)


def test_every_training_flag_is_either_maths_or_may_change_on_resume():
    flags = set(su.train_flag_defaults())
    assert su.RESUME_MAY_CHANGE <= flags and su.RESUME_CHANGE_LOGGED <= su.RESUME_MAY_CHANGE
    maths = flags - su.RESUME_MAY_CHANGE
    # Everything that defines the model, the diffusion (and its P2 weighting) or the optimisation must match.
    assert set(su.model_and_diffusion_defaults()) - {"use_checkpoint"} <= maths
    assert {"lr", "weight_decay", "lr_anneal_steps", "batch_size", "microbatch", "ema_rate", "schedule_sampler",
            "precision", "use_fp16", "fp16_scale_growth", "seed", "random_flip"} <= maths
    assert {"log_dir", "resume_checkpoint", "max_steps", "save_interval", "num_workers", "compile",
            "channels_last", "data_dir", "eval_interval", "inception_path"} <= su.RESUME_MAY_CHANGE
    assert len(flags) == len(maths) + len(su.RESUME_MAY_CHANGE)

