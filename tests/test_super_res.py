"""Super-resolution: SuperResModel's layout against the reference's released upsamplers, its conditioning, the
low-resolution training input, base samples, and super_res_train.py -> super_res_sample.py end to end."""

import hashlib
import os

import image_sample
import numpy as np
import pytest
import super_res_sample
import super_res_train
import torch
import torch.nn.functional as F
import yaml
from sample_tiny_model import perturb_, save_tiny_checkpoint
from train_fixtures import make_image_folder

from guided_diffusion.script_util import (
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)
from guided_diffusion.state_dict_check import (
    CheckpointMismatchError,
    load_state_dict_checked,
)
from guided_diffusion.super_res import BaseSamples, LowResBatches, SuperResModel
from guided_diffusion.unet import UNetModel

# The flags of the released upsamplers (the reference's README) and what the reference code builds from them:
# state_dict entries, parameters, and the SHA-256 of "key:shape" lines in state_dict order (cross-checked against
# openai/guided-diffusion's sr_create_model_and_diffusion).
RELEASED = {
    "64_256_upsampler": (
        {"attention_resolutions": "32,16,8", "class_cond": True, "diffusion_steps": 1000, "large_size": 256, "small_size": 64,
             "learn_sigma": True, "noise_schedule": "linear", "num_channels": 192, "num_heads": 4, "num_res_blocks": 2,
             "resblock_updown": True, "use_fp16": True, "use_scale_shift_norm": True},
        567, 311_795_910, "af837e8753d53ec8c27837f343c50cc9c1b44e79c73f8cb0da1166e04818f046",
    ),
    "128_512_upsampler": (
        {"attention_resolutions": "32,16", "class_cond": True, "diffusion_steps": 1000, "large_size": 512, "small_size": 128,
             "learn_sigma": True, "noise_schedule": "linear", "num_channels": 192, "num_head_channels": 64, "num_res_blocks": 2,
             "resblock_updown": True, "use_fp16": True, "use_scale_shift_norm": True},
        537, 308_835_270, "60f2f5a3f1716a022df96dd4e2d0a10264cfa4de4188d292433378ca3cbd7338",
    ),
}
# The reference's sr_model_and_diffusion_defaults().
REFERENCE_SR_DEFAULTS = {
    "num_channels": 128, "num_res_blocks": 2, "num_heads": 4, "num_heads_upsample": -1, "num_head_channels": -1,
    "attention_resolutions": "16,8", "dropout": 0.0, "class_cond": False, "use_checkpoint": False, "use_scale_shift_norm": True,
    "resblock_updown": False, "use_fp16": False, "learn_sigma": False, "diffusion_steps": 1000, "noise_schedule": "linear",
    "timestep_respacing": "", "use_kl": False, "predict_xstart": False, "rescale_timesteps": False, "rescale_learned_sigmas": False,
    "large_size": 256, "small_size": 64,
}
# 16 -> 32 px, 32 channels, two levels, T = 50: a training step and a sampling step take a fraction of a second.
TINY_SR_FLAGS = {"large_size": 32, "small_size": 16, "num_channels": 32, "channel_mult": "1,2", "num_res_blocks": 1,
                     "attention_resolutions": "16", "num_heads": 2, "diffusion_steps": 50, "learn_sigma": True}


def tokens(**flags):
    return [token for key, value in flags.items() for token in (f"--{key}", str(value))]


def sr_model(**flags):
    return sr_create_model_and_diffusion(**{**sr_model_and_diffusion_defaults(), **TINY_SR_FLAGS, **flags})[0]


def layout_digest(model):
    text = "\n".join(f"{key}:{','.join(map(str, value.shape))}" for key, value in model.state_dict().items())
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("name", RELEASED)
def test_released_upsampler_flags_build_the_references_keys_shapes_and_parameter_count(name):
    flags, entries, parameters, digest = RELEASED[name]
    with torch.device("meta"):
        model, _ = sr_create_model_and_diffusion(**{**sr_model_and_diffusion_defaults(), **flags})
        image_flags = {k: v for k, v in flags.items() if k not in ("large_size", "small_size")}
        image_model, _ = create_model_and_diffusion(
            **{**model_and_diffusion_defaults(), **image_flags, "image_size": flags["large_size"],
               "channel_mult": "1,1,2,2,4,4"})
    assert isinstance(model, SuperResModel) and model.in_channels == 6
    assert (len(model.state_dict()), sum(p.numel() for p in model.parameters())) == (entries, parameters)
    assert layout_digest(model) == digest
    # The image U-Net of the same flags differs only in the first conv's input channels (3 more in the upsampler).
    sr_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    image_shapes = {k: tuple(v.shape) for k, v in image_model.state_dict().items()}
    assert list(sr_shapes) == list(image_shapes)
    assert {k for k in sr_shapes if sr_shapes[k] != image_shapes[k]} == {"input_blocks.0.0.weight"}
    assert sr_shapes["input_blocks.0.0.weight"][1] == 6


