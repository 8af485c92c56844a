"""scripts/image_nll.py with a tiny random U-Net on bundled emoji: calc_bpd_loop's numbers, the reference's files,
resume after an interruption, batch sizes and ranks, errors."""

import json
import os
import signal
import subprocess
import sys

import image_nll
import numpy as np
import pytest
import torch
from launchers import LAUNCHERS, clean_env, launcher_command
from sample_tiny_model import save_tiny_checkpoint, tiny_flags, tiny_model_and_diffusion

from guided_diffusion import analysis, nll
from guided_diffusion.image_datasets import DEMO_DATASET
from guided_diffusion.sampling import PerSampleGenerator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 16 px crops of the bundled 32 px emoji; T = 50 respaced to 10 terms keeps a run to a second.
FLAGS = tiny_flags(timestep_respacing="10")
RECORDED = os.path.join(ROOT, "tests", "dist_scripts", "nll_recorded.py")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("run") / "ema_0.9999_000010.pt"))


def run_nll(checkpoint, out_dir, *flags):
    return image_nll.main(FLAGS + ["--model_path", checkpoint, "--out_dir", str(out_dir), *flags])


def load(path):
    with np.load(path) as npz:
        return {key: npz[key] for key in npz.files}


def test_bits_per_dim_are_calc_bpd_loops_and_the_files_are_the_references(checkpoint, tmp_path):
    summary = run_nll(checkpoint, tmp_path, "--num_samples", "3", "--batch_size", "2")
    # The same images, model and per-image noise through calc_bpd_loop directly.
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="10")
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    images = analysis.ImageSet(DEMO_DATASET, 16).load(range(3))
    with torch.no_grad():
        expected = diffusion.calc_bpd_loop(model.eval(), analysis.to_model_range(images),
                                           noise_fn=PerSampleGenerator(0, range(3), "cpu").randn_like)
    per_image = load(tmp_path / "bpd.npz")
    assert np.isfinite(per_image["total_bpd"]).all()
    np.testing.assert_allclose(per_image["total_bpd"], expected["total_bpd"].numpy(), rtol=1e-5)
    np.testing.assert_allclose(per_image["prior_bpd"], expected["prior_bpd"].numpy(), rtol=1e-5)
    assert per_image["index"].tolist() == [0, 1, 2]
    assert summary == json.loads((tmp_path / "nll.json").read_text())
    assert summary["bpd"] == pytest.approx(expected["total_bpd"].mean().item(), rel=1e-5)
    assert summary["bpd_standard_error"] == pytest.approx(expected["total_bpd"].double().std().item() / 3**0.5, rel=1e-4)
    assert (summary["num_images"], summary["timesteps"]) == (3, 10)
    # The reference's files: arr_0 [T], each term's mean over the images, column j for timestep T-1-j.
    for term in ("vb", "mse", "xstart_mse"):
        arrays = load(tmp_path / f"{term}_terms.npz")
        assert list(arrays) == ["arr_0"] and arrays["arr_0"].shape == (10,)
        np.testing.assert_allclose(arrays["arr_0"], expected[term].mean(dim=0).numpy(), rtol=1e-5)
    # The bound is the prior plus the terms. The prior, KL(q(x_T | x_0) || N(0, I)) in bits per dimension, is
    # computed here from its closed form; it is ~1e-5 bits, so the sum is checked to well below that.
    x0 = analysis.to_model_range(images).double()
    alpha_bar = float(diffusion.alphas_cumprod[-1])
    kl = 0.5 * (-1.0 - np.log(1 - alpha_bar) + (1 - alpha_bar) + alpha_bar * x0**2)
    prior = (kl.mean(dim=(1, 2, 3)) / np.log(2.0)).numpy()
    assert (prior > 1e-6).all()
    np.testing.assert_allclose(per_image["prior_bpd"], prior, rtol=1e-4)
    np.testing.assert_allclose(per_image["total_bpd"] - expected["vb"].sum(dim=1).numpy(), prior, rtol=0, atol=2e-6)


def test_results_do_not_depend_on_the_batch_size(checkpoint, tmp_path):
    one = run_nll(checkpoint, tmp_path / "one", "--num_samples", "3", "--batch_size", "1")
    three = run_nll(checkpoint, tmp_path / "three", "--num_samples", "3", "--batch_size", "3")
    np.testing.assert_allclose(load(tmp_path / "one" / "bpd.npz")["total_bpd"],
                               load(tmp_path / "three" / "bpd.npz")["total_bpd"], rtol=1e-5)
    assert one["bpd"] == pytest.approx(three["bpd"], rel=1e-5)


