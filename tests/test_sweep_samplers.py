"""scripts/sweep_samplers.py end to end on a tiny model trained for two steps: FID/KID against counted network
evaluations for DDIM, DPM-Solver++(2M) and Heun, with the stand-in Inception network; and the paired comparison of
two configurations image by image (sweeps.paired_differences)."""

import csv
import json

import numpy as np
import pytest
import sweep_samplers
from helpers import save_standin_inception
from train_fixtures import train

from guided_diffusion import evaluation, sweeps


def test_sweep_scores_each_sampler_at_each_budget(images, tmp_path, capsys):
    train(images, tmp_path / "run", max_steps=2)  # writes config.yaml beside the weights: the model flags
    out = tmp_path / "sweep"
    argv = [
        "--model_path", str(tmp_path / "run" / "ema_0.9_000002.pt"), "--out_dir", str(out),
        "--samplers", "ddim", "dpm++2m", "heun:time", "--nfe", "5", "3", "--num_samples", "3", "--batch_size", "2",
        "--reference", images, "--inception_path", save_standin_inception(tmp_path / "inception.pt"),
        "--cache_dir", str(tmp_path / "cache"), "--paired", "ddim@5", "dpm++2m:logsnr@3", "heun:time@5",
        "--paired_draws", "20",
    ]
    rows = sweep_samplers.main(argv)

    summary = [(row["sampler"], row["steps"], row["network_evaluations_per_image"]) for row in rows]
    assert summary == [("ddim", 3, 3), ("ddim", 5, 5), ("dpm++2m:logsnr", 3, 3), ("dpm++2m:logsnr", 5, 5),
                       ("heun:time", 2, 3), ("heun:time", 3, 5)]
    assert all(row["num_samples"] == 3 and row["fid"] > 0 and row["kid_x1e3"] == row["kid"] * 1e3 for row in rows)
    assert rows[4]["samples"].endswith("samples_heun_time_nfe3/samples_3x16x16x3.npz")

    table = (out / "sweep_samplers.md").read_text().splitlines()
    assert table[0] == "| sampler | steps | network_evaluations_per_image | num_samples | fid | kid_x1e3 |"
    assert table[6].startswith("| heun:time | 2 | 3 | 3 |")
    with open(out / "sweep_samplers.csv") as f:
        assert [r["network_evaluations_per_image"] for r in csv.DictReader(f)] == ["3", "5", "3", "5", "3", "5"]
    assert json.loads((out / "sweep_samplers.json").read_text())["rows"] == rows
    with open(out / "sweep_samplers_fid.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| dpm++2m:logsnr | 5 | 5 |" in printed

    paired = json.loads((out / "sweep_samplers_paired.json").read_text())
    assert paired["baseline"] == "ddim with 5 network evaluations" and paired["draws"] == 20
    assert paired["level"] == 0.95
    with np.load(rows[0]["features"]) as data:  # the samples' features, kept beside them
        assert data["features"].shape[0] == 3
    chosen = [rows[1], rows[2], rows[5]]
    assert [(r["sampler"], r["network_evaluations_per_image"]) for r in paired["rows"]] == [
        ("ddim", 5), ("dpm++2m:logsnr", 3), ("heun:time", 5)]
    assert paired["rows"][0]["fid_diff"] is None and paired["rows"][0]["kid_x1e3_diff"] is None
    for found, row in zip(paired["rows"][1:], chosen[1:]):
        assert found["fid"] == pytest.approx(row["fid"], rel=1e-6)
        assert found["kid_x1e3"] == pytest.approx(row["kid_x1e3"], abs=0.5)  # all images vs clean-fid's subsets
        assert found["fid_diff"] == pytest.approx(found["fid"] - paired["rows"][0]["fid"])
        assert found["fid_diff_low"] <= found["fid_diff"] <= found["fid_diff_high"]
    assert (out / "sweep_samplers_paired.md").read_text().startswith("| sampler | steps | network_evaluations_per_image"
                                                                     " | fid | fid_diff |")
    assert "wrote " + str(out) + "/sweep_samplers_paired.md" in printed


def _statistics(features):
    return evaluation.FeatureStatistics.from_features(features, "test features")


def _paired(tmp_path, baseline, other, draws=200):
    paths = []
    for name, features in (("base", baseline), ("other", other)):
        paths.append(tmp_path / f"{name}_features.npz")
        np.savez(paths[-1], features=features)
    rows = [{"features": str(path)} for path in paths]
    reference = _statistics(np.random.default_rng(9).normal(size=(60, 6)))
    return sweeps.paired_differences(rows, 0, reference, draws)


def test_pairing_removes_the_variation_both_configurations_share(tmp_path):
    """The other configuration's images are the baseline's, slightly perturbed: drawn on the same images, the
    difference varies far less than either configuration's FID does from one draw of the images to the next."""
    rng = np.random.default_rng(0)
    baseline = rng.normal(size=(50, 6))
    other = baseline + rng.normal(scale=0.02, size=baseline.shape)
    found = _paired(tmp_path, baseline, other)
    diff = found[1]
    assert diff["fid_diff"] == pytest.approx(found[1]["fid"] - found[0]["fid"])
    assert diff["fid_diff_low"] <= diff["fid_diff"] <= diff["fid_diff_high"]
    reference = sweeps.ReferenceTerms.from_statistics(_statistics(np.random.default_rng(9).normal(size=(60, 6))))
    draws = np.random.default_rng(1).multinomial(50, np.full(50, 1 / 50), size=200)
    single_width = np.subtract(*np.quantile([sweeps.FeatureSetTerms(baseline, reference).fid(c) for c in draws],
                                            [0.975, 0.025]))
    assert diff["fid_diff_high"] - diff["fid_diff_low"] < single_width / 5

    same = _paired(tmp_path, baseline, baseline)[1]
    assert same["fid_diff"] == same["fid_diff_low"] == same["fid_diff_high"] == 0


def test_paired_configurations_must_hold_the_same_number_of_samples(tmp_path):
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match=r"different numbers of samples \[40, 50\]"):
        _paired(tmp_path, rng.normal(size=(50, 6)), rng.normal(size=(40, 6)))


