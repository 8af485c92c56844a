"""scripts/sweep_samplers.py end to end on a tiny model trained for two steps: FID/KID against counted network
evaluations for DDIM, DPM-Solver++(2M) and Heun, with the stand-in Inception network."""

import csv
import json

import pytest
import sweep_samplers
from helpers import save_standin_inception
from train_fixtures import train


def test_sweep_scores_each_sampler_at_each_budget(images, tmp_path, capsys):
    train(images, tmp_path / "run", max_steps=2)  # writes config.yaml beside the weights: the model flags
    out = tmp_path / "sweep"
    argv = [
        "--model_path", str(tmp_path / "run" / "ema_0.9_000002.pt"), "--out_dir", str(out),
        "--samplers", "ddim", "dpm++2m", "heun:time", "--nfe", "5", "3", "--num_samples", "3", "--batch_size", "2",
        "--reference", images, "--inception_path", save_standin_inception(tmp_path / "inception.pt"),
        "--cache_dir", str(tmp_path / "cache"),
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
    assert "| dpm++2m:logsnr | 5 | 5 |" in capsys.readouterr().out


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
