"""Tests of configs/*.yaml: every file loads as flags, builds a model and diffusion, and matches the paper's Table A."""

import glob
import os

import pytest
import torch

from guided_diffusion import script_util

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))

# Training flags of scripts/image_train.py that a config may set (besides the model and diffusion flags).
TRAINING_KEYS = ("data_dir", "schedule_sampler", "lr", "weight_decay", "lr_anneal_steps", "batch_size", "microbatch",
                 "ema_rate", "log_interval", "save_interval", "max_steps", "precision", "seed", "num_workers")
ALLOWED_KEYS = (*script_util.model_and_diffusion_defaults(), *TRAINING_KEYS)

# Table A of the paper (COMPAT §11): gamma of the P2 run, dropout, steps = images seen / batch 8, parameters.
TABLE_A = {
    "ffhq": (0.5, 0.0, 2_250_000, 93_563_910),
    "celebahq": (0.5, 0.0, 550_000, 93_563_910),
    "afhq_dog": (1.0, 0.1, 300_000, 93_563_910),
    "cub": (1.0, 0.1, 600_000, 93_563_910),
    "flowers": (1.0, 0.1, 550_000, 93_563_910),
    "metfaces": (1.0, 0.1, 200_000, 93_563_910),
    "tab3b_no_biggan": (1.0, 0.1, 100_000, 80_649_094),
    "tab3c_bottleneck_attention": (1.0, 0.1, 100_000, 90_408_966),
    "tab3d_two_res_blocks": (1.0, 0.1, 100_000, 131_713_286),
}


def _load(path):
    return script_util.load_config(path, ALLOWED_KEYS)


def _flags(config):
    flags = script_util.model_and_diffusion_defaults()
    flags.update({k: v for k, v in config.items() if k in flags})
    return flags


def test_every_table_a_row_and_its_baseline_twin_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    expected = {f"{row}_{weighting}.yaml" for row in TABLE_A for weighting in ("p2", "baseline")}
    assert expected | {"demo.yaml", "demo_baseline.yaml"} == names


def test_demo_baseline_twin_differs_only_in_gamma():
    p2 = _load(os.path.join(CONFIG_DIR, "demo.yaml"))
    baseline = _load(os.path.join(CONFIG_DIR, "demo_baseline.yaml"))
    assert {k for k in p2 if p2[k] != baseline[k]} == {"p2_gamma"}
    assert p2["p2_gamma"] == 1.0 and baseline["p2_gamma"] == 0.0


@pytest.mark.parametrize("row", sorted(TABLE_A))
def test_paper_config_matches_table_a(row):
    gamma, dropout, max_steps, num_params = TABLE_A[row]
    p2 = _load(os.path.join(CONFIG_DIR, f"{row}_p2.yaml"))
    baseline = _load(os.path.join(CONFIG_DIR, f"{row}_baseline.yaml"))
    assert p2["p2_gamma"] == gamma and baseline["p2_gamma"] == 0.0
    assert {k: v for k, v in p2.items() if k != "p2_gamma"} == {k: v for k, v in baseline.items() if k != "p2_gamma"}
    assert p2["dropout"] == dropout and p2["max_steps"] == max_steps
    shared = dict(image_size=256, num_channels=128, learn_sigma=True, rescale_learned_sigmas=True,
                  diffusion_steps=1000, noise_schedule="linear", p2_k=1.0, num_head_channels=64, lr=2e-5,
                  batch_size=8, ema_rate="0.9999", weight_decay=0.0, lr_anneal_steps=0, use_fp16=False)
    assert {k: p2[k] for k in shared} == shared

    # 256 px models are only instantiated, on the meta device: no memory, no forward pass.
    with torch.device("meta"):
        model, diffusion = script_util.create_model_and_diffusion(**_flags(p2))
    assert sum(p.numel() for p in model.parameters()) == num_params
    assert diffusion.num_timesteps == 1000
    assert diffusion.p2_weight[0] == pytest.approx((1.0 + diffusion.snr[0]) ** -gamma)


def test_demo_config_builds_and_runs():
    config = _load(os.path.join(CONFIG_DIR, "demo.yaml"))
    assert config["data_dir"] == "" and config["image_size"] == 32
    model, diffusion = script_util.create_model_and_diffusion(**_flags(config))
    assert sum(p.numel() for p in model.parameters()) == 1_371_974   # the size demo.yaml's header states
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([0, 999])
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == (2, 6, 32, 32)
    losses = diffusion.training_losses(model, x, t)
    assert losses["loss"].shape == (2,) and torch.isfinite(losses["loss"]).all()


def test_unknown_key_is_rejected_by_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("image_size: 32\nlearning_rate: 1.0e-4\n")
    with pytest.raises(ValueError, match="learning_rate"):
        _load(str(bad))


@pytest.mark.parametrize("image_size, channel_mult", [(48, ""), (34, "1,2,2")])
def test_unsupported_image_size_fails_when_the_model_is_built(image_size, channel_mult):
    # image_train.py builds the model before it opens the data, so this error comes before any image is read.
    flags = script_util.model_and_diffusion_defaults()
    flags.update(image_size=image_size, channel_mult=channel_mult)
    with pytest.raises(ValueError, match=f"image_size={image_size}"):
        script_util.create_model_and_diffusion(**flags)
