"""scripts/ablate.py: arms and study flags, paired draws, resume of a killed study, fast FID, bootstrap coverage."""

import json
import os
import subprocess

import ablate
import image_train
import numpy as np
import pytest
import torch
import yaml
from helpers import save_standin_inception
from train_fixtures import TINY_TRAIN_FLAGS, make_image_folder

from guided_diffusion import ablation, evaluation, study_eval
from guided_diffusion.checkpoint import state_dict_fingerprint
from guided_diffusion.respace import SpacedDiffusion
from guided_diffusion.script_util import create_gaussian_diffusion, diffusion_defaults
from guided_diffusion.study_stats import (
    FeatureSetTerms,
    ReferenceTerms,
    bootstrap_values,
    centred_interval,
    cubic_kernel,
    resample_plan,
)

# ---------------------------------------------------------------------------------------------------------------
# Arms and study flags


@pytest.mark.parametrize("spec, flags", [
    ("baseline", {"weighting": "p2", "p2_gamma": 0.0}),
    ("p2:gamma=0.5,k=1", {"weighting": "p2", "p2_gamma": 0.5, "p2_k": 1.0}),
    ("min_snr:snr_gamma=5", {"weighting": "min_snr", "p2_gamma": 0.0, "snr_gamma": 5.0}),
    ("p2:gamma=1,normalize=true", {"weighting": "p2", "p2_gamma": 1.0, "normalize_weights": True}),
    ("baseline:normalize=true,lr=1e-3", {"weighting": "p2", "p2_gamma": 0.0, "normalize_weights": True, "lr": 1e-3}),
    ("edm:sigma_data=0.25", {"weighting": "edm", "p2_gamma": 0.0, "sigma_data": 0.25}),
])
def test_arms_map_to_training_flags(spec, flags):
    assert ablation.parse_arm(spec).flags == flags


def test_arm_slugs_are_folder_names():
    assert ablation.parse_arm("p2:gamma=0.5,k=1").slug == "p2_gamma0p5_k1"
    assert ablation.parse_arm("baseline").slug == "baseline"


@pytest.mark.parametrize("spec, expected", [
    ("p3:gamma=1", "'p3' is not an arm name; use one of baseline, p2, min_snr, soft_min_snr, sigmoid, edm, constant"),
    ("p2:gama=1", "'gama' is not a key an arm can set; use gamma, k, normalize, normalize_weights, p2_gamma, p2_k"),
    ("min_snr:gamma=2", "p2_gamma is not a parameter of min_snr"),
    ("baseline:gamma=1", "p2_gamma is not a parameter of baseline; its keys: normalize"),
    ("p2:gamma", "'gamma' is not key=value"),
    ("p2:gamma=high", "p2_gamma='high' is not a valid float"),
    ("p2:gamma=1,seed=3", "'seed' is not a key an arm can set"),
])
def test_bad_arms_are_named_with_the_valid_choices(spec, expected):
    with pytest.raises(ValueError) as err:
        ablation.parse_arm(spec)
    assert f"arm {spec!r}" in str(err.value)
    assert expected in str(err.value)


@pytest.fixture(scope="module")
def base_config(tmp_path_factory):
    """A tiny image_train.py config (16 px, T = 100, P2 gamma 1) on 16 random images."""
    folder = tmp_path_factory.mktemp("study_data")
    flags = dict(TINY_TRAIN_FLAGS, data_dir=make_image_folder(str(folder / "images"), count=16, size=16),
                 ema_rate="0.9", log_interval=1)
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(flags))
    return str(path)


@pytest.mark.parametrize("flags, expected", [
    ([], "--out_dir is required"),
    (["--eval_steps", "2", "9"], "--eval_steps 2 9: each must lie in 1..--max_steps (4)"),
    (["--seeds", "1", "1"], "--seeds 1 1: give distinct seeds"),
    (["--arms", "baseline", "baseline"], "an arm is listed twice"),
    (["--arms", "baseline", "p2:k=-"], "arm 'p2:k=-'"),
    (["--ci_level", "95"], "--ci_level 95.0 must lie strictly between 0 and 1"),
])
def test_study_flag_errors_name_the_flag(base_config, tmp_path, flags, expected):
    # A network that does not exist: a check that let the study through would fail at once, on another message.
    argv = ["--base_config", base_config, "--max_steps", "4", "--eval_steps", "4",
            "--inception_path", str(tmp_path / "no_network.pt"), *flags]
    if expected != "--out_dir is required":
        argv += ["--out_dir", str(tmp_path / "study")]
    with pytest.raises(SystemExit) as exit_info:
        ablate.main(argv)
    assert expected in str(exit_info.value)
    assert not (tmp_path / "study").exists()