def test_interrupted_run_resumes_without_redoing_finished_images(checkpoint, tmp_path, monkeypatch):
    reference = run_nll(checkpoint, tmp_path / "straight", "--num_samples", "4", "--batch_size", "2")
    evaluated = []
    real_image_bpd = nll.image_bpd

    def interrupted_after_one_batch(model, diffusion, images, indices, *args, **kwargs):
        if evaluated:
            raise KeyboardInterrupt
        evaluated.append(list(indices))
        return real_image_bpd(model, diffusion, images, indices, *args, **kwargs)

    monkeypatch.setattr(nll, "image_bpd", interrupted_after_one_batch)
    with pytest.raises(SystemExit) as stopped:
        run_nll(checkpoint, tmp_path / "resumed", "--num_samples", "4", "--batch_size", "2")
    assert stopped.value.code == 130 and evaluated == [[0, 1]]
    first_part = tmp_path / "resumed" / "parts" / "bpd_000000_2.npz"
    written = first_part.stat().st_mtime_ns

    def counting(model, diffusion, images, indices, *args, **kwargs):
        evaluated.append(list(indices))
        return real_image_bpd(model, diffusion, images, indices, *args, **kwargs)

    monkeypatch.setattr(nll, "image_bpd", counting)
    resumed = run_nll(checkpoint, tmp_path / "resumed", "--num_samples", "4", "--batch_size", "2")
    assert evaluated == [[0, 1], [2, 3]] and first_part.stat().st_mtime_ns == written
    assert resumed == reference
    for name in ("bpd.npz", "vb_terms.npz", "mse_terms.npz", "xstart_mse_terms.npz"):
        for key, value in load(tmp_path / "straight" / name).items():
            np.testing.assert_array_equal(load(tmp_path / "resumed" / name)[key], value)
    # More images later: only the new ones are evaluated; a finished run evaluates nothing.
    run_nll(checkpoint, tmp_path / "resumed", "--num_samples", "5", "--batch_size", "2")
    assert evaluated[2:] == [[4]]
    run_nll(checkpoint, tmp_path / "resumed", "--num_samples", "5", "--batch_size", "2")
    assert len(evaluated) == 3


def test_rerun_with_other_arguments_or_fewer_images_is_refused(checkpoint, tmp_path):
    run_nll(checkpoint, tmp_path, "--num_samples", "2", "--batch_size", "2")
    with pytest.raises(SystemExit, match="seed: folder has 0, now 1"):
        run_nll(checkpoint, tmp_path, "--num_samples", "2", "--seed", "1")
    with pytest.raises(SystemExit, match="was started with 2 images; 1 would"):
        run_nll(checkpoint, tmp_path, "--num_samples", "1")


def test_default_output_folder_is_beside_the_checkpoint_and_few_images_are_all_evaluated(checkpoint, tmp_path,
                                                                                       capsys):
    images = tmp_path / "samples.npz"
    np.savez(images, np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    summary = image_nll.main(FLAGS + ["--model_path", checkpoint, "--data_dir", str(images), "--num_samples", "5"])
    assert summary["num_images"] == 2
    assert "holds 2 images: evaluating all of them (--num_samples 5)" in capsys.readouterr().out
    assert os.path.exists(os.path.join(os.path.dirname(checkpoint), "bpd_ema_0.9999_000010_10", "nll.json"))


@pytest.mark.parametrize("flags, message", [
    ([], "--model_path is required"),
    (["--model_path", "{checkpoint}", "--class_cond", "True", "--data_dir", "{npz}"],
     "--class_cond True needs labelled images, but --data_dir '{npz}' is an npz"),
])
def test_bad_input_is_named(checkpoint, tmp_path, flags, message):
    npz = str(tmp_path / "x.npz")
    np.savez(npz, np.zeros((1, 16, 16, 3), dtype=np.uint8))
    fill = {"checkpoint": checkpoint, "npz": npz}
    with pytest.raises(SystemExit) as error:
        image_nll.main(FLAGS + ["--out_dir", str(tmp_path / "out")] + [f.format(**fill) for f in flags])
    assert str(error.value).startswith("image_nll.py: error: ") and message.format(**fill) in str(error.value)


def recorded_run(record_dir, kill_after, *flags, launcher=None):
    """tests/dist_scripts/nll_recorded.py in a subprocess (on two ranks with `launcher`); returns the process."""
    os.makedirs(record_dir, exist_ok=True)
    args = (str(record_dir), str(kill_after), *FLAGS, *flags)
    command = launcher_command(launcher, RECORDED, *args) if launcher else [sys.executable, RECORDED, *args]
    return subprocess.run(command, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300,
                          check=False)


def recorded(record_dir, rank=0):
    return json.loads((record_dir / f"rank{rank}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_ranks_split_the_images_and_give_the_one_rank_numbers(checkpoint, tmp_path, launcher):
    one = run_nll(checkpoint, tmp_path / "one", "--num_samples", "3", "--batch_size", "1")
    done = recorded_run(tmp_path / "record", -1, "--model_path", checkpoint, "--out_dir", str(tmp_path / "two"),
                        "--num_samples", "3", "--batch_size", "1", launcher=launcher)
    assert done.returncode == 0, done.stderr
    assert (recorded(tmp_path / "record", 0), recorded(tmp_path / "record", 1)) == ([[0], [2]], [[1]])
    two = json.loads((tmp_path / "two" / "nll.json").read_text())
    assert two["bpd"] == pytest.approx(one["bpd"], rel=1e-6)
    np.testing.assert_allclose(load(tmp_path / "two" / "vb_terms.npz")["arr_0"],
                               load(tmp_path / "one" / "vb_terms.npz")["arr_0"], rtol=1e-6)


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_numbers(checkpoint, tmp_path):
    flags = ["--model_path", checkpoint, "--num_samples", "4", "--batch_size", "2"]
    straight = run_nll(checkpoint, tmp_path / "straight", *flags[2:])
    killed = recorded_run(tmp_path / "record", 1, *flags, "--out_dir", str(tmp_path / "killed"))
    assert killed.returncode == -signal.SIGKILL
    assert recorded(tmp_path / "record") == [[0, 1], [2, 3]]
    parts = tmp_path / "killed" / "parts"
    assert len(os.listdir(parts)) == 2  # the finished batch and the dying write's temporary file
    resumed = recorded_run(tmp_path / "record", -1, *flags, "--out_dir", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    assert recorded(tmp_path / "record") == [[2, 3]]
    assert sorted(os.listdir(parts)) == ["bpd_000000_2.npz", "bpd_000002_2.npz"]
    assert json.loads((tmp_path / "killed" / "nll.json").read_text()) == straight