def test_flag_names_and_defaults_are_the_references():
    defaults = sr_model_and_diffusion_defaults()
    assert {k: defaults[k] for k in REFERENCE_SR_DEFAULTS} == REFERENCE_SR_DEFAULTS
    # Additions: the channel_mult table of the reference's upsamplers, the attention layout, the loss weighting.
    assert set(defaults) - set(REFERENCE_SR_DEFAULTS) == {
        "channel_mult", "use_new_attention_order", "sigma_small", "p2_gamma", "p2_k", "weighting", "snr_gamma",
        "sigmoid_bias", "sigma_data", "normalize_weights"}
    args = super_res_train.parse_args(["--data_dir", "x"])
    assert (args.large_size, args.small_size, args.lr, args.batch_size, args.ema_rate) == (256, 64, 1e-4, 1, "0.9999")


def bilinear_half_pixel(images, size):
    """Bilinear resize with half-pixel centres (align_corners False), computed by hand: [N, C, h, w] -> size."""
    h = images.shape[-1]
    src = np.clip((np.arange(size) + 0.5) * h / size - 0.5, 0, h - 1)
    low = np.floor(src).astype(int)
    high = np.minimum(low + 1, h - 1)
    weight = torch.tensor(src - low, dtype=torch.float32)
    rows = images[..., low, :] * (1 - weight)[:, None] + images[..., high, :] * weight[:, None]
    return rows[..., low] * (1 - weight) + rows[..., high] * weight


def test_low_res_is_upsampled_bilinearly_and_concatenated_after_x():
    model = perturb_(sr_model(class_cond=True)).eval()
    plain = UNetModel(32, 6, 32, 6, 1, (2,), channel_mult=(1, 2), num_classes=1000, num_heads=2,
                      use_scale_shift_norm=True)
    plain.load_state_dict(model.state_dict(), strict=True)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=generator)
    low_res = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    t, y = torch.tensor([3, 40]), torch.tensor([5, 999])
    with torch.no_grad():
        out = model(x, t, y=y, low_res=low_res)
        expected = plain(torch.cat([x, bilinear_half_pixel(low_res, 32)], dim=1), t, y)
    assert out.shape == (2, 6, 32, 32)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="low-resolution input"):
        model(x, t, y=y)


def test_state_dict_saved_and_reloaded_strict_gives_the_same_outputs(tmp_path):
    model = perturb_(sr_model()).eval()
    torch.save(model.state_dict(), tmp_path / "sr.pt")
    reloaded = sr_model()
    reloaded.load_state_dict(torch.load(tmp_path / "sr.pt", weights_only=True), strict=True)
    x, low_res, t = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16), torch.tensor([0, 49])
    with torch.no_grad():
        assert torch.equal(model(x, t, low_res=low_res), reloaded.eval()(x, t, low_res=low_res))


class Batches:
    def __init__(self, batch):
        self.batch, self.state, self.closed = batch, {"epoch": 3}, False

    def __next__(self):
        return self.batch, {"y": torch.tensor([0, 1])}

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state

    def close(self):
        self.closed = True


def test_training_low_res_is_the_area_average_of_the_batch_and_resume_state_passes_through():
    batch = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    data = LowResBatches(Batches(batch), small_size=2)
    x, cond = next(data)
    assert x is batch and torch.equal(cond["y"], torch.tensor([0, 1]))
    block_means = batch.reshape(2, 3, 2, 2, 2, 2).mean(dim=(3, 5))  # each 2x2 block
    assert torch.equal(cond["low_res"], block_means)
    # At a factor of 4 too, on images that are not a ramp (bilinear would average only the middle 2x2 of each 4x4).
    noisy = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    quarter = next(LowResBatches(Batches(noisy), small_size=1))[1]["low_res"]
    torch.testing.assert_close(quarter, noisy.mean(dim=(2, 3), keepdim=True))
    data.load_state_dict({"epoch": 7})
    assert data.state_dict() == {"epoch": 7}
    data.close()
    assert data.data.closed


def base_npz(path, size=16, count=3, labels=True):
    images = np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    np.savez(path, images, np.arange(count) % 2) if labels else np.savez(path, images)
    return str(path)


def test_base_samples_give_low_res_in_model_range_and_their_labels_cyclically(tmp_path):
    base = BaseSamples(base_npz(tmp_path / "b.npz"), 16, class_cond=True)
    kwargs = base.model_kwargs(np.array([1, 4]))  # 4 = 1 mod 3
    assert kwargs["low_res"].shape == (2, 3, 16, 16)
    assert torch.equal(kwargs["low_res"][0], kwargs["low_res"][1])
    assert torch.equal(kwargs["y"], torch.tensor([1, 1]))
    assert torch.equal(kwargs["low_res"][0], torch.from_numpy(base.images[1]).permute(2, 0, 1).float() / 127.5 - 1)


@pytest.mark.parametrize("size, labels, class_cond, message", [
    (8, True, False, r"holds 8x8 images; the model upsamples 16x16 \(--small_size 16\)"),
    (16, False, True, r"has no labels .* but --class_cond True needs one per image"),
])
def test_unusable_base_samples_are_named(tmp_path, size, labels, class_cond, message):
    path = base_npz(tmp_path / "b.npz", size=size, labels=labels)
    with pytest.raises(ValueError, match=rf"--base_samples '{path}' {message}"):
        BaseSamples(path, 16, class_cond)


