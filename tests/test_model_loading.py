"""guided_diffusion/model_loading.py: the flags of a checkpoint script (defaults -> the config beside the checkpoint or
--config, without its training options -> command line), loading checked weights, and the weights' fingerprint."""

import pytest
import torch
import yaml

from guided_diffusion import model_loading
from guided_diffusion.checkpoint import CONFIG_FILE, training_state
from guided_diffusion.script_util import sample_defaults, train_flag_defaults
from sample_tiny_model import TINY_MODEL_FLAGS, save_tiny_checkpoint


def parse(argv):
    return model_loading.parse_checkpoint_args(model_loading.checkpoint_parser("test", sample_defaults()), argv)


@pytest.fixture
def run_dir(tmp_path):
    """A checkpoint with the config.yaml image_train.py would save beside it (every training flag)."""
    save_tiny_checkpoint(str(tmp_path / "ema_0.99_000010.pt"), num_res_blocks=2)
    config = {**train_flag_defaults(), **TINY_MODEL_FLAGS, "num_res_blocks": 2, "timestep_respacing": "5",
              "seed": 7, "batch_size": 3, "precision": "bf16", "lr": 3e-4, "log_dir": str(tmp_path)}
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(config))
    return tmp_path


def test_config_beside_the_checkpoint_gives_the_model_flags_and_the_command_line_wins(run_dir):
    checkpoint = str(run_dir / "ema_0.99_000010.pt")
    args = parse(["--model_path", checkpoint])
    assert args.config == str(run_dir / CONFIG_FILE)
    assert (args.image_size, args.num_res_blocks, args.diffusion_steps, args.timestep_respacing) == (16, 2, 50, "5")
    # Training options are ignored, also where the script has a flag of that name: its own defaults stay.
    assert (args.seed, args.batch_size, args.precision) == (0, 16, "fp32")
    overridden = parse(["--model_path", checkpoint, "--timestep_respacing", "10", "--seed", "3"])
    assert (overridden.timestep_respacing, overridden.seed, overridden.num_res_blocks) == ("10", 3, 2)
    model, diffusion, identity = model_loading.load_model_and_diffusion(args)
    assert len(diffusion.use_timesteps) == 5 and identity["num_res_blocks"] == 2


def test_explicit_config_replaces_the_one_beside_and_unknown_keys_are_named(run_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("cfg") / "sampling.yaml"
    other.write_text(yaml.safe_dump({**TINY_MODEL_FLAGS, "num_samples": 9, "use_ddim": True}))
    args = parse(["--model_path", str(run_dir / "ema_0.99_000010.pt"), "--config", str(other)])
    # Nothing of the config beside the checkpoint (num_res_blocks 2, timestep_respacing 5) is read.
    assert (args.num_samples, args.use_ddim, args.num_res_blocks, args.timestep_respacing) == (9, True, 1, "")
    other.write_text("num_samples: 9\nsampels: 3\n")
    with pytest.raises(ValueError, match="unknown key\\(s\\) sampels"):
        parse(["--model_path", str(run_dir / "ema_0.99_000010.pt"), "--config", str(other)])


def test_training_state_file_as_model_path_names_the_weights_beside_it(run_dir):
    weights = torch.load(run_dir / "ema_0.99_000010.pt", weights_only=True)
    state = training_state(step=10, model=weights, ema={"0.99": weights}, optimizer={}, grad_scaler={},
                           schedule_sampler={}, rng=[], data={}, config={})
    torch.save(state, run_dir / "state000010.pt")
    args = parse(["--model_path", str(run_dir / "state000010.pt")])
    with pytest.raises(ValueError, match=r"is a training-state file; .*ema_<rate>_000010\.pt .*model000010\.pt"):
        model_loading.load_model_and_diffusion(args)


def test_fingerprint_names_the_weights_whatever_the_file_format(tmp_path):
    weights = torch.load(save_tiny_checkpoint(str(tmp_path / "a.pt")), weights_only=True)
    legacy = tmp_path / "legacy.pt"
    torch.save(weights, legacy, _use_new_zipfile_serialization=False)
    # Memory layout is not content: NHWC convolution kernels hold the same weights.
    nhwc = {k: v.to(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in weights.items()}
    assert any(not v.is_contiguous() for v in nhwc.values())
    fingerprint = model_loading.state_dict_fingerprint(weights)
    assert model_loading.state_dict_fingerprint(torch.load(legacy, weights_only=True)) == fingerprint
    assert model_loading.state_dict_fingerprint(nhwc) == fingerprint
    changed = dict(weights)
    changed["out.2.bias"] = weights["out.2.bias"].clone()
    changed["out.2.bias"][0] += 1e-6
    assert model_loading.state_dict_fingerprint(changed) != fingerprint
    assert model_loading.state_dict_fingerprint({**weights, "out.2.bias": weights["out.2.bias"].double()}) != fingerprint


@pytest.mark.parametrize("damage", ["empty", "truncated", "text"])
def test_unreadable_checkpoint_is_a_named_error(run_dir, damage):
    whole = (run_dir / "ema_0.99_000010.pt").read_bytes()
    content = {"empty": b"", "truncated": whole[: len(whole) // 2], "text": b"not a checkpoint"}[damage]
    path = run_dir / "model000010.pt"
    path.write_bytes(content)
    args = parse(["--model_path", str(path)])
    with pytest.raises(ValueError, match="model000010.pt' is not a readable PyTorch checkpoint"):
        model_loading.load_model_and_diffusion(args)
