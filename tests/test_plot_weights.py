"""scripts/plot_weights.py writes the figures and the numbers of docs/compatibility.md, "P2 weighting"."""

import json
import os
import runpy

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
