"""On a CUDA GPU: training steps at every precision against the CPU, DDP over nccl, the SDPA GPU kernels, the speed
options, per-seed sampling, checkpoints moved between devices and in-training evaluation.

Every test needs CUDA and is skipped with a reason elsewhere (CI has no GPU); scripts/gpu_check.sh runs them on one
(`python -m pytest -m cuda tests/test_cuda.py`).

Tolerances. The reference is the CPU in fp32. On the GPU, fp32 convolutions run in TF32 (PyTorch's cuDNN default),
whose 10-bit mantissa is fp16's, so fp32 and fp16 share bounds and bf16 (7 bits) gets wider ones. With CPU autocast
the tiny model's per-sample losses came within 1.4e-3 (bf16) and 2e-4 (fp16) of fp32, its gradient within 1.5e-2
and 2.2e-3 (relative L2); the bounds leave about 5x room. A wrong noise, timestep, dtype or scale is off by far more.
"""

import contextlib
import copy
import itertools
import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers import save_standin_inception
from launchers import clean_env, launcher_command
from sample_tiny_model import perturb_, tiny_model_and_diffusion
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP
from train_fixtures import TINY_TRAIN_FLAGS, read_progress, train

from guided_diffusion import checkpoint, dist_util
from guided_diffusion.logger import Logger
from guided_diffusion.resample import UniformSampler
from guided_diffusion.sampling import (
    PerSampleGenerator,
    SamplingOptions,
    generate_batch,
)
from guided_diffusion.script_util import model_and_diffusion_defaults
from guided_diffusion.speed_options import apply_speed_options
from guided_diffusion.train_util import MAX_CONSECUTIVE_SKIPPED_FP16_STEPS, TrainLoop
from guided_diffusion.unet import qkv_attention

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU (torch.cuda.is_available() is False); scripts/gpu_check.sh runs these on one",
    ),
]

DEVICE = torch.device("cuda", 0)
TWO_RANKS = os.path.join(os.path.dirname(__file__), "dist_scripts", "train_two_ranks.py")
MODEL_FLAGS = {k: v for k, v in TINY_TRAIN_FLAGS.items() if k in model_and_diffusion_defaults()}  # 16 px, T = 100

# One batch of four 16 px images, one timestep per quartile of T = 100, and the noise added to them.
_generator = torch.Generator().manual_seed(0)
BATCH = torch.rand(4, 3, 16, 16, generator=_generator) * 2 - 1
TIMESTEPS = torch.tensor([3, 30, 60, 99])
NOISE = torch.randn(4, 3, 16, 16, generator=_generator)

LOSS_RTOL = {"fp32": 2e-3, "fp16": 2e-3, "bf16": 1e-2}  # per-sample loss, relative
GRAD_RTOL = {"fp32": 1e-2, "fp16": 1e-2, "bf16": 5e-2}  # the whole gradient, relative L2


def tiny():
    """The perturbed tiny U-Net (a fresh one outputs zeros) on the CPU and its diffusion."""
    model, diffusion = tiny_model_and_diffusion(**MODEL_FLAGS)
    return perturb_(model), diffusion


def relative_error(value, exact):
    value, exact = value.detach().float().cpu(), exact.detach().float().cpu()
    return ((value - exact).norm() / exact.norm()).item()


def flat_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()]).float().cpu()


def loss_and_grad(model, diffusion, device):
    """Per-sample losses of BATCH at TIMESTEPS with NOISE, and the gradient of their mean."""
    losses = diffusion.training_losses(model, BATCH.to(device), TIMESTEPS.to(device), noise=NOISE.to(device))
    losses["loss"].mean().backward()
    return losses["loss"].detach().cpu(), flat_grad(model)


@contextlib.contextmanager
def without_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class FixedTimesteps(UniformSampler):
    """Draws TIMESTEPS at every step (importance weight 1), so that two runs see the same t."""

    def sample(self, batch_size, device):
        return TIMESTEPS.to(device), torch.ones(batch_size, device=device)


