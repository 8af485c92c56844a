"""guided_diffusion/sampling.py: per-sample noise, quantiser, batch plan, files and resumable sampling."""

import json
import os

import numpy as np
import pytest
import torch

from guided_diffusion.fileio import TEMPORARY_MARKER
from guided_diffusion.sampling import (
    PerSampleGenerator,
    SampleFolder,
    SamplingArgumentError,
    SamplingOptions,
    generate_batch,
    image_grid,
    plan_batches,
    quantize_to_uint8,
    read_png,
    sample_seed,
    sample_to_folder,
    write_png,
)

from sample_tiny_model import perturb_, tiny_model_and_diffusion

IDENTITY = {"checkpoint_sha256": "test"}


@pytest.fixture(scope="module")
def tiny():
    """A perturbed tiny class-conditional U-Net and a 10-step respaced diffusion (T = 50)."""
    model, diffusion = tiny_model_and_diffusion(class_cond=True, timestep_respacing="10")
    return perturb_(model).eval(), diffusion


def concat_batches(tiny, indices_per_batch, options):
    model, diffusion = tiny
    batches = [generate_batch(model, diffusion, indices, options, "cpu") for indices in indices_per_batch]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def test_sample_seed_mixes_seed_and_index():
    seeds = {sample_seed(seed, index) for seed in range(4) for index in range(100)}
    assert len(seeds) == 400
    assert sample_seed(3, 7) == sample_seed(3, 7)
    assert 0 <= sample_seed(2**40, 10**9) < 2**63


def test_per_sample_noise_does_not_depend_on_the_batch():
    whole = PerSampleGenerator(5, [0, 1, 2, 3], "cpu")
    single = PerSampleGenerator(5, [2], "cpu")
    x = torch.zeros(4, 3, 8, 8)
    # The same sequence of calls on both: labels first, then x_T, then per-step noise.
    assert torch.equal(whole.randint(0, 1000)[2:3], single.randint(0, 1000))
    assert torch.equal(whole.randn((4, 3, 8, 8))[2:3], single.randn((1, 3, 8, 8)))
    for _ in range(3):
        assert torch.equal(whole.randn_like(x)[2:3], single.randn_like(x[:1]))
    other_seed = PerSampleGenerator(6, [2], "cpu")
    assert not torch.equal(PerSampleGenerator(5, [2], "cpu").randn((1, 4)), other_seed.randn((1, 4)))
    with pytest.raises(ValueError, match="4 rows of noise from 1"):
        single.randn((4, 3))


def test_quantiser_truncates_and_clamps_to_nhwc():
    # (x + 1) * 127.5 = 0, 127.999, 128.0, 254.9, 255, and out-of-range values clamp.
    values = torch.tensor([-1.0, 127.999 / 127.5 - 1, 128 / 127.5 - 1, 254.9 / 127.5 - 1, 1.0, -3.0, 2.0])
    images = values.view(1, 1, 1, 7).expand(1, 3, 1, 7).clone()
    images[0, 1] = 1.0
    out = quantize_to_uint8(images)
    assert out.dtype == torch.uint8 and out.shape == (1, 1, 7, 3)
    assert out[0, 0, :, 0].tolist() == [0, 127, 128, 254, 255, 0, 255]
    assert out[0, 0, :, 1].tolist() == [255] * 7


def test_plan_makes_exactly_the_needed_batches_round_robin():
    rounds = plan_batches(set(range(10)), batch_size=3, world_size=2)
    batches = [b.tolist() for r in rounds for b in r]
    assert batches == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert [len(r) for r in rounds] == [2, 2]
    # Gaps left by an interrupted multi-rank run are filled in index order.
    rounds = plan_batches({3, 4, 5, 9, 11}, batch_size=2, world_size=3)
    assert [[b.tolist() for b in r] for r in rounds] == [[[3, 4], [5, 9], [11]]]
    assert plan_batches(set(), batch_size=4, world_size=2) == []


