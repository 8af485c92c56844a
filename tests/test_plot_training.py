"""scripts/plot_training.py on progress.csv files written by the training logger, with and without FID columns."""

import csv
import json
import os

import pytest

from guided_diffusion.logger import Logger, read_progress

import plot_training

STAGES = ("coarse", "content", "cleanup")
BATCH = 8


def loss_row(step, gamma):
    """Losses that fall with the step; P2 (gamma > 0) weights the clean-up stage down."""
    raw = {f"_{stage}": (3 - k) / (1 + step) for k, stage in enumerate(STAGES)}
    raw[""] = sum(raw.values()) / 3
    weighted = {suffix: value * (0.5 ** gamma if suffix == "_cleanup" else 1.0) for suffix, value in raw.items()}
    row = {"step": step, "samples": step * BATCH}
    row.update({f"mse_raw{suffix}": value for suffix, value in raw.items()})
    row.update({f"mse{suffix}": value for suffix, value in weighted.items()})
    return row


def write_run(log_dir, gamma, fids=None):
    """A progress.csv through the training Logger: rows every 10 steps to 100, FID/KID at the steps in `fids`."""
    logger = Logger(str(log_dir), tensorboard=False)
    for step in range(10, 101, 10):
        row = loss_row(step, gamma)
        if fids and step in fids:
            row.update(fid=fids[step], kid=fids[step] / 1e4, kid_x1e3=fids[step] / 10)
        logger.write_scalars(row, step)
    logger.close()
    return os.path.join(str(log_dir), "progress.csv")


def test_runs_with_and_without_fid_columns(tmp_path, capsys):
    baseline = write_run(tmp_path / "baseline", 0.0, fids={50: 40.0, 100: 30.0})
    p2 = write_run(tmp_path / "p2_run", 1.0, fids={50: 35.0, 100: 36.0})
    rows = read_progress(p2)
    assert "fid" not in rows[0] and rows[4]["fid"] == 35.0  # evaluation columns are empty between evaluations

    out = tmp_path / "figures"
    records = plot_training.main(["--runs", f"{baseline}:baseline", str(tmp_path / "p2_run"), "--out_dir", str(out),
                                  "--smooth", "3"])
    for name in ("training_losses.png", "training_fid.png", "training_summary.json", "training_summary.csv"):
        assert os.path.getsize(out / name) > 0
    assert [r["label"] for r in records] == ["baseline", "p2_run"]
    assert records[0]["rows"] == 10 and records[0]["last_step"] == 100 and records[0]["last_samples"] == 800
    assert records[0]["final_mse_raw_coarse"] == pytest.approx(3 / 101)
    assert records[1]["final_mse_cleanup"] == pytest.approx(0.5 / 101)
    assert records[0]["final_fid"] == 30.0 and records[0]["final_kid_x1e3"] == 3.0
    assert (records[0]["best_fid"], records[0]["best_fid_samples"]) == (30.0, 800)
    assert (records[1]["best_fid"], records[1]["best_fid_samples"]) == (35.0, 400)
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["runs"] == records and len(summary["figures"]) == 2
    with open(out / "training_summary.csv") as f:
        assert [row["label"] for row in csv.DictReader(f)] == ["baseline", "p2_run"]

    no_fid = write_run(tmp_path / "no_eval", 0.5)
    out = tmp_path / "no_fid_figures"
    (record,) = plot_training.main(["--runs", no_fid, "--out_dir", str(out)])
    assert os.path.exists(out / "training_losses.png") and not os.path.exists(out / "training_fid.png")
    assert record["best_fid"] is None and record["final_fid"] is None and record["label"] == "no_eval"
    assert "training_fid.png not written" in capsys.readouterr().out


def test_trailing_mean():
    assert plot_training.trailing_mean([1.0, 3.0, 5.0, 7.0], 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    assert plot_training.trailing_mean([1.0, 3.0], 1).tolist() == [1.0, 3.0]


def test_a_missing_run_is_reported(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        plot_training.main(["--runs", str(tmp_path / "nowhere:label"), "--out_dir", str(tmp_path)])
    message = str(exit_info.value.code)
    assert message.startswith("plot_training.py: error: --runs") and "does not exist" in message