@pytest.mark.parametrize(
    "samplers, message",
    [
        (["ddim:karras"], "--samplers ddim:karras: --sampler ddim and --step_schedule karras do not go together"),
        (["dpm++2m:cosine"], "--samplers dpm++2m:cosine: --step_schedule 'cosine' is not one of"),
        (["euler"], "--samplers euler: --sampler 'euler' is not one of"),
    ],
)
def test_a_bad_sampler_fails_before_sampling(tmp_path, samplers, message):
    argv = ["--model_path", "m.pt", "--out_dir", str(tmp_path / "out"), "--reference", "ref", "--samplers", *samplers]
    with pytest.raises(SystemExit) as exit_info:
        sweep_samplers.main(argv)
    assert message in str(exit_info.value.code)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "paired, message",
    [
        (["ddim@50"], "--paired ddim@50: name a baseline and at least one configuration to compare"),
        (["ddim@50", "dpm++2m@30"], "--paired dpm++2m@30: not a configuration of this sweep"),
        (["ddim@50", "dpm++2m:karras@20"], "--paired dpm++2m:karras@20: not a configuration of this sweep"),
        (["ddim@50", "heun"], "--paired heun: not a configuration of this sweep; write SAMPLER@BUDGET"),
        (["ddim@50", "euler@20"], "--paired euler@20: not a configuration"),
    ],
)
def test_a_bad_paired_configuration_fails_before_sampling(tmp_path, paired, message):
    argv = ["--model_path", "m.pt", "--out_dir", str(tmp_path / "out"), "--reference", "ref",
            "--samplers", "ddim", "dpm++2m", "heun", "--nfe", "20", "50", "--paired", *paired]
    with pytest.raises(SystemExit) as exit_info:
        sweep_samplers.main(argv)
    assert message in str(exit_info.value.code)
    assert not (tmp_path / "out").exists()


def test_a_budget_that_repeats_a_configuration_names_it_in_paired():
    """Heun with budgets 19 and 20 makes one configuration (10 steps); both budgets name it."""
    args = sweep_samplers.parse_args(["--model_path", "m.pt", "--out_dir", "o", "--reference", "r",
                                      "--samplers", "ddim", "heun", "--nfe", "19", "20", "--paired", "ddim@20",
                                      "heun@19", "heun:karras@20"])
    todo, positions = sweep_samplers.configurations(args)
    assert [(label, fields["steps"]) for label, _, fields in todo] == [("ddim", 0), ("ddim", 0), ("heun:karras", 10)]
    assert sweep_samplers.paired_positions(args, positions) == [1, 2, 2]
