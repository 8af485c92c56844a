"""guided_diffusion/plotting.py: the paper's SNR stages as shaded bands, and PNG figures written atomically."""

import os

import matplotlib.colors
import matplotlib.pyplot as plt
import numpy as np
import pytest

from guided_diffusion import plotting
from guided_diffusion.gaussian_diffusion import SNR_STAGE_BOUNDS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_stages_are_shaded_between_the_paper_snr_bounds():
    fig, ax = plt.subplots()
    plotting.shade_stages(ax)
    bands = {patch.get_label(): patch for patch in ax.patches}
    assert list(bands) == ["coarse", "content", "clean-up"]
    low, high = SNR_STAGE_BOUNDS
    assert bands["coarse"].get_x() + bands["coarse"].get_width() == low
    assert (bands["content"].get_x(), bands["content"].get_x() + bands["content"].get_width()) == (low, high)
    assert bands["clean-up"].get_x() == high
    for label, key in (("coarse", "coarse"), ("content", "content"), ("clean-up", "cleanup")):
        assert matplotlib.colors.same_color(bands[label].get_facecolor(), plotting.STAGE_COLOURS[key])
        assert bands[label].get_zorder() == 0  # behind the curves
    plt.close(fig)


def test_save_figure_writes_a_png_and_leaves_no_temporary(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    path = tmp_path / "figure.png"
    plotting.save_figure(fig, str(path))
    plt.close(fig)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert os.listdir(tmp_path) == ["figure.png"]


def test_a_failed_save_keeps_the_previous_figure(tmp_path, monkeypatch):
    fig, _ = plt.subplots()
    path = tmp_path / "figure.png"
    plotting.save_figure(fig, str(path))
    previous = path.read_bytes()

    def fail_half_way(target, **kwargs):
        """Writes part of a PNG to a path or file object, then fails."""
        if isinstance(target, (str, os.PathLike)):
            with open(target, "wb") as f:
                f.write(PNG_SIGNATURE + b"torn")
        else:
            target.write(PNG_SIGNATURE + b"torn")
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(fig, "savefig", fail_half_way)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        plotting.save_figure(fig, str(path))
    plt.close(fig)
    assert path.read_bytes() == previous
    assert os.listdir(tmp_path) == ["figure.png"]


def test_distance_curves_figure(tmp_path):
    snrs = np.logspace(-3, 1, 5)
    values = np.linspace(1, 0, 5)[:, None] + np.zeros((5, 3))
    path = tmp_path / "curves.png"
    plotting.plot_distance_curves(snrs, [("same image", values, "C0")], "title", str(path))
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert os.listdir(tmp_path) == ["curves.png"]
