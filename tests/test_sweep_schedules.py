"""scripts/sweep_schedules.py end to end (paper Table 4): a tiny random U-Net, T = 50, two schedules, FID/KID with
the stand-in Inception network; the model flags come from the config.yaml beside the checkpoint."""

import csv
import json
import os

import numpy as np
import pytest
import yaml
from helpers import save_standin_inception
from PIL import Image

from guided_diffusion.analysis import ImageSet
from guided_diffusion.sampling import SamplingOptions

import sweep_schedules
from sample_tiny_model import TINY_MODEL_FLAGS, save_tiny_checkpoint, tiny_model_and_diffusion


def test_sweep_samples_evaluates_and_tabulates_each_schedule(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    checkpoint = save_tiny_checkpoint(str(run_dir / "ema_0.9999_000010.pt"))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**TINY_MODEL_FLAGS, "lr": 1e-4}))
    reference = tmp_path / "reference"
    reference.mkdir()
    for k, image in enumerate(ImageSet("", image_size=16).load(range(6))):
        Image.fromarray(image).save(reference / f"{k}.png")
    argv = [
        "--model_path", checkpoint, "--out_dir", str(tmp_path / "sweep"), "--schedules", "10", "4,2,1",
        "--num_samples", "3", "--batch_size", "2", "--reference", str(reference),
        "--inception_path", save_standin_inception(tmp_path / "inception.pt"), "--cache_dir", str(tmp_path / "cache"),
    ]
    rows = sweep_schedules.main(argv)

    assert [row["schedule"] for row in rows] == ["10", "4,2,1"]
    assert [row["steps"] for row in rows] == [10, 7]
    assert [row["network_evaluations_per_image"] for row in rows] == [10, 7]  # counted calls of the network
    assert all(row["num_samples"] == 3 and row["sampler"] == "ancestral" for row in rows)
    assert all(row["fid"] > 0 and row["kid_x1e3"] == row["kid"] * 1e3 for row in rows)
    with np.load(rows[0]["samples"]) as first, np.load(rows[1]["samples"]) as second:
        assert first["arr_0"].shape == (3, 16, 16, 3) and not np.array_equal(first["arr_0"], second["arr_0"])

    out = tmp_path / "sweep"
    table = (out / "sweep.md").read_text().splitlines()
    assert len(table) == 2 + 2 and table[2].startswith("| 10 | ancestral | 10 | 10 | 3 |")
    assert table[3].startswith("| 4,2,1 | ancestral | 7 | 7 | 3 |")
    with open(out / "sweep.csv") as f:
        assert [r["schedule"] for r in csv.DictReader(f)] == ["10", "4,2,1"]
    assert json.loads((out / "sweep.json").read_text())["rows"] == rows
    with open(out / "sweep_fid.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| 4,2,1 |" in capsys.readouterr().out

    # A rerun finds every sample on disk: nothing is generated, the numbers are the same.
    again = sweep_schedules.main(argv)
    assert [row["network_evaluations_per_image"] for row in again] == [10, 7]
    assert [row["fid"] for row in again] == [row["fid"] for row in rows]


@pytest.mark.parametrize("use_ddim", [False, True])
def test_network_evaluations_are_counted_calls_one_per_respaced_step(use_ddim):
    for schedule, steps in (("10", 10), ("4,2,1", 7), ("ddim5", 5)):
        model, diffusion = tiny_model_and_diffusion(diffusion_steps=50, timestep_respacing=schedule)
        options = SamplingOptions(image_size=16, use_ddim=use_ddim)
        assert sweep_schedules.network_evaluations_per_image(model, diffusion, options) == steps


def test_a_bad_schedule_fails_before_sampling(tmp_path):
    argv = ["--model_path", "m.pt", "--out_dir", str(tmp_path / "out"), "--reference", "ref", "--diffusion_steps",
            "50", "--schedules", "10", "20,40"]
    with pytest.raises(SystemExit) as exit_info:
        sweep_schedules.main(argv)
    message = str(exit_info.value.code)
    assert message.startswith("sweep_schedules.py: error: --timestep_respacing: section 1 spans 25 steps")
    assert not os.path.exists(tmp_path / "out")