def test_grid_places_images_row_major_with_padding():
    images = np.stack([np.full((4, 5, 3), k + 1, dtype=np.uint8) for k in range(10)])
    grid = image_grid(images, columns=8, padding_px=2)
    assert grid.shape == (2 * (4 + 2) + 2, 8 * (5 + 2) + 2, 3)
    assert grid[2, 2, 0] == 1 and grid[2, 2 + 7 * 7, 0] == 8
    assert grid[2 + 6, 2 + 7, 0] == 10
    assert grid[0, :, :].max() == 0 and grid[2 + 6, 2 + 2 * 7, 0] == 0  # border and the empty cell
    assert image_grid(images[:3]).shape == (4 + 4, 3 * 7 + 2, 3)


def test_png_round_trip_keeps_pixels_and_label(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    write_png(str(tmp_path / "a.png"), image, label=917)
    write_png(str(tmp_path / "b.png"), image)
    pixels, label = read_png(str(tmp_path / "a.png"))
    assert np.array_equal(pixels, image) and label == 917
    assert read_png(str(tmp_path / "b.png"))[1] is None
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png"]


def test_samples_and_labels_do_not_depend_on_batch_size(tiny):
    options = SamplingOptions(image_size=16, class_cond=True, seed=3)
    images_1, labels_1 = concat_batches(tiny, [list(range(7))], options)
    images_2, labels_2 = concat_batches(tiny, [[0, 1, 2], [3, 4, 5], [6]], options)
    images_3, labels_3 = concat_batches(tiny, [[k] for k in range(7)], options)
    assert images_1.shape == (7, 16, 16, 3) and images_1.dtype == np.uint8
    assert labels_1.dtype == np.int64 and labels_1.min() >= 0 and labels_1.max() < 1000
    assert np.array_equal(labels_1, labels_2) and np.array_equal(labels_1, labels_3)
    assert images_1.std() > 20, "the perturbed model should give non-trivial samples"
    # The network's kernels are not bitwise batch-invariant (see the module docstring): a value that lands
    # within ~1e-6 of a quantisation step may move by one level; everything else is identical.
    for other in (images_2, images_3):
        difference = np.abs(images_1.astype(int) - other.astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-2
    other_seed, _ = concat_batches(tiny, [list(range(7))], SamplingOptions(image_size=16, class_cond=True, seed=4))
    assert (other_seed != images_1).mean() > 0.5


def test_ddim_with_eta_zero_is_deterministic_given_x_t_and_eta_one_adds_noise(tiny):
    ddim = SamplingOptions(image_size=16, class_cond=True, use_ddim=True)
    ddim_eta1 = SamplingOptions(image_size=16, class_cond=True, use_ddim=True, ddim_eta=1.0)
    images, _ = concat_batches(tiny, [[0, 1]], ddim)
    assert np.array_equal(images, concat_batches(tiny, [[0, 1]], ddim)[0])
    assert not np.array_equal(images, concat_batches(tiny, [[0, 1]], ddim_eta1)[0])


def test_bf16_autocast_runs_close_to_fp32(tiny):
    fp32, _ = concat_batches(tiny, [[0, 1]], SamplingOptions(image_size=16, class_cond=True))
    bf16, _ = concat_batches(tiny, [[0, 1]], SamplingOptions(image_size=16, class_cond=True, precision="bf16"))
    difference = np.abs(bf16.astype(int) - fp32.astype(int)).mean()
    # Measured: 0.83-0.96 grey levels on average, by thread count (bf16 rounding over 10 steps). Zero would mean the
    # network did not run in bf16; an ε only 5% off in bf16 already gives 2.2.
    assert bf16.shape == fp32.shape and 0 < difference < 1.5


def test_options_reject_bad_values():
    with pytest.raises(SamplingArgumentError, match="--precision 'fp8'"):
        SamplingOptions(image_size=16, precision="fp8")
    with pytest.raises(SamplingArgumentError, match="--seed -1"):
        SamplingOptions(image_size=16, seed=-1)


def run(tiny, sample_dir, num_samples=7, batch_size=3, seed=0):
    model, diffusion = tiny
    options = SamplingOptions(image_size=16, class_cond=True, seed=seed)
    return sample_to_folder(
        model, diffusion, options, num_samples, batch_size, str(sample_dir), IDENTITY, device="cpu"
    )


def test_folder_holds_npz_pngs_and_grid_that_agree(tiny, tmp_path):
    result = run(tiny, tmp_path / "s")
    assert (result.num_samples, result.num_generated, result.steps_per_sample) == (7, 7, 10)
    assert result.network_evaluations == 70
    with np.load(result.npz_path) as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1"]
        images, labels = npz["arr_0"], npz["arr_1"]
    assert os.path.basename(result.npz_path) == "samples_7x16x16x3.npz"
    assert images.shape == (7, 16, 16, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert sorted(os.listdir(result.images_dir)) == [f"{k:06d}.png" for k in range(7)]
    for k in range(7):
        pixels, label = read_png(os.path.join(result.images_dir, f"{k:06d}.png"))
        assert np.array_equal(pixels, images[k]) and label == labels[k]
    grid, _ = read_png(result.grid_path)
    assert grid.shape == (16 + 4, 7 * 18 + 2, 3) and np.array_equal(grid[2:18, 2:18], images[0])
    stored = json.load(open(os.path.join(tmp_path, "s", "run.json")))
    assert stored["num_samples"] == 7 and stored["identity"]["seed"] == 0


def test_interrupted_run_resumes_without_redoing_or_losing_batches(tiny, tmp_path, monkeypatch):
    reference = run(tiny, tmp_path / "whole")
    written = []
    original = SampleFolder.write_batch

    def write_then_interrupt(self, indices, images, labels):
        if len(written) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the third batch
        original(self, indices, images, labels)
        written.append(list(indices))

    monkeypatch.setattr(SampleFolder, "write_batch", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, tmp_path / "cut")
    monkeypatch.setattr(SampleFolder, "write_batch", original)
    assert SampleFolder(str(tmp_path / "cut")).finished_indices() == {0, 1, 2, 3, 4, 5}

    resumed = run(tiny, tmp_path / "cut", batch_size=2)  # the batch size may change on resume
    assert resumed.num_generated == 1
    with np.load(reference.npz_path) as a, np.load(resumed.npz_path) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    # Rerunning a finished command generates nothing and leaves the npz untouched.
    written_at = os.stat(resumed.npz_path).st_mtime_ns
    assert run(tiny, tmp_path / "cut").num_generated == 0
    assert os.stat(resumed.npz_path).st_mtime_ns == written_at


def test_more_samples_extend_a_folder_and_fewer_are_refused(tiny, tmp_path):
    first = run(tiny, tmp_path / "s", num_samples=3)
    extended = run(tiny, tmp_path / "s", num_samples=5, batch_size=2)
    assert extended.num_generated == 2
    with np.load(first.npz_path) as a, np.load(extended.npz_path) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"][:3])
    with pytest.raises(SamplingArgumentError, match="started with --num_samples 5"):
        run(tiny, tmp_path / "s", num_samples=4)


def test_folder_made_with_other_arguments_is_refused(tiny, tmp_path):
    run(tiny, tmp_path / "s", num_samples=2)
    with pytest.raises(SamplingArgumentError, match=r"seed: folder has 0, now 1.*fresh --sample_dir"):
        run(tiny, tmp_path / "s", num_samples=2, seed=1)


def test_stale_temporaries_of_a_killed_run_are_removed(tiny, tmp_path):
    folder = SampleFolder(str(tmp_path / "s"))
    os.makedirs(folder.images_dir)
    stale = os.path.join(folder.images_dir, f".000000.png{TEMPORARY_MARKER}12345")
    open(stale, "wb").close()
    with pytest.warns(UserWarning, match=r"removing \.000000\.png\.tmp-12345 .*interrupted write"):
        run(tiny, tmp_path / "s", num_samples=2)
    assert not os.path.exists(stale) and folder.finished_indices() == {0, 1}


def test_missing_png_at_assembly_is_reported(tmp_path):
    folder = SampleFolder(str(tmp_path))
    os.makedirs(folder.images_dir)
    write_png(folder.png_path(0), np.zeros((16, 16, 3), dtype=np.uint8))
    with pytest.raises(RuntimeError, match=r"1 sample\(s\) are missing .*\[1\]"):
        folder.assemble(2, 16, class_cond=False)
