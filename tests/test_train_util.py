"""TrainLoop: exact resume (1 and 2 ranks), resume checks, EMA, saved weights, P2 logging, precisions,
microbatching, stops (docs/compatibility.md, "Training loop" and "Reference defects fixed here")."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from launchers import LAUNCHERS, clean_env, launcher_command
from sample_tiny_model import perturb_
from train_fixtures import (
    ROOT,
    TINY_TRAIN_FLAGS,
    checkpoint_digests,
    read_progress,
    train,
)

from guided_diffusion import checkpoint, train_util
from guided_diffusion.gaussian_diffusion import snr_stage
from guided_diffusion.logger import Logger
from guided_diffusion.respace import SpacedDiffusion
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

TWO_RANKS = os.path.join(os.path.dirname(__file__), "dist_scripts", "train_two_ranks.py")
LAUNCH_TIMEOUT_S = 180
MODEL_FLAGS = {k: v for k, v in TINY_TRAIN_FLAGS.items() if k in model_and_diffusion_defaults()}


@pytest.fixture(scope="module")
def straight_and_resumed(images, tmp_path_factory):
    """4 steps straight, and 2 steps + resume + 2 steps (loss-second-moment sampler, microbatches of 2)."""
    root = tmp_path_factory.mktemp("resume")
    flags = dict(microbatch=2, schedule_sampler="loss-second-moment")
    straight = train(images, root / "straight", max_steps=4, **flags)
    train(images, root / "resumed", max_steps=2, **flags)
    step2_files = checkpoint_digests(str(root / "resumed"), 2)
    resumed = train(images, root / "resumed", max_steps=4, resume_checkpoint=str(root / "resumed"), **flags)
    return root, straight, resumed, step2_files


def test_exact_resume_single_process(straight_and_resumed):
    root, straight, resumed, step2_files = straight_and_resumed
    assert straight.step == resumed.step == 4
    assert checkpoint_digests(str(root / "straight"), 4) == checkpoint_digests(str(root / "resumed"), 4)
    for a, b in zip(straight.schedule_sampler.state_dict().values(), resumed.schedule_sampler.state_dict().values()):
        assert torch.equal(a, b)
    # The resume did not rewrite the checkpoint it started from, and logged each step once (step 1, then every
    # log_interval), as the straight run.
    assert checkpoint_digests(str(root / "resumed"), 2) == step2_files
    assert [row["step"] for row in read_progress(str(root / "resumed"))] == [1, 2, 4]
    assert read_progress(str(root / "resumed"))[-1]["loss"] == read_progress(str(root / "straight"))[-1]["loss"]
    # --max_steps may change on resume; the change is logged.
    assert "flags changed since the checkpoint: --max_steps 2 -> 4" in open(root / "resumed" / "log.txt").read()


def test_resume_refuses_changed_flags_that_change_the_maths_and_names_each(images, tmp_path):
    train(images, tmp_path, max_steps=1, save_interval=1)
    with pytest.raises(SystemExit) as exit_info:
        train(images, tmp_path, max_steps=2, p2_gamma=0.5, diffusion_steps=50, lr=2e-3,
              resume_checkpoint=str(tmp_path))
    message = str(exit_info.value)
    for expected in ("--p2_gamma 1.0 in the checkpoint vs 0.5 now", "--diffusion_steps 100 in the checkpoint vs 50 now",
                     "--lr 0.001 in the checkpoint vs 0.002 now", f"--config {tmp_path / 'config.yaml'}",
                     "model000001.pt"):
        assert expected in message
    assert "--max_steps 1 in the checkpoint" not in message  # allowed to change
    assert checkpoint.complete_steps(str(tmp_path)) == [1]
    # The advice given works: the weights, copied as step 0 into a new folder, train on with the new values.
    new_run = tmp_path / "new"
    new_run.mkdir()
    for rate in ("0.9", "0.99"):
        shutil.copy(tmp_path / f"ema_{rate}_000001.pt", new_run / f"ema_{rate}_000000.pt")
    shutil.copy(tmp_path / "model000001.pt", new_run / "model000000.pt")
    with pytest.warns(UserWarning, match="optimizer starts afresh"):
        loop = train(images, new_run, max_steps=1, p2_gamma=0.5, resume_checkpoint=str(new_run))
    assert loop.step == 1 and loop.diffusion.p2_gamma == 0.5


def test_saved_model_and_ema_load_strictly_into_a_fresh_model(straight_and_resumed):
    root = straight_and_resumed[0]
    model, _ = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **MODEL_FLAGS})
    trained = straight_and_resumed[1].model.state_dict()
    for name in ("model000004.pt", "ema_0.9_000004.pt", "ema_0.99_000004.pt"):
        state = torch.load(root / "straight" / name, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        assert all(v.dtype == torch.float32 for v in state.values())
    assert torch.equal(state["out.2.weight"], straight_and_resumed[1].ema_params["0.99"][-2])
    assert not torch.equal(state["out.2.weight"], trained["out.2.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_ranks_agree_see_different_data_and_resume_exactly(images, tmp_path, launcher):
    ranks = {}
    for phase in ("first", "resume"):  # the resume is a new launch, as after a crash or preemption
        result = subprocess.run(
            launcher_command(launcher, TWO_RANKS, phase, images, str(tmp_path)),
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=LAUNCH_TIMEOUT_S,  # a resume that hangs in a collective fails here
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        ranks[phase] = [json.load(open(tmp_path / f"{phase}_rank{r}.json")) for r in range(2)]
    first, resume = ranks["first"], ranks["resume"]
    assert [r["world_size"] for r in first + resume] == [2, 2, 2, 2]
    for reports, keys in ((first, ("straight_model", "straight_ema", "half_model")), (resume, ("resumed_model",))):
        for key in keys:
            assert reports[0][key] == reports[1][key], key  # identical weights on both ranks
    assert resume[0]["resumed_model"] == first[0]["straight_model"] != first[0]["half_model"]
    assert resume[0]["resumed_ema"] == first[0]["straight_ema"]
    assert resume[0]["resumed_step"] == first[0]["straight_step"] == 4
    assert checkpoint_digests(str(tmp_path / "straight"), 4) == checkpoint_digests(str(tmp_path / "resumed"), 4)
    # Each rank trains on its own shard; the resumed run continues the data stream where it stopped.
    batches = [f["batches"] + r["batches"] for f, r in zip(first, resume)]
    assert not set(batches[0]) & set(batches[1])
    for rank_batches in batches:
        straight, half, resumed = rank_batches[:4], rank_batches[4:6], rank_batches[6:]
        assert half + resumed == straight
    assert [r["visible_before"] for r in first] == [r["visible_after"] for r in resume] == ["", ""]


def _record_losses(monkeypatch):
    """Record (t, per-sample losses) of every training_losses call."""
    calls = []
    original = SpacedDiffusion.training_losses

    def recording(self, model, x_start, t, model_kwargs=None, noise=None):
        losses = original(self, model, x_start, t, model_kwargs=model_kwargs, noise=noise)
        calls.append((t.clone(), {k: v.detach().clone() for k, v in losses.items()}, self))
        return losses

    monkeypatch.setattr(SpacedDiffusion, "training_losses", recording)
    return calls


@pytest.mark.parametrize("p2_gamma", [1.0, 0.0])
def test_p2_and_baseline_log_weighted_and_unweighted_mse(images, tmp_path, monkeypatch, p2_gamma):
    # lr 0 keeps the zero-initialised output layer: the model predicts 0, so mse_raw_i = mean(ε_i²) and the
    # weighted/unweighted ratio of a quartile is the P2 weight averaged over its samples (weighted by mse_raw).
    calls = _record_losses(monkeypatch)
    train(images, tmp_path, p2_gamma=p2_gamma, learn_sigma=False, lr=0.0, batch_size=8, max_steps=5,
           log_interval=5, save_interval=5)
    first, row = read_progress(str(tmp_path))  # after step 1, and of steps 2-5
    assert (first["step"], row["step"]) == (1, 5)
    assert first["mse_raw"] == pytest.approx(calls[0][1]["mse_raw"].double().mean().item(), rel=1e-5)
    calls = calls[1:]
    t = torch.cat([c[0] for c in calls])
    mse_raw = torch.cat([c[1]["mse_raw"] for c in calls]).double()
    mse = torch.cat([c[1]["mse"] for c in calls]).double()
    diffusion = calls[0][2]
    weight = torch.from_numpy(diffusion.p2_weight)[t]
    assert torch.allclose(mse, weight * mse_raw, rtol=1e-6)
    quartile = (4 * t) // diffusion.num_timesteps
    stage = snr_stage(torch.from_numpy(diffusion.snr)[t])
    bins = [(f"_q{q}", quartile == q) for q in range(4)]
    bins += [(f"_{name}", stage == s) for s, name in enumerate(("coarse", "content", "cleanup"))] + [("", t >= 0)]
    for suffix, selected in bins:
        assert selected.any(), suffix
        assert row["mse" + suffix] == pytest.approx(mse[selected].mean().item(), rel=1e-5)
        assert row["mse_raw" + suffix] == pytest.approx(mse_raw[selected].mean().item(), rel=1e-5)
        ratio = row["mse" + suffix] / row["mse_raw" + suffix]
        assert ratio == pytest.approx((weight * mse_raw)[selected].sum().item() / mse_raw[selected].sum().item(),
                                      rel=1e-5)
        # mean(ε²) over 768 values is 1 ± 0.05, so the ratio is the quartile's mean P2 weight within a few %.
        assert ratio == pytest.approx(weight[selected].mean().item(), rel=0.05)
        if p2_gamma == 0:
            assert row["mse" + suffix] == row["mse_raw" + suffix]
    assert row["mse_raw"] == pytest.approx(1.0, abs=0.05)
    if p2_gamma == 1:
        assert row["mse_q0"] < 0.5 * row["mse_raw_q0"]  # high-SNR steps are down-weighted


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_trains_without_nonfinite_values(images, tmp_path, precision):
    loop = train(images, tmp_path, precision=precision, batch_size=2, max_steps=2, log_interval=1)
    rows = read_progress(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert ("lg_loss_scale" in rows[0]) == (precision == "fp16")
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in loop.model.parameters())
    initial = torch.load(tmp_path / "model000002.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in initial.values())
    assert rows[-1]["grad_norm"] > 0


def _tiny_loop(tmp_path, perturbed=False, **overrides):
    """A TrainLoop on the tiny model; `perturbed`: move its weights off the fresh U-Net's zero output layer first, so
    that every weight gets a gradient."""
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **MODEL_FLAGS})
    if perturbed:
        perturb_(model, scale=0.05)
    kwargs = dict(model=model, diffusion=diffusion, data=None, batch_size=4, microbatch=-1, lr=1e-3,
                  ema_rate="0.9", log_interval=1, save_interval=100, resume_checkpoint="", log_dir=str(tmp_path),
                  progress=False)
    return train_util.TrainLoop(**{**kwargs, **overrides})


class _FixedDraws:
    """Serves rows of a fixed t and a fixed noise in order, so any microbatch split sees the same draws."""

    def __init__(self, t, noise, diffusion):
        self.t, self.noise, self.offset, self.diffusion = t, noise, 0, diffusion

    def sample(self, batch_size, device):
        rows = slice(self.offset, self.offset + batch_size)
        return self.t[rows], torch.ones(batch_size)

    def training_losses(self, model, x_start, t, model_kwargs=None):
        noise = self.noise[self.offset : self.offset + len(t)]
        self.offset += len(t)
        return type(self.diffusion).training_losses(self.diffusion, model, x_start, t, model_kwargs, noise=noise)


def test_half_batch_microbatches_give_the_full_batch_gradient(tmp_path):
    torch.manual_seed(1)
    batch = torch.rand(4, 3, 16, 16) * 2 - 1
    t, noise = torch.tensor([3, 40, 71, 99]), torch.randn(4, 3, 16, 16)
    gradients = {}
    for microbatch in (4, 2):
        loop = _tiny_loop(tmp_path / str(microbatch), perturbed=True, microbatch=microbatch)
        draws = _FixedDraws(t, noise, loop.diffusion)
        loop.schedule_sampler, loop.diffusion = draws, draws
        loop.forward_backward(batch, {})
        gradients[microbatch] = [p.grad.clone() for p in loop.params]
    for full, half in zip(gradients[4], gradients[2]):
        assert torch.allclose(full, half, rtol=1e-4, atol=1e-6)
    assert sum(g.abs().sum() for g in gradients[2]) > 0


def _nan_losses_from_call(monkeypatch, first_bad_call):
    """training_losses returns NaN losses from call `first_bad_call` (0-based) on, without running the network."""
    original = SpacedDiffusion.training_losses
    calls = []

    def failing(self, model, x_start, t, model_kwargs=None, noise=None):
        calls.append(1)
        if len(calls) <= first_bad_call:
            return original(self, model, x_start, t, model_kwargs=model_kwargs, noise=noise)
        nan = sum(p.sum() for p in model.parameters()) * math.nan
        return {"loss": nan.expand(len(t)), "mse": nan.expand(len(t)), "mse_raw": nan.expand(len(t))}

    monkeypatch.setattr(SpacedDiffusion, "training_losses", failing)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(images, tmp_path, monkeypatch):
    _nan_losses_from_call(monkeypatch, first_bad_call=2)  # steps 1-2 are fine, step 3 is not
    # The message names the last good checkpoint and how to train on from its weights with a lower --lr.
    with pytest.raises(SystemExit,
                       match="^image_train.py: error: .*state000002.pt; to train on from it with a lower --lr, "
                             ".*model000002"):
        train(images, tmp_path, max_steps=6, save_interval=2, log_interval=2)
    assert checkpoint.complete_steps(str(tmp_path)) == [2]
    assert not any(name.endswith("000004.pt") for name in os.listdir(tmp_path))
    state = torch.load(tmp_path / "model000002.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())


def test_fp16_aborts_after_repeated_skipped_steps(images, tmp_path, monkeypatch):
    monkeypatch.setattr(train_util, "MAX_CONSECUTIVE_SKIPPED_FP16_STEPS", 3)
    _nan_losses_from_call(monkeypatch, first_bad_call=0)
    with pytest.raises(SystemExit, match="^image_train.py: error: fp16: 3 consecutive steps"):
        train(images, tmp_path, precision="fp16", max_steps=10)


def test_lr_anneal_and_max_steps(tmp_path):
    batch = torch.zeros(4, 3, 16, 16)
    for lr_anneal_steps, max_steps, expected_steps in ((4, 0, 4), (4, 2, 2), (0, 3, 3)):
        loop = _tiny_loop(tmp_path / f"{lr_anneal_steps}_{max_steps}", lr_anneal_steps=lr_anneal_steps,
                          max_steps=max_steps, save_interval=10)
        loop.data = iter(lambda: (batch, {}), None)
        seen = []
        step = loop.opt.step
        loop.opt.step = lambda *a, **k: (seen.append(loop.opt.param_groups[0]["lr"]), step(*a, **k))[1]
        loop.run_loop()
        assert loop.step == expected_steps
        expected_lr = [1e-3 * (1 - s / lr_anneal_steps) if lr_anneal_steps else 1e-3 for s in range(expected_steps)]
        assert seen == pytest.approx(expected_lr)
        assert checkpoint.complete_steps(loop.log_dir) == [expected_steps]


def test_loss_stats_bin_by_quartile_and_stage():
    _, diffusion = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **MODEL_FLAGS})
    stats = train_util.LossStats(diffusion, torch.device("cpu"))
    t = torch.tensor([0, 30, 60, 99, 99])
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0])
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5])
    stats.add(t, weights, {"loss": loss, "mse": 2 * loss})
    stats.set("grad_norm", torch.tensor(7.0))
    means, nonfinite = stats.pop_means()
    assert not nonfinite
    assert means["loss"] == pytest.approx(2.6) and means["mse"] == pytest.approx(5.2)
    assert [means[f"loss_q{q}"] for q in range(4)] == pytest.approx([1.0, 2.0, 3.0, 3.5])
    stages = snr_stage(diffusion.snr[t.numpy()])
    for s, name in enumerate(("coarse", "content", "cleanup")):
        if (stages == s).any():
            assert means[f"loss_{name}"] == pytest.approx(float(np.mean((loss * weights).numpy()[stages == s])))
    assert means["grad_norm"] == 7.0 and "vb" not in means
    assert stats.pop_means()[0] == {}  # reset after popping


def test_progress_rows_after_the_first_and_the_last_step_whatever_log_interval(images, tmp_path):
    train(images, tmp_path, max_steps=6, log_interval=10, save_interval=100)
    rows = read_progress(str(tmp_path))
    assert [row["step"] for row in rows] == [1, 6]
    assert all("loss" in row and "grad_norm" in row for row in rows)
    # A resume logs neither step again; its rows continue at the log_interval steps and its last step.
    train(images, tmp_path, max_steps=12, log_interval=10, save_interval=100, resume_checkpoint=str(tmp_path))
    assert [row["step"] for row in read_progress(str(tmp_path))] == [1, 6, 10, 12]


def test_logger_grows_csv_columns_and_drops_rows_after_a_resume_step(tmp_path):
    logger = Logger(str(tmp_path), tensorboard=False)
    logger.write_scalars({"step": 1, "loss": 0.5}, 1)
    logger.write_scalars({"step": 2, "loss": 0.4, "lg_loss_scale": 20.0}, 2)
    logger.write_scalars({"step": 3, "loss": 0.3}, 3)
    logger.close()
    assert read_progress(str(tmp_path)) == [
        {"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4, "lg_loss_scale": 20.0}, {"step": 3, "loss": 0.3}
    ]
    again = Logger(str(tmp_path), tensorboard=False)
    again.drop_rows_after(2)
    again.write_scalars({"step": 3, "loss": 0.25}, 3)
    assert [r["loss"] for r in read_progress(str(tmp_path))] == [0.5, 0.4, 0.25]
    assert "| loss" in open(tmp_path / "log.txt").read()
    silent = Logger(str(tmp_path / "rank1"), enabled=False)
    silent.write_scalars({"step": 1}, 1)
    assert not os.path.exists(tmp_path / "rank1")


def test_ema_of_the_loop_follows_the_weights_after_every_step_at_each_rate(tmp_path):
    rates = {"0.9": 0.9, "0.75": 0.75}  # not 0.5, where r and 1 - r swapped would give the same EMA
    loop = _tiny_loop(tmp_path, perturbed=True, ema_rate=",".join(rates), lr=1e-2)
    # θ_e ← r·θ_e + (1 − r)·θ after each optimizer step, from a copy of the initial weights, in float64.
    expected = {rate: [p.detach().double().clone() for p in loop.params] for rate in rates}
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        loop.run_step(torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1, {})
        for rate, r in rates.items():
            expected[rate] = [r * e + (1 - r) * p.detach().double() for e, p in zip(expected[rate], loop.params)]
    for rate in rates:
        for ema, want in zip(loop.ema_params[rate], expected[rate]):
            torch.testing.assert_close(ema.double(), want, rtol=1e-5, atol=1e-6)
        # The weights moved far more than the tolerance, so a wrong update cannot pass.
        lag = max((ema - p).abs().max().item() for ema, p in zip(loop.ema_params[rate], loop.params))
        assert lag > 1e-3


@pytest.mark.parametrize("module, absent", [("guided_diffusion.train_util", "cleanfid"),
                                            ("guided_diffusion.checkpoint", "guided_diffusion.unet")])
def test_training_modules_do_not_import_evaluation_or_the_network(module, absent):
    # A fresh interpreter: this one has imported everything already.
    code = f"import sys, {module}; print({absent!r} in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False"]