def test_study_config_errors(base_config, tmp_path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("base_config: base.yaml\narms: [baseline]\nsteps: 10\n")
    with pytest.raises(SystemExit) as exit_info:
        ablate.main(["--config", str(unknown), "--out_dir", str(tmp_path / "study")])
    assert "has unknown key(s) steps" in str(exit_info.value)

    resampled = tmp_path / "resampled.yaml"
    resampled.write_text(f"base: {base_config}\nschedule_sampler: loss-second-moment\n")
    with pytest.raises(SystemExit) as exit_info:
        ablate.main(["--base_config", str(resampled), "--max_steps", "4", "--eval_steps", "4",
                     "--inception_path", str(tmp_path / "no_network.pt"), "--out_dir", str(tmp_path / "study")])
    assert "schedule_sampler 'loss-second-moment'" in str(exit_info.value)
    assert "use schedule_sampler: uniform" in str(exit_info.value)

    study = tmp_path / "sub" / "study.yaml"
    study.parent.mkdir()
    study.write_text("base_config: missing.yaml\n")
    with pytest.raises(SystemExit) as exit_info:
        ablate.main(["--config", str(study), "--out_dir", str(tmp_path / "study")])
    assert f"{tmp_path / 'sub' / 'missing.yaml'}' does not exist" in str(exit_info.value)


# ---------------------------------------------------------------------------------------------------------------
# Pairing: the runner's training commands draw the same numbers in every arm of a seed


def _record_draws(monkeypatch):
    """Record, at each training_losses call: the initial weights (first call), the batch, t and the noise."""
    draws = []
    original = SpacedDiffusion.training_losses

    def recording(self, model, x_start, t, model_kwargs=None, noise=None):
        assert noise is None
        noise = torch.randn_like(x_start)  # the draw training_losses would make, from the same generator
        if not draws:
            draws.append(("weights", state_dict_fingerprint(model.state_dict())))
        losses = original(self, model, x_start, t, model_kwargs=model_kwargs, noise=noise)
        draws.append((x_start.clone(), t.clone(), noise.clone(), losses["loss"].detach().clone()))
        return losses

    monkeypatch.setattr(SpacedDiffusion, "training_losses", recording)
    return draws


def _train_as_the_study_does(spec, seed, base_config, out_dir, monkeypatch):
    """Run the study's training command of (arm, seed) in this process; returns the recorded draws."""
    args = ablate.parse_args(["--base_config", base_config, "--arms", spec, "--seeds", str(seed), "--max_steps", "3",
                              "--eval_steps", "3", "--out_dir", str(out_dir)])
    (run,) = ablation.plan_runs(ablation.check_study(args), args.seeds, args.out_dir)
    command = ablation.train_command(run, args)
    with monkeypatch.context() as patch:
        draws = _record_draws(patch)
        image_train.main(command[2:])
    return draws


def _assert_same_draws(a, b):
    assert a[0] == b[0]  # initial weights
    assert len(a) == len(b) == 4
    for (x_a, t_a, noise_a, _), (x_b, t_b, noise_b, _) in zip(a[1:], b[1:]):
        assert torch.equal(x_a, x_b) and torch.equal(t_a, t_b) and torch.equal(noise_a, noise_b)


def test_arms_with_one_seed_draw_the_same_weights_batches_timesteps_and_noise(base_config, tmp_path, monkeypatch):
    runs = {(spec, seed): _train_as_the_study_does(spec, seed, base_config, tmp_path / f"{i}", monkeypatch)
            for i, (spec, seed) in enumerate([("baseline", 0), ("p2:gamma=1", 0), ("min_snr:snr_gamma=5", 0),
                                              ("p2:gamma=1,normalize=true", 0), ("baseline", 1)])}
    baseline = runs["baseline", 0]
    for spec in ("p2:gamma=1", "min_snr:snr_gamma=5", "p2:gamma=1,normalize=true"):
        _assert_same_draws(baseline, runs[spec, 0])
        # The weighting is active: the same draws give other losses (min-SNR's weight is 1 below SNR 5, so some
        # steps may match).
        assert any(not torch.equal(a[3], b[3]) for a, b in zip(baseline[1:], runs[spec, 0][1:]))
    other_seed = runs["baseline", 1]
    assert other_seed[0] != baseline[0]
    for (x_a, t_a, noise_a, _), (x_b, t_b, noise_b, _) in zip(baseline[1:], other_seed[1:]):
        assert not torch.equal(t_a, t_b) and not torch.equal(noise_a, noise_b) and not torch.equal(x_a, x_b)


# ---------------------------------------------------------------------------------------------------------------
# A killed study resumes and ends with the same table


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    torch.manual_seed(0)
    return save_standin_inception(tmp_path_factory.mktemp("net") / "standin.pt")


def _study_argv(base_config, standin, out_dir, cache_dir):
    return ["--base_config", base_config, "--arms", "baseline", "p2:gamma=1", "--seeds", "0",
            "--max_steps", "4", "--eval_steps", "2", "4", "--num_samples", "6", "--eval_batch_size", "6",
            "--sampler", "ddim", "--sampler_steps", "3", "--inception_path", standin, "--cache_dir", str(cache_dir),
            "--bootstrap_draws", "40", "--out_dir", str(out_dir)]


def _study_table(out_dir):
    with open(os.path.join(out_dir, "study.json")) as f:
        return json.load(f)["steps"]


def _counting(monkeypatch):
    """Count the training commands launched and the evaluations sampled."""
    launched, sampled = [], []
    popen = subprocess.Popen
    features = study_eval.StudyEvaluator._features

    def counting_popen(command, **kwargs):
        launched.append(command[command.index("--log_dir") + 1])
        return popen(command, **kwargs)

    def counting_features(self, model_path):
        sampled.append(model_path)
        return features(self, model_path)

    monkeypatch.setattr(ablation.subprocess, "Popen", counting_popen)
    monkeypatch.setattr(study_eval.StudyEvaluator, "_features", counting_features)
    return launched, sampled


@pytest.mark.slow
def test_a_killed_study_resumes_without_redoing_finished_work_and_ends_with_the_same_table(
        base_config, standin, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    whole = tmp_path / "whole"
    ablate.main(_study_argv(base_config, standin, whole, cache))

    # The killed study: the first run finished and was evaluated at step 2, the second stopped after its step-2
    # checkpoint, as a kill leaves them (the same training commands, stopped early).
    killed = tmp_path / "killed"
    args = ablate.parse_args(_study_argv(base_config, standin, killed, cache))
    runs = ablation.plan_runs(ablation.check_study(args), args.seeds, args.out_dir)
    ablation.train_runs(runs[:1], args)
    evaluator = study_eval.StudyEvaluator(args)
    evaluator.evaluate(runs[0], 2)
    stopped = ablation.train_command(runs[1], args)
    stopped[stopped.index("--max_steps") + 1] = "2"
    subprocess.run(stopped, check=True, env=ablation.train_environment(1), capture_output=True)
    finished_files = {p: os.path.getmtime(p) for p in [os.path.join(runs[0].log_dir, "state000004.pt"),
                                                       *evaluator.paths(runs[0], 2)]}

    launched, sampled = _counting(monkeypatch)
    ablate.main(_study_argv(base_config, standin, killed, cache))
    assert runs[0].log_dir not in launched and runs[1].log_dir in launched and len(launched) == len(runs) - 1
    assert len(sampled) == 2 * len(runs) - 1 and evaluator.paths(runs[0], 2)[0] not in sampled
    assert {p: os.path.getmtime(p) for p in finished_files} == finished_files
    with open(os.path.join(runs[1].log_dir, "log.txt")) as f:
        assert "resuming from" in f.read()
    assert _study_table(killed) == _study_table(whole)

    # A finished study reruns without training or sampling anything.
    launched.clear()
    sampled.clear()
    ablate.main(_study_argv(base_config, standin, killed, cache))
    assert launched == [] and sampled == []
    assert _study_table(killed) == _study_table(whole)
    for name in ("study.md", "study.csv", "study_fid.png", "study_mse.png"):
        assert os.path.getsize(killed / name) > 0


# ---------------------------------------------------------------------------------------------------------------
# Statistics


def _features(rng, n, dim, shift=0.0, scale=1.0):
    return (rng.normal(size=(n, dim)) * scale + shift).astype(np.float32)


def test_fast_fid_of_a_resample_equals_the_plain_formula():
    rng = np.random.default_rng(0)
    reference_stats = evaluation.FeatureStatistics.from_features(_features(rng, 300, 12), "reference")
    reference = ReferenceTerms.from_statistics(reference_stats)
    generated = _features(rng, 40, 12, shift=0.3, scale=1.4)
    terms = FeatureSetTerms(generated, reference)

    def plain(features):
        return evaluation.frechet_inception_distance(evaluation.FeatureStatistics.from_features(features, "g"),
                                                     reference_stats)

    assert terms.fid() == pytest.approx(plain(generated), rel=1e-6)
    for _ in range(3):
        counts = rng.multinomial(40, np.full(40, 1 / 40))
        assert terms.fid(counts) == pytest.approx(plain(np.repeat(generated, counts, axis=0)), rel=1e-6)


def test_kid_of_a_resample_is_the_unbiased_mmd_of_the_drawn_images():
    rng = np.random.default_rng(1)
    reference_features = _features(rng, 50, 6)
    reference = ReferenceTerms.from_statistics(evaluation.FeatureStatistics.from_features(reference_features, "r"))
    generated = _features(rng, 20, 6, shift=0.5)
    terms = FeatureSetTerms(generated, reference)

    def unbiased_mmd(x, y):
        x, y = x.astype(np.float64), y.astype(np.float64)
        kxx, kyy = cubic_kernel(x, x), cubic_kernel(y, y)
        n, m = len(x), len(y)
        return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                - 2 * cubic_kernel(x, y).mean())

    assert terms.kid() == pytest.approx(unbiased_mmd(generated, reference_features), rel=1e-9)
    counts = rng.multinomial(20, np.full(20, 1 / 20))
    assert terms.kid(counts) == pytest.approx(
        unbiased_mmd(np.repeat(generated, counts, axis=0), reference_features), rel=1e-9)


def test_bootstrap_interval_covers_the_true_mean_at_its_stated_rate():
    """400 trials of the mean of 30 normal draws: the 95% percentile interval holds the true mean in 90-98% of them."""
    rng = np.random.default_rng(0)
    covered = 0
    trials = 400
    for trial in range(trials):
        values = rng.normal(loc=3.0, scale=2.0, size=30)
        plan = resample_plan(len(values), 0, 200, seed=trial)
        draws = bootstrap_values({"arm": lambda seed, counts, v=values: v[seed]}, plan)["arm"].mean(axis=1)
        low, high = centred_interval(draws, values.mean(), 0.95)
        covered += low <= 3.0 <= high
    assert 0.90 <= covered / trials <= 0.98


@pytest.mark.parametrize("study", ["emoji_cpu.yaml", "gpu.yaml"])
def test_bundled_study_configs_plan_runs_that_image_train_accepts(study, tmp_path):
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "studies", study)
    args = ablate.parse_args(["--config", path, "--out_dir", str(tmp_path)])
    arms = ablation.check_study(args)
    study_eval.sampler_fields(args)
    runs = ablation.plan_runs(arms, args.seeds, args.out_dir)
    assert len(runs) == len(arms) * len(args.seeds) == 12 and len({run.name for run in runs}) == 12
    for run in runs:
        command = ablation.train_command(run, args)
        flags = command[command.index(next(c for c in command if c.endswith("image_train.py"))) + 1:]
        parsed = image_train.parse_args(flags)   # every flag and the base config chain are valid
        diffusion_flags = {k: getattr(parsed, k) for k in diffusion_defaults() if k != "diffusion_steps"}
        diffusion = create_gaussian_diffusion(steps=parsed.diffusion_steps, **diffusion_flags)  # the weighting checks
        assert diffusion.loss_weighting.name == run.arm.flags.get("weighting", "p2")
        assert (parsed.max_steps, parsed.seed) == (args.max_steps, run.seed)
        assert args.max_steps % parsed.save_interval == 0 and all(s % parsed.save_interval == 0 for s in args.eval_steps)
