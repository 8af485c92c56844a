"""classifier_train.py -> classifier_sample.py end to end on a two-class image set made here: image_sample.py's
outputs, scale 0 equal to image_sample.py bit for bit, guidance raising the classifier's log p(y | x_0), ranks, and
checkpoints given to the wrong flag."""

import json
import os
import shutil
import subprocess

import classifier_sample
import classifier_train
import image_sample
import numpy as np
import pytest
import torch
from classifier_fixtures import (
    TINY_CLASSIFIER_FLAGS,
    classifier_train_argv,
    flag_tokens,
    make_two_class_folder,
    tiny_classifier,
)
from launchers import LAUNCHERS, clean_env, launcher_command
from sample_tiny_model import (
    perturb_,
    save_tiny_checkpoint,
    tiny_flags,
    tiny_model_and_diffusion,
)

from guided_diffusion.classifier_guidance import (
    classifier_cond_fn,
    label_passing_model,
    log_prob_of_labels,
)
from guided_diffusion.sampling import SamplingOptions, generate_batch, read_png
from guided_diffusion.state_dict_check import (
    CheckpointMismatchError,
    load_state_dict_checked,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING_STEPS = 150  # enough for the tiny classifier to tell the two classes apart at low noise (about 5 s)
CLASSIFIER_TOKENS = flag_tokens({k: v for k, v in TINY_CLASSIFIER_FLAGS.items() if k != "image_size"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny classifier trained by classifier_train.py on bright vs dark images: its log dir and weights file."""
    data = make_two_class_folder(str(tmp_path_factory.mktemp("two_classes")))
    log_dir = tmp_path_factory.mktemp("classifier")
    classifier_train.main(classifier_train_argv(data, str(log_dir), iterations=TRAINING_STEPS, lr=3e-3,
                                                save_interval=TRAINING_STEPS, log_interval=50))
    return str(log_dir), str(log_dir / f"model{TRAINING_STEPS:06d}.pt")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random diffusion checkpoints: unconditional, and class-conditional over 1000 classes as image_train.py
    builds them."""
    folder = tmp_path_factory.mktemp("diffusion")
    return (save_tiny_checkpoint(str(folder / "ema_0.9999_000010.pt")),
            save_tiny_checkpoint(str(folder / "cond_000010.pt"), class_cond=True))


def guided(model_path, classifier_path, *flags, **model_flags):
    """Run classifier_sample in this process with the tiny model's flags (10 of T = 50 steps unless overridden); the
    classifier's flags come from the config.yaml classifier_train.py saved beside it."""
    model_flags.setdefault("timestep_respacing", "10")
    argv = tiny_flags(**model_flags) + ["--model_path", model_path, "--num_samples", "2", *flags]
    return classifier_sample.main(argv + (["--classifier_path", classifier_path] if classifier_path else []))


def load_npz(path):
    with np.load(path) as npz:
        return {key: npz[key] for key in npz.files}


def test_train_then_sample_writes_what_image_sample_writes_and_resumes(trained, models, capsys):
    result = guided(models[0], trained[1], "--num_samples", "5", "--batch_size", "3", "--classifier_scale", "2")
    assert result.npz_path == os.path.join(os.path.dirname(models[0]), "samples_ema_0.9999_000010_10_classifier2",
                                           "samples_5x16x16x3.npz")
    arrays = load_npz(result.npz_path)
    assert sorted(arrays) == ["arr_0", "arr_1"]
    assert arrays["arr_0"].shape == (5, 16, 16, 3) and arrays["arr_0"].dtype == np.uint8
    assert arrays["arr_1"].dtype == np.int64 and arrays["arr_1"].max() < 1000  # the classifier's classes
    for k in range(5):
        image, label = read_png(os.path.join(result.images_dir, f"{k:06d}.png"))
        assert np.array_equal(image, arrays["arr_0"][k]) and label == arrays["arr_1"][k]
    assert read_png(result.grid_path)[0].shape == (20, 5 * 18 + 2, 3)
    with open(os.path.join(os.path.dirname(result.npz_path), "run.json")) as f:
        identity = json.load(f)["identity"]
    assert identity["classifier_scale"] == 2.0 and identity["classifier_depth"] == 1 and "classifier_sha256" in identity
    assert "classifier scale 2" in capsys.readouterr().out
    again = guided(models[0], trained[1], "--num_samples", "6", "--batch_size", "3", "--classifier_scale", "2")
    assert again.num_generated == 1
    assert np.array_equal(load_npz(again.npz_path)["arr_0"][:5], arrays["arr_0"])


@pytest.mark.parametrize("use_ddim", ["False", "True"])
def test_scale_zero_gives_image_samples_samples_bit_for_bit(trained, models, tmp_path, use_ddim):
    flags = ["--num_samples", "4", "--batch_size", "2", "--use_ddim", use_ddim]
    plain = image_sample.main(tiny_flags(timestep_respacing="10", class_cond=True)
                              + ["--model_path", models[1], *flags, "--sample_dir", str(tmp_path / "plain")])
    zero = guided(models[1], trained[1], *flags, "--classifier_scale", "0", "--sample_dir", str(tmp_path / "zero"),
                  class_cond=True)
    expected, found = load_npz(plain.npz_path), load_npz(zero.npz_path)
    assert np.array_equal(found["arr_1"], expected["arr_1"])
    assert np.array_equal(found["arr_0"], expected["arr_0"])
    one = guided(models[1], trained[1], *flags, "--classifier_scale", "1", "--sample_dir", str(tmp_path / "one"),
                 class_cond=True)
    assert not np.array_equal(load_npz(one.npz_path)["arr_0"], expected["arr_0"])


@pytest.mark.parametrize("use_ddim", [False, True])
def test_guidance_raises_the_classifiers_log_p_of_the_samples(trained, use_ddim):
    classifier = tiny_classifier()
    classifier.load_state_dict(torch.load(trained[1], weights_only=True))
    classifier.eval().requires_grad_(False)
    torch.manual_seed(0)  # the model's initial weights, whatever ran before
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="10")
    network = label_passing_model(perturb_(model).eval(), class_cond=False)
    options = SamplingOptions(image_size=16, class_cond=True, num_classes=2, use_ddim=use_ddim)  # the trained classes
    mean_log_p = {}
    for scale in (0.0, 10.0):
        images, labels = generate_batch(network, diffusion, list(range(32)), options, "cpu",
                                        classifier_cond_fn(classifier, scale))
        x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        mean_log_p[scale] = log_prob_of_labels(classifier, x0, torch.from_numpy(labels)).mean().item()
    # Measured gains over model seeds 0-3: 0.16-0.21 (ancestral), 0.28-0.33 (DDIM); a flipped sign gives < 0.
    assert mean_log_p[10.0] > mean_log_p[0.0] + 0.1, mean_log_p


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_ranks_give_the_one_rank_samples(trained, models, tmp_path, launcher):
    flags = ["--num_samples", "5", "--batch_size", "2", "--classifier_path", trained[1], "--model_path", models[0]]
    one = guided(models[0], trained[1], *flags[:4], "--sample_dir", str(tmp_path / "one"))
    command = launcher_command(launcher, os.path.join(ROOT, "scripts", "classifier_sample.py"),
                               *tiny_flags(timestep_respacing="10"), *CLASSIFIER_TOKENS, *flags,
                               "--sample_dir", str(tmp_path / "two"))
    done = subprocess.run(command, check=False, cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = load_npz(str(tmp_path / "two" / "samples_5x16x16x3.npz"))
    expected = load_npz(one.npz_path)
    assert np.array_equal(two["arr_0"], expected["arr_0"]) and np.array_equal(two["arr_1"], expected["arr_1"])


# --- Bad input ---


def test_classifier_as_model_path_and_diffusion_model_as_classifier_path_are_named(trained, models, tmp_path):
    # In its run folder, the config.yaml beside it gives it away; elsewhere, its keys do.
    moved = str(tmp_path / "classifier.pt")
    shutil.copy(trained[1], moved)
    for model_path, text in ((trained[1], "is in a classifier_train.py run folder"),
                             (moved, "the checkpoint is a noisy-image classifier (no output_blocks)")):
        for main, argv in ((classifier_sample.main, CLASSIFIER_TOKENS + ["--classifier_path", models[0]]),
                           (image_sample.main, [])):
            with pytest.raises(SystemExit) as error:
                main(tiny_flags() + argv + ["--model_path", model_path, "--sample_dir", str(tmp_path / "s")])
            message = str(error.value.code)
            assert message.startswith(f"{main.__module__}.py: error:") and text in message, message
            assert "pass it as --classifier_path" in message
    with pytest.raises(SystemExit, match="is a diffusion U-Net .* pass it as --model_path"):
        guided(models[0], models[0], *CLASSIFIER_TOKENS, "--sample_dir", str(tmp_path / "b"))
    assert not os.path.exists(tmp_path / "s") and not os.path.exists(tmp_path / "b")


def test_classifier_of_another_diffusion_process_is_refused(trained, tmp_path):
    other = save_tiny_checkpoint(str(tmp_path / "ema.pt"), diffusion_steps=100)
    with pytest.raises(SystemExit, match="learned x_t of another process \\(--diffusion_steps 50 in .*, 100 here\\)"):
        guided(other, trained[1], "--sample_dir", str(tmp_path / "s"), diffusion_steps=100)


def test_refused_requests_end_with_one_line(trained, models, tmp_path):
    cases = [
        ((models[0], None), {}, "--classifier_scale 1 on an unconditional model needs --classifier_path"),
        ((models[0], None, "--classifier_scale", "0"), {}, "unconditional model without --classifier_path"),
        ((models[0], trained[1], "--sampler", "heun"), {"timestep_respacing": ""},
         "--sampler heun takes no classifier"),
        ((models[0], trained[1], "--heun_churn", "5"), {}, "--sampler ancestral and --heun_churn 5 do not go together"),
        ((models[0], os.path.join(trained[0], f"state{TRAINING_STEPS:06d}.pt")), {},
         f"training-state file; use the weights saved beside it: model{TRAINING_STEPS:06d}.pt"),
        ((models[0], trained[1], "--classifier_depth", "2"), {}, "check --classifier_depth"),
        ((models[0], trained[1], "--classifier_pool", "adaptive"), {}, "check --classifier_pool"),
        ((models[0], trained[0]), {}, "--classifier_path"),
    ]
    for k, (args, model_flags, message) in enumerate(cases):
        with pytest.raises(SystemExit) as error:
            guided(*args, "--sample_dir", str(tmp_path / str(k)), **model_flags)
        assert str(error.value.code).startswith("classifier_sample.py: error:") and message in str(error.value.code)
    assert not any(os.listdir(tmp_path / str(k)) for k in range(len(cases)) if os.path.isdir(tmp_path / str(k)))


def test_class_counts_of_model_and_classifier_must_agree(trained, tmp_path):
    ten_classes = save_tiny_checkpoint(str(tmp_path / "ten.pt"), class_cond=True)
    weights = torch.load(ten_classes, weights_only=True)
    weights["label_emb.weight"] = weights["label_emb.weight"][:10]
    torch.save(weights, ten_classes)
    with pytest.raises(SystemExit, match="diffusion model has 10 classes and the classifier 1000"):
        guided(ten_classes, trained[1], "--sample_dir", str(tmp_path / "s"), class_cond=True)


@pytest.mark.parametrize("checkpoint_flags, model_flags, expected", [
    ({"classifier_resblock_updown": False}, {}, "--classifier_resblock_updown False"),
    ({}, {"classifier_use_scale_shift_norm": False}, "--classifier_use_scale_shift_norm"),
    ({"classifier_width": 64}, {}, "--classifier_width"),
    ({"classifier_attention_resolutions": "none"}, {}, "--classifier_attention_resolutions"),
    ({"classifier_pool": "spatial"}, {}, "--classifier_pool"),
])
def test_classifier_mismatch_names_the_classifier_flag(checkpoint_flags, model_flags, expected):
    with pytest.raises(CheckpointMismatchError) as error:
        load_state_dict_checked(tiny_classifier(**model_flags), tiny_classifier(**checkpoint_flags).state_dict(),
                                "classifier.pt")
    message = str(error.value)
    assert message.startswith("classifier.pt does not fit the classifier built from the current flags")
    assert expected in message and "no flag explains" not in message, message
