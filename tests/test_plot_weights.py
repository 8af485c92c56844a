"""scripts/plot_weights.py writes the figures and the numbers of docs/compatibility.md, "P2 weighting", and of the
weightings beside P2 (docs/weightings.md)."""

import json
import os
import runpy

import pytest
from helpers import assert_matches_printed

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "plot_weights.py")


def test_plot_weights_outputs(tmp_path, capsys):
    main = runpy.run_path(SCRIPT, run_name="plot_weights")["main"]
    main(["--out_dir", str(tmp_path), "--gammas", "0,0.5,1"])
    for name in ("fig3_weights.png", "figA_weights.png", "weights.csv", "summary.json"):
        assert os.path.getsize(tmp_path / name) > 0
    with open(tmp_path / "fig3_weights.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert_matches_printed(summary["linear"]["0.5"]["mean"], "0.8059")
    assert_matches_printed(summary["linear"]["1"]["mean"], "0.7245")
    assert_matches_printed(summary["cosine"]["1"]["mean"], "0.504")
    assert_matches_printed(summary["cosine"]["0.5"]["mean"], "0.642")
    for share, printed in zip(summary["linear"]["0.5"]["quartile_share"], ["0.118", "0.266", "0.306", "0.310"]):
        assert_matches_printed(share, printed)
    assert summary["linear"]["0"]["mean"] == 1.0
    lines = (tmp_path / "weights.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * 1000
    assert "0.8059" in capsys.readouterr().out


def test_scheme_curves_and_their_stage_shares(tmp_path, capsys):
    main = runpy.run_path(SCRIPT, run_name="plot_weights")["main"]
    main(["--out_dir", str(tmp_path), "--gammas", "1"])
    with open(tmp_path / "schemes_weights.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    schemes = json.loads((tmp_path / "schemes_summary.json").read_text())
    labels = ["p2 γ=1 k=1", "min_snr γ=5", "soft_min_snr σ_d=0.5", "sigmoid b=-3", "edm σ_d=0.5", "constant"]
    assert list(schemes["linear"]) == labels and list(schemes["cosine"]) == labels
    # The numbers of docs/weightings.md (linear schedule, T = 1000).
    for label, mean, shares in [
        ("p2 γ=1 k=1", "0.7245", ("0.449", "0.482", "0.069")),
        ("min_snr γ=5", "0.9131", ("0.357", "0.455", "0.188")),
        ("soft_min_snr σ_d=0.5", "0.8269", ("0.394", "0.476", "0.130")),
        ("sigmoid b=-3", "0.4638", ("0.677", "0.315", "0.008")),
        ("edm σ_d=0.5", "5246", ("0.994", "0.006", "0.000")),
        ("constant", "1.0000", ("0.326", "0.415", "0.259")),
    ]:
        summary = schemes["linear"][label]
        assert_matches_printed(summary["mean"], mean)
        assert summary["normalising_scale"] == pytest.approx(1 / summary["mean"], rel=1e-12)
        for share, printed in zip(summary["stage_share"].values(), shares):
            assert_matches_printed(share, printed)
    lines = (tmp_path / "schemes.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * 1000 and len(lines[0].split(",")) == 3 + 2 * len(labels)
    assert "sigmoid b=-3" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--out_dir", str(tmp_path), "--schemes", "p2,min-snr"])
