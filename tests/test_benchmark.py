"""benchmarks/ (the developer tool run as `python -m benchmarks`): settings, statistics, reports, the reference
loader and end-to-end runs on the tiny16 config (numbers and keys only, never timing)."""

import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch

import benchmarks.__main__ as cli
from benchmarks import probes, reference, report, run, settings, timing
from guided_diffusion.respace import space_timesteps
from guided_diffusion.script_util import create_model_and_diffusion

REFERENCE_PATH = os.environ.get("P2_REFERENCE_PATH", "")
REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_settings_parse_into_options():
    assert settings.parse_setting("eager") == settings.Setting("eager")
    assert settings.parse_setting("reference").reference
    combined = settings.parse_setting("compile+channels_last+bf16")
    assert (combined.compile, combined.channels_last, combined.precision) == (True, True, "bf16")
    assert combined.matmul_dtype == "bf16" and combined.fold_upsample is True
    plain = settings.parse_setting("nofold")
    assert (plain.channels_last, plain.fold_upsample) == (False, False)
    auto = settings.parse_setting("auto")   # what image_train.py and image_sample.py choose by default
    assert (auto.channels_last, auto.fold_upsample) == ("auto", "auto")
    for bad in ("fast", "default", "compile+compile", "eager+compile", "min_snr+edm"):
        with pytest.raises(ValueError, match="not understood"):
            settings.parse_setting(bad)


def test_weighting_settings_train_with_their_weighting():
    config = settings.get_config("tiny16")
    _, eager = create_model_and_diffusion(**settings.model_flags(config, settings.parse_setting("eager")))
    min_snr = settings.parse_setting("channels_last+min_snr+normalize")
    assert (min_snr.weighting, min_snr.normalize_weights, min_snr.channels_last) == ("min_snr", True, True)
    _, diffusion = create_model_and_diffusion(**settings.model_flags(config, min_snr))
    snr = eager.alphas_cumprod / (1 - eager.alphas_cumprod)
    np.testing.assert_allclose(eager.loss_weight, 1 / (1 + snr))                    # the config's P2, γ = k = 1
    raw = np.minimum(snr, 5.0) / snr
    np.testing.assert_allclose(diffusion.loss_weight, raw / raw.mean())


def test_plan_check_names_the_bad_flag():
    with pytest.raises(ValueError, match="--config"):
        run.BenchmarkPlan(config_name="huge").check()
    with pytest.raises(ValueError, match="--reference_path"):
        run.BenchmarkPlan(settings=["reference", "eager"]).check()
    with pytest.raises(FileNotFoundError, match="P2-weighting"):
        run.BenchmarkPlan(settings=["reference"], reference_path="/nonexistent").check()
    with pytest.raises(ValueError, match="--repeats"):
        run.BenchmarkPlan(repeats=0).check()
    with pytest.raises(ValueError, match="--phases"):
        run.BenchmarkPlan(phases=("infer",)).check()
    with pytest.raises(ValueError, match="once"):
        run.BenchmarkPlan(settings=["eager", "eager"]).check()
    with pytest.raises(ValueError, match="GPU"):
        run.BenchmarkPlan(config_name="p2_256", device="cpu").check()


def test_time_statistics():
    stats = timing.time_statistics([0.4, 0.1, 0.3, 0.2, 0.5], batch_size=8)
    assert stats["median_s"] == 0.3
    assert (stats["min_s"], stats["max_s"]) == (0.1, 0.5)
    assert stats["q1_s"] == pytest.approx(0.2) and stats["q3_s"] == pytest.approx(0.4)
    assert stats["images_per_s"] == pytest.approx(8 / 0.3)
    assert stats["times_s"] == [0.4, 0.1, 0.3, 0.2, 0.5]