def train_step(model, precision, device, log_dir, monkeypatch):
    """TrainLoop.run_step of a copy of `model` on `device` with BATCH, TIMESTEPS and NOISE. Steps the fp16 loss scale
    skips leave the weights as they were and are repeated.

    :return: (per-sample losses [4] of the step taken, its flat gradient, the loop), tensors on the CPU.
    """
    _, diffusion = tiny()
    recorded = []
    training_losses = diffusion.training_losses

    def with_fixed_noise(model, x_start, t, model_kwargs=None):
        losses = training_losses(model, x_start, t, model_kwargs=model_kwargs, noise=NOISE.to(x_start.device))
        recorded.append(losses["loss"].detach().float().cpu())
        return losses

    diffusion.training_losses = with_fixed_noise
    monkeypatch.setattr(dist_util, "dev", lambda: torch.device(device))
    loop = TrainLoop(
        model=copy.deepcopy(model), diffusion=diffusion, data=None, batch_size=len(BATCH), microbatch=-1, lr=1e-4,
        ema_rate="0.9", log_interval=1, save_interval=10**6, resume_checkpoint="", log_dir=str(log_dir),
        precision=precision, schedule_sampler=FixedTimesteps(diffusion), logger=Logger(str(log_dir), enabled=False),
        progress=False,
    )
    for _ in range(MAX_CONSECUTIVE_SKIPPED_FP16_STEPS):
        loop.run_step(BATCH, {})
        if all(torch.isfinite(p.grad).all() for p in loop.params):
            break
    return recorded[-1], flat_grad(loop.model), loop


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_step_matches_the_cpu_fp32_step(precision, tmp_path, monkeypatch):
    model, _ = tiny()
    cpu_losses, cpu_grad, _ = train_step(model, "fp32", "cpu", tmp_path / "cpu", monkeypatch)
    losses, grad, loop = train_step(model, precision, DEVICE, tmp_path / "cuda", monkeypatch)
    assert loop.params[0].is_cuda and loop.opt.defaults["fused"]
    torch.testing.assert_close(losses, cpu_losses, rtol=LOSS_RTOL[precision], atol=0)
    assert relative_error(grad, cpu_grad) < GRAD_RTOL[precision]
    # AdamW moved every weight tensor that has a gradient, to finite values.
    for new, old in zip(loop.params, model.parameters()):
        assert torch.isfinite(new).all() and not torch.equal(new.cpu(), old)
    row = loop.log_step()
    assert row["loss"] == pytest.approx(losses.mean().item(), rel=1e-4) and math.isfinite(row["grad_norm"])


@without_tf32()  # so that any difference in kernel choice stays at fp32 rounding (1e-7)
def test_ddp_on_one_gpu_gives_the_plain_model_gradients(tmp_path):
    torch.cuda.set_device(DEVICE)
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model, diffusion = tiny()
        plain = model.to(DEVICE)
        wrapped = DDP(copy.deepcopy(plain), device_ids=[DEVICE])
        losses, grad = loss_and_grad(plain, diffusion, DEVICE)
        ddp_losses, _ = loss_and_grad(wrapped, diffusion, DEVICE)
        assert dist.get_backend() == "nccl"
        torch.testing.assert_close(ddp_losses, losses, rtol=1e-5, atol=0)
        assert relative_error(flat_grad(wrapped.module), grad) < 1e-4
    finally:
        dist.destroy_process_group()


