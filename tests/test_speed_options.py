"""speed_options: flag values, and "auto" choosing the layout and the upsample fold by an (injected) timer.

The timings here are fake: tests check which form is chosen for given times, never real speed. That every choice
computes the plain path's numbers is tests/test_speed_equivalence.py's job.
"""

import json

import pytest
import torch

from guided_diffusion import speed_options
from guided_diffusion.script_util import create_model
from guided_diffusion.speed_options import ROUNDS, apply_speed_options, parse_speed_flag, wall_clock
from guided_diffusion.unet import ResBlock, Upsample, upsampling_layers


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(speed_options, "_decisions", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def tiny_model(**overrides):
    """16 px, two levels: one upsampling layer (a BigGAN up ResBlock, or a conv Upsample without resblock_updown)."""
    flags = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
                 resblock_updown=True, use_scale_shift_norm=True, dropout=0.1)
    return create_model(**{**flags, **overrides})


def fake_timer(faster):
    """A timer under which the rewritten form of each option in `faster` takes 1 s and the plain form 2 s (the
    other way round for the other options); it records (option, form) per call and runs nothing."""

    def timer(what, choice, run):
        timer.calls.append((what, choice))
        return 1.0 if choice == (what in faster) else 2.0

    timer.calls = []
    return timer


def refusing_timer(what, choice, run):
    raise AssertionError(f"measured {what} although no option was auto")


def layout_and_folds(model):
    channels_last = model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    return channels_last, [layer.fold_upsample for layer in upsampling_layers(model).values()]


@pytest.mark.parametrize("faster", [(), ("channels_last",), ("fold_upsample",), ("channels_last", "fold_upsample")])
@pytest.mark.parametrize("training", [False, True])
def test_auto_on_a_cpu_picks_the_faster_form(faster, training):
    model, timer, lines = tiny_model(), fake_timer(faster), []
    apply_speed_options(model, channels_last="auto", fold_upsample="auto", batch_size=2, training=training,
                        timer=timer, log=lines.append)
    assert layout_and_folds(model) == ("channels_last" in faster, ["fold_upsample" in faster])
    # Each form timed ROUNDS times, alternating.
    assert timer.calls == [("channels_last", False), ("channels_last", True)] * ROUNDS + [
        ("fold_upsample", False), ("fold_upsample", True)] * ROUNDS
    assert len(lines) == 2 and lines[0].startswith("speed options: channels_last ")
    assert "2000.0 ms" in lines[1] and ("training" if training else "sampling") in lines[1]


def test_conv_upsample_layers_are_chosen_for_too():
    assert [type(layer) for layer in upsampling_layers(tiny_model()).values()] == [ResBlock]
    model = tiny_model(resblock_updown=False)
    layers = upsampling_layers(model)
    assert [type(layer) for layer in layers.values()] == [Upsample]
    apply_speed_options(model, fold_upsample="auto", timer=fake_timer(()), log=lambda line: None)
    assert not layers["output_blocks.1.2"].fold_upsample


def test_parity_keeps_the_plain_form():
    # Rewritten forms 3% faster: inside the noise margin, so the reference's computation stays.
    model = tiny_model()
    apply_speed_options(model, channels_last="auto", fold_upsample="auto", log=lambda line: None,
                        timer=lambda what, choice, run: 0.97 if choice else 1.0)
    assert layout_and_folds(model) == (False, [False])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("fold_upsample", [False, True])
def test_forced_values_bypass_the_measurement(channels_last, fold_upsample):
    model, lines = tiny_model(), []
    apply_speed_options(model, channels_last=str(channels_last), fold_upsample=fold_upsample,
                        timer=refusing_timer, log=lines.append)
    assert layout_and_folds(model) == (channels_last, [fold_upsample])
    assert lines == []


def test_one_forced_option_is_applied_before_the_other_is_measured():
    # The fold is timed in the layout the run will use.
    model, seen = tiny_model(), []

    def timer(what, choice, run):
        seen.append(upsampling_layers(model)["output_blocks.1.2"].in_layers[2].weight.is_contiguous())
        return 1.0

    apply_speed_options(model, channels_last=True, fold_upsample="auto", timer=timer, log=lambda line: None)
    assert seen and not any(seen)  # NHWC weights throughout


def test_auto_off_a_cpu_means_nchw_with_the_fold():
    model = tiny_model()
    apply_speed_options(model, channels_last="auto", fold_upsample="auto", device="cuda", timer=refusing_timer)
    assert layout_and_folds(model) == (False, [True])


def test_a_choice_is_measured_once_per_workload_and_logged_each_time(monkeypatch, tmp_path):
    timer, lines = fake_timer(("channels_last",)), []
    for _ in range(2):
        apply_speed_options(tiny_model(), channels_last="auto", batch_size=2, timer=timer, log=lines.append)
    assert len(timer.calls) == 2 * ROUNDS and len(lines) == 2 and lines[0] == lines[1]
    apply_speed_options(tiny_model(), channels_last="auto", batch_size=3, timer=timer, log=lines.append)
    assert len(timer.calls) == 4 * ROUNDS  # another batch size: other shapes, measured again
    # A later process (a resumed run) reads the choices from the cache file instead of measuring again.
    assert len(json.loads((tmp_path / "cache" / "p2-diffusion" / "speed_options.json").read_text())) == 2
    monkeypatch.setattr(speed_options, "_decisions", {})
    model = apply_speed_options(tiny_model(), channels_last="auto", batch_size=2, timer=refusing_timer,
                                log=lines.append)
    assert layout_and_folds(model)[0] and lines[-1] == lines[0]


def test_an_unwritable_cache_keeps_the_choice_for_the_process(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # a file where the folder would go
    timer = fake_timer(("channels_last",))
    for _ in range(2):
        model = apply_speed_options(tiny_model(), channels_last="auto", timer=timer, log=lambda line: None)
    assert len(timer.calls) == 2 * ROUNDS and layout_and_folds(model)[0]


def test_measuring_leaves_the_random_stream_weights_and_gradients_alone():
    model = tiny_model()
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    torch.manual_seed(7)
    apply_speed_options(model, channels_last="auto", fold_upsample="auto", batch_size=2, training=True,
                        timer=fake_timer(()), log=lambda line: None)
    after_measuring = torch.rand(3)
    torch.manual_seed(7)
    torch.testing.assert_close(after_measuring, torch.rand(3), rtol=0, atol=0)
    assert all(torch.equal(value, weights[name]) for name, value in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_flag_values_and_bad_values_name_the_flag():
    assert [parse_speed_flag(v, "--channels_last") for v in ("auto", " AUTO", "yes", "0", True)] == [
        "auto", "auto", True, False, True]
    with pytest.raises(ValueError, match="--channels_last must be auto, true or false; got 'sometimes'"):
        apply_speed_options(tiny_model(), channels_last="sometimes")
    with pytest.raises(ValueError, match="fold_upsample must be auto, true or false; got None"):
        apply_speed_options(tiny_model(), fold_upsample=None)


def test_the_wall_clock_runs_once_and_returns_seconds():
    calls = []
    seconds = wall_clock("channels_last", True, lambda: calls.append(1))
    assert calls == [1] and 0 <= seconds < 1