def test_speed_ratios_pair_interleaved_rounds():
    def entry(times, memory):
        return {**timing.time_statistics(times, 4), "memory": {"peak_increase_mib": memory}}

    result = {
        "meta": {"settings": ["reference", "eager"]},
        "results": {
            "reference": {"train": entry([2.0, 4.0, 3.0], 100.0)},
            "eager": {"train": entry([1.0, 1.0, 2.0], 50.0)},
        },
    }
    ratios = timing.speed_ratios(result)
    assert ratios["baseline"] == "reference"
    train = ratios["eager"]["train"]
    assert train["speedup"] == pytest.approx(3.0 / 1.0)
    assert (train["paired_min"], train["paired_median"], train["paired_max"]) == pytest.approx((1.5, 2.0, 4.0))
    assert train["memory_ratio"] == pytest.approx(0.5)


def test_saved_for_backward_counts_distinct_activation_storages_without_parameters():
    weight = torch.nn.Parameter(torch.randn(100))
    x = torch.randn(50, requires_grad=True)

    def step():
        # sin keeps the parameter (excluded); x * x keeps x twice (one storage); exp keeps its 50-float output.
        (weight.sin().sum() + (x * x).sum() + x.exp().sum()).backward()

    assert probes.saved_for_backward_bytes(step, [weight]) == 2 * 50 * 4


def test_sampling_cost_counts_the_kept_timesteps():
    rows = report.sampling_cost_rows(1000)
    assert [row["respacing"] for row in rows] == ["1000", "500", "250", "ddim50", "ddim25"]
    for row in rows:
        assert row["network_evaluations"] == len(space_timesteps(1000, row["respacing"]))
        assert row["share_of_full"] == row["network_evaluations"] / 1000
    assert [row["network_evaluations"] for row in rows] == [1000, 500, 250, 50, 25]
    table = report.format_sampling_cost()
    assert "| `ddim25` | DDIM | 25 | 0.025 |" in table


def test_sampling_cost_flag_prints_the_table(capsys):
    cli.main(["--sampling_cost"])
    assert "| `500` | ancestral | 500 | 0.500 |" in capsys.readouterr().out


def test_module_entry_point_runs_from_the_repository_root():
    """The README's command, `python -m benchmarks`, finds the package with no path set up by hand."""
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--sampling_cost"], cwd=REPOSITORY_ROOT, capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr
    assert "| `ddim50` | DDIM | 50 | 0.050 |" in completed.stdout


def write_fake_reference(root):
    """A package named guided_diffusion, as in a clone, whose modules import each other relatively."""
    package = os.path.join(root, "guided_diffusion")
    os.makedirs(package)
    files = {
        "__init__.py": "",
        "dist_util.py": "NAME = 'fake dist_util'\n",
        "logger.py": "from . import dist_util\nNAME = 'fake logger ' + dist_util.NAME\n",
        "resample.py": "",
        "script_util.py": "",
        "train_util.py": "from . import logger\n",
    }
    for name, text in files.items():
        with open(os.path.join(package, name), "w") as f:
            f.write(text)


def forget_reference_modules():
    for name in [n for n in sys.modules if n.split(".")[0] == reference.REFERENCE_PACKAGE_NAME]:
        del sys.modules[name]


def test_reference_package_loads_beside_ours_under_another_name(tmp_path):
    import guided_diffusion.logger as our_logger

    write_fake_reference(str(tmp_path))
    forget_reference_modules()
    try:
        modules = reference.load_reference_package(str(tmp_path))
        assert modules["logger"].NAME == "fake logger fake dist_util"
        assert modules["logger"].__name__ == "reference_guided_diffusion.logger"
        assert sys.modules["guided_diffusion.logger"] is our_logger  # ours untouched
    finally:
        forget_reference_modules()
    assert reference.find_reference_package(str(tmp_path)) == os.path.join(str(tmp_path), "guided_diffusion")