def visible_gpus():
    """The GPUs this process sees, as CUDA_VISIBLE_DEVICES entries."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (DDP of two processes)")
def test_two_gpu_ranks_train_identical_weights_over_nccl(images, tmp_path):
    env = clean_env()
    env["CUDA_VISIBLE_DEVICES"] = ",".join(visible_gpus()[:2])
    result = subprocess.run(
        launcher_command("torchrun", TWO_RANKS, "first", images, str(tmp_path)),
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"first_rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in reports] == [2, 2] and reports[0]["straight_step"] == 4
    for key in ("straight_model", "straight_ema", "half_model"):
        assert reports[0][key] == reports[1][key], key
    assert not set(reports[0]["batches"]) & set(reports[1]["batches"])  # each rank its own shard
    assert [r["visible_after"] for r in reports] == [env["CUDA_VISIBLE_DEVICES"]] * 2
    assert "device cuda:0" in (tmp_path / "straight" / "log.txt").read_text()


# (batch, tokens, heads, channels per head) of the U-Nets' attention layers.
ATTENTION_SHAPES = [
    pytest.param(8, 256, 8, 64, id="p2_256-16px"),
    pytest.param(8, 64, 8, 64, id="p2_256-8px"),
    pytest.param(16, 64, 2, 32, id="demo-8px"),
]


@pytest.mark.parametrize("backend", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION], ids=["flash",
                                                                                                   "efficient"])
@pytest.mark.parametrize("batch,tokens,heads,head_channels", ATTENTION_SHAPES)
def test_fused_attention_kernels_match_the_math_kernel_in_bf16(backend, batch, tokens, heads, head_channels):
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, tokens, 3 * heads * head_channels, generator=generator).to(DEVICE, torch.bfloat16)
    grad_out = torch.randn(batch, tokens, heads * head_channels, generator=generator).to(DEVICE)
    # The math kernel in fp32 on the same bf16 inputs: the exact result.
    exact_in = qkv.float().requires_grad_()
    with sdpa_kernel(SDPBackend.MATH):
        exact = qkv_attention(exact_in, heads)
    exact.backward(grad_out)
    fused_in = qkv.clone().requires_grad_()
    with sdpa_kernel(backend):  # raises "No available kernel" if it cannot take the U-Net's q, k, v layout
        fused = qkv_attention(fused_in, heads)
        fused.float().backward(grad_out)
    assert fused.dtype == torch.bfloat16
    # bf16 rounding alone (the math kernel in bf16) gives 2e-3 forward and 3e-3 backward.
    assert relative_error(fused, exact) < 1e-2
    assert relative_error(fused_in.grad, exact_in.grad) < 2e-2


@pytest.mark.parametrize("options", [
    pytest.param({"channels_last": True}, id="channels_last"),
    pytest.param({"compile": True}, id="compile", marks=pytest.mark.slow),
])
@without_tf32()  # NHWC and compiled graphs pick other kernels; in TF32 they would differ by 1e-3 anyway
def test_speed_options_give_the_plain_loss_and_gradient(options):
    model, diffusion = tiny()
    losses, grad = loss_and_grad(copy.deepcopy(model).to(DEVICE), diffusion, DEVICE)
    fast = apply_speed_options(copy.deepcopy(model).to(DEVICE), device=DEVICE, training=True, **options)
    fast_losses, fast_grad = loss_and_grad(fast, diffusion, DEVICE)
    torch.testing.assert_close(fast_losses, losses, rtol=LOSS_RTOL["fp32"], atol=0)
    assert relative_error(fast_grad, grad) < GRAD_RTOL["fp32"]
    layout = torch.channels_last if options.get("channels_last") else torch.contiguous_format
    assert fast.input_blocks[0][0].weight.is_contiguous(memory_format=layout)


def test_sample_i_depends_only_on_seed_and_i():
    model, diffusion = tiny_model_and_diffusion(**MODEL_FLAGS, timestep_respacing="5")  # ancestral, 5 steps
    model = perturb_(model).to(DEVICE).eval()
    options = SamplingOptions(image_size=16, seed=3)
    first, _ = generate_batch(model, diffusion, [0, 1, 2, 3], options, DEVICE)
    again, _ = generate_batch(model, diffusion, [0, 1, 2, 3], options, DEVICE)
    np.testing.assert_array_equal(again, first)  # same batch, same kernels: bit-identical
    other_seed, _ = generate_batch(model, diffusion, [0, 1, 2, 3], SamplingOptions(image_size=16, seed=4), DEVICE)
    assert not np.array_equal(other_seed, first)
    # Sample i's noise is its own, whatever batch draws it.
    together = PerSampleGenerator(3, [0, 1, 2, 3], DEVICE).randn((4, 3, 16, 16))
    assert torch.equal(PerSampleGenerator(3, [2], DEVICE).randn((1, 3, 16, 16)), together[2:3])
    # In another batch the network's kernels may round differently (sampling.py): at most a rare pixel moves by one
    # level. TF32 off, since its rounding (1e-3) would cross a level (7.8e-3) at one pixel in ten.
    with without_tf32():
        full, _ = generate_batch(model, diffusion, [0, 1, 2, 3], options, DEVICE)
        part, _ = generate_batch(model, diffusion, [2, 3], options, DEVICE)
    moved = np.abs(part.astype(np.int16) - full[2:].astype(np.int16))
    assert moved.max() <= 1 and (moved > 0).mean() < 1e-2


def test_checkpoint_written_on_the_gpu_resumes_on_the_cpu_and_back(tmp_path, monkeypatch):
    model, diffusion = tiny()
    log_dir = str(tmp_path / "run")

    def loop_on(device, max_steps, resume_checkpoint=""):
        monkeypatch.setattr(dist_util, "dev", lambda: torch.device(device))
        return TrainLoop(
            model=copy.deepcopy(model), diffusion=diffusion, data=itertools.repeat((BATCH, {})),
            batch_size=len(BATCH), microbatch=-1, lr=1e-3, ema_rate="0.9", log_interval=1, save_interval=2,
            resume_checkpoint=resume_checkpoint, log_dir=log_dir, max_steps=max_steps,
            logger=Logger(log_dir, enabled=False), progress=False,
        )

    def assert_same_state(loop, other, device_type):
        """Weights and AdamW state (step, exp_avg, exp_avg_sq) equal `other`'s, on `device_type`."""
        for param, other_param in zip(loop.params, other.params):
            assert param.device.type == device_type and torch.equal(param.cpu(), other_param.cpu())
            state, other_state = loop.opt.state[param], other.opt.state[other_param]
            assert sorted(state) == sorted(other_state) == ["exp_avg", "exp_avg_sq", "step"]
            for key, value in state.items():
                assert value.device.type == device_type and torch.equal(value.cpu(), other_state[key].cpu()), key

    gpu = loop_on(DEVICE, 2)
    gpu.run_loop()
    # The reference's files hold CPU tensors: they load on a machine without a GPU, strictly, as trained.
    fresh, _ = tiny()
    for name, values in (("model000002.pt", gpu.params), ("ema_0.9_000002.pt", gpu.ema_params["0.9"])):
        state = torch.load(os.path.join(log_dir, name), weights_only=True)
        assert all(v.device.type == "cpu" for v in state.values())
        fresh.load_state_dict(state, strict=True)
        for loaded, trained in zip(fresh.parameters(), values):
            assert torch.equal(loaded, trained.cpu())
    cpu = loop_on("cpu", 3, resume_checkpoint=log_dir)
    assert cpu.step == 2
    assert_same_state(cpu, gpu, "cpu")
    cpu.run_loop()
    back = loop_on(DEVICE, 4, resume_checkpoint=log_dir)
    assert back.step == 3
    assert_same_state(back, cpu, "cuda")
    back.run_loop()
    assert checkpoint.complete_steps(log_dir) == [2, 3, 4]
    assert all(torch.isfinite(p).all() for p in back.params)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    torch.manual_seed(0)
    return save_standin_inception(tmp_path_factory.mktemp("net") / "standin.pt")


def test_in_training_evaluation_runs_on_cuda(images, standin, tmp_path):
    loop = train(
        images, tmp_path / "run", max_steps=2, eval_interval=2, eval_samples=6, eval_batch_size=4,
        eval_timestep_respacing="ddim5", inception_path=standin, eval_cache_dir=str(tmp_path / "cache"),
    )
    assert loop.device.type == "cuda"
    assert next(loop.evaluator.network.model.parameters()).is_cuda
    rows = [row for row in read_progress(tmp_path / "run") if "fid" in row]
    assert [row["step"] for row in rows] == [2]
    assert math.isfinite(rows[0]["fid"]) and rows[0]["fid"] >= 0 and math.isfinite(rows[0]["kid"])