def test_base_sample_labels_outside_the_models_classes_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"has labels 0\.\.1; the model knows classes 0\.\.0"):
        BaseSamples(base_npz(tmp_path / "b.npz"), 16, class_cond=True).check_labels(1)


def test_image_checkpoint_and_super_res_checkpoint_swapped_name_the_script(tmp_path):
    image_checkpoint = torch.load(save_tiny_checkpoint(str(tmp_path / "image.pt")), weights_only=True)
    with pytest.raises(CheckpointMismatchError, match="3 input channels, an image model.*scripts/image_sample.py"):
        load_state_dict_checked(sr_model(large_size=16, attention_resolutions="8"), image_checkpoint, "image.pt")
    image_model, _ = create_model_and_diffusion(**{**model_and_diffusion_defaults(), "image_size": 32,
                                                   **{k: v for k, v in TINY_SR_FLAGS.items() if "_size" not in k}})
    with pytest.raises(CheckpointMismatchError, match="6 input channels.*super-resolution model.*super_res_sample.py"):
        load_state_dict_checked(image_model, sr_model().state_dict(), "sr.pt")


@pytest.mark.parametrize("config, script, argv, message", [
    ({"image_size": 16}, super_res_sample, ["--base_samples", "b.npz"],
     "is of an image model .image_size: 16.; sample its checkpoints with scripts/image_sample.py"),
    ({"large_size": 32, "small_size": 16}, image_sample, [],
     "is of a super-resolution model .large_size: 32.; sample its checkpoints with scripts/super_res_sample.py"),
])
def test_config_of_the_other_kind_beside_the_checkpoint_names_its_script(tmp_path, config, script, argv, message):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    checkpoint = save_tiny_checkpoint(str(tmp_path / "ema.pt"))
    with pytest.raises(ValueError, match=message):
        script.parse_args(["--model_path", checkpoint, *argv])


def test_train_then_upsample_base_samples_end_to_end(tmp_path, capsys):
    data = make_image_folder(str(tmp_path / "images"), count=8, size=40)
    train_flags = dict(TINY_SR_FLAGS, class_cond=True, data_dir=data, log_dir=tmp_path / "run", batch_size=4,
                       max_steps=2, save_interval=2, ema_rate="0.9", lr=1e-3, num_workers=0, channels_last="false")
    loop = super_res_train.main(tokens(**train_flags))
    assert loop.step == 2 and isinstance(loop.model, SuperResModel)
    checkpoint = str(tmp_path / "run" / "ema_0.9_000002.pt")
    assert os.path.exists(checkpoint)

    base = base_npz(tmp_path / "samples_3x16x16x3.npz", count=3)
    sample_argv = ["--model_path", checkpoint, "--base_samples", base, "--num_samples", "4", "--batch_size", "3",
                   "--timestep_respacing", "5", "--channels_last", "false"]
    # Model flags come from the config.yaml the training run saved beside the checkpoint.
    result = super_res_sample.main(sample_argv)
    assert result.npz_path == str(tmp_path / "run" / "samples_ema_0.9_000002_5_from_samples_3x16x16x3" /
                                  "samples_4x32x32x3.npz")
    with np.load(result.npz_path) as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 0, 0]  # base sample i mod 3's label
    assert len(os.listdir(result.images_dir)) == 4 and os.path.exists(result.grid_path)
    # Sample i sees base sample i mod 3 only: changing base sample 1 changes sample 1 alone (same seed and noise).
    other_base = np.load(base)["arr_0"]
    other_base[1] = 255 - other_base[1]
    np.savez(tmp_path / "other.npz", other_base, np.arange(3) % 2)
    other = super_res_sample.main(sample_argv[:2] + ["--base_samples", str(tmp_path / "other.npz")] + sample_argv[4:])
    with np.load(other.npz_path) as npz:
        changed = [not np.array_equal(a, b) for a, b in zip(images, npz["arr_0"])]
    assert changed == [False, True, False, False]
    # Other base samples into the first run's folder are refused: they would mix with its samples.
    with pytest.raises(SystemExit, match="base_samples_sha256: folder has"):
        super_res_sample.main(sample_argv[:2] + ["--base_samples", str(tmp_path / "other.npz"), "--sample_dir",
                                                 os.path.dirname(result.npz_path)] + sample_argv[4:])
    # A rerun of the same command resumes: nothing left to generate.
    assert super_res_sample.main(sample_argv).num_generated == 0


def test_super_res_train_data_has_low_res_of_each_batch(tmp_path):
    data_dir = make_image_folder(str(tmp_path / "images"), count=4, size=40)
    args = super_res_train.parse_args(tokens(**TINY_SR_FLAGS, data_dir=data_dir, batch_size=2, num_workers=0))
    data = super_res_train.load_super_res_data(args)
    try:
        x, cond = next(data)
    finally:
        data.close()
    assert x.shape == (2, 3, 32, 32)
    torch.testing.assert_close(cond["low_res"], F.avg_pool2d(x, 2), rtol=0, atol=1e-6)