def run_script(tmp_path, *arguments):
    out, markdown = tmp_path / "bench.json", tmp_path / "bench.md"
    cli.main(
        ["--config", "tiny16", "--warmup", "1", "--repeats", "2", "--threads", "1", "--no_progress",
         "--out", str(out), "--markdown", str(markdown), *arguments]
    )
    return json.loads(out.read_text()), markdown.read_text()


def assert_ratios_follow_the_step_times(result):
    """Every ratio of the result, recomputed from the per-step times recorded beside it."""
    baseline, *others = result["meta"]["settings"]
    for name in others:
        for phase, ratio in result["ratios"][name].items():
            base_times = result["results"][baseline][phase]["times_s"]
            times = result["results"][name][phase]["times_s"]
            assert ratio["speedup"] == pytest.approx(statistics.median(base_times) / statistics.median(times))
            paired = [b / t for b, t in zip(base_times, times)]
            assert ratio["paired_median"] == pytest.approx(statistics.median(paired))
            assert (ratio["paired_min"], ratio["paired_max"]) == pytest.approx((min(paired), max(paired)))


@pytest.mark.slow
def test_end_to_end_run_writes_json_and_markdown(tmp_path, capsys):
    result, markdown = run_script(tmp_path, "--compare", "eager", "channels_last")
    printed = capsys.readouterr().out
    assert "channels_last is" in printed and "as fast as eager" in printed
    meta = result["meta"]
    assert meta["config"] == "tiny16" and meta["settings"] == ["eager", "channels_last"]
    assert meta["batch_size"] == {"train": 4, "sample": 4} and meta["threads"] == 1
    assert meta["command"].startswith("python -m benchmarks --config tiny16")
    assert result["matmul_peak_gflops"]["fp32"] > 0
    flops = result["model_flops_per_image"]
    assert 2.5 < flops["forward_backward"] / flops["forward"] < 3.5  # backward ≈ twice the forward
    for setting in ("eager", "channels_last"):
        for phase in ("train", "sample"):
            entry = result["results"][setting][phase]
            assert len(entry["times_s"]) == 2 and len(entry["warmup_s"]) == 1
            assert entry["median_s"] == pytest.approx(statistics.median(entry["times_s"]))
            assert entry["images_per_s"] == pytest.approx(4 / entry["median_s"])
            assert entry["memory"]["baseline_mib"] > 0 and entry["memory"]["peak_mib"] > 0
            assert entry["model_gflops_per_s"] > 0 and 0 < entry["matmul_peak_fraction"]
            # Each worker ran the layout its setting names, folds on (the eager default), nothing compiled.
            applied = entry["applied_speed_options"]
            assert applied["channels_last"] == (setting == "channels_last") and not applied["compiled"]
            assert len(applied["folded_upsamples"]) == applied["upsampling_layers"] > 0
    # The same model keeps the same activations in either memory layout.
    assert result["results"]["channels_last"]["train"]["memory"]["saved_for_backward_mib"] == pytest.approx(
        result["results"]["eager"]["train"]["memory"]["saved_for_backward_mib"]
    )
    assert set(result["ratios"]["channels_last"]) == {"train", "sample"}
    assert_ratios_follow_the_step_times(result)
    assert "| eager | train |" in markdown and "| channels_last | sample |" in markdown
    assert "Reproduce with:" in markdown and "| `ddim50` | DDIM | 50 |" in markdown


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE_PATH, reason="set P2_REFERENCE_PATH to a clone of jychoi118/P2-weighting")
def test_reference_runs_interleaved_with_ours(tmp_path):
    result, _ = run_script(tmp_path, "--settings", "reference,eager", "--reference_path", REFERENCE_PATH)
    assert result["meta"]["settings"] == ["reference", "eager"]
    assert result["results"]["reference"]["train"]["dropped_reference_flags"] in ([], ["p2_gamma"])
    assert set(result["ratios"]["eager"]) == {"train", "sample"}
    assert_ratios_follow_the_step_times(result)
