"""TrainLoop: the training step, EMA, precision, logging and checkpoint calls.

The reference's loop is described in docs/compatibility.md, "Training loop"; the defects fixed here (#3-#7, #13,
#18, #19) are listed in its "Reference defects fixed here".

One optimizer step:
1. the batch is split into microbatches; each draws its own t from the schedule sampler and adds its loss scaled by
   its share of the batch, so the gradient is the batch mean whatever the microbatch size (the reference summed,
   defect #6); DDP all-reduces once, on the last microbatch;
2. AdamW steps (fp16: through a dynamic loss scale that unscales every parameter group, defect #7; a skipped step
   changes neither weights nor EMA);
3. every EMA moves towards the weights: θ_e ← r·θ_e + (1−r)·θ.

Precision: the weights are always fp32; bf16 and fp16 run the forward pass under torch.autocast.

The step counter counts optimizer steps (skipped fp16 steps included), and it numbers the checkpoints: a file
numbered S holds weights that have seen S steps. Statistics stay on the device between log steps; the only host
syncs are at log and save steps (plus the one GradScaler makes in fp16). progress.csv gets a row every log_interval
steps and after step 1 and the last step. SIGTERM, SIGUSR1 and Ctrl-C stop the loop after a checkpoint of the step
they interrupted (guided_diffusion/preemption.py).
"""

import contextlib
import copy
import math
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel.distributed import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from . import checkpoint, dist_util, preemption
from .gaussian_diffusion import SNR_STAGE_NAMES, snr_stage
from .logger import Logger
from .precision import PRECISIONS, autocast_for
from .resample import LossAwareSampler, UniformSampler
from .script_util import RESUME_MAY_CHANGE, train_flag_defaults
from .state_dict_check import load_state_dict_checked

INITIAL_LG_LOSS_SCALE = 20.0  # the reference's starting log2 loss scale
# From 2^20, 30 halvings reach 2^-10: no finite loss needs a scale that small, so the loss itself is broken.
MAX_CONSECUTIVE_SKIPPED_FP16_STEPS = 30
LOSS_KEYS = ("loss", "mse", "mse_raw", "vb")


def seed_everything(seed):
    """Seed Python's, numpy's and torch's global generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_precision(precision, use_fp16=False):
    """--precision, with the reference's --use_fp16 True as another spelling of fp16."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if use_fp16 and precision == "bf16":
        raise ValueError("--use_fp16 True asks for fp16 but --precision is bf16; pass only one of them")
    return "fp16" if use_fp16 else precision


def parse_ema_rates(ema_rate):
    """--ema_rate "0.9999,0.999" -> ["0.9999", "0.999"] (spelled as given: the EMA file names use it)."""
    rates = [r.strip() for r in str(ema_rate).split(",") if r.strip()]
    for rate in rates:
        try:
            value = float(rate)
        except ValueError:
            value = math.nan
        if not 0.0 <= value < 1.0:
            raise ValueError(f"--ema_rate {ema_rate!r}: {rate!r} is not a number in [0, 1)")
    return rates


class TrainLoop:
    """Trains `model` on `diffusion.training_losses` until --max_steps or --lr_anneal_steps (else forever).

    :param model: the U-Net (fp32 weights); moved to `dist_util.dev()`.
    :param diffusion: a (respaced) GaussianDiffusion.
    :param data: iterator of (x [B, C, H, W] in [-1, 1], cond dict of [B] tensors); with state_dict() /
        load_state_dict() (as `image_datasets.load_data` returns) a resume continues the data stream exactly.
    :param batch_size: images per rank per step; the global batch is batch_size · world size.
    :param microbatch: images per forward pass (<= 0: the whole batch).
    :param lr: AdamW learning rate; with lr_anneal_steps, step s uses lr·(1 − s/lr_anneal_steps).
    :param ema_rate: comma-separated EMA rates, e.g. "0.9999".
    :param log_interval, save_interval: in optimizer steps.
    :param save_interval_minutes: also a checkpoint when this much wall-clock time passed since the last (0: off).
    :param resume_checkpoint: "" or what `checkpoint.load_resume_point` accepts.
    :param log_dir: folder of the checkpoints and logs.
    :param use_fp16: the reference's flag; True means precision "fp16".
    :param fp16_scale_growth: log2 growth of the fp16 loss scale per step (the scale doubles every 1/x steps).
    :param schedule_sampler: a ScheduleSampler (default uniform).
    :param weight_decay: AdamW's decoupled weight decay.
    :param lr_anneal_steps: linear decay to 0 at this step, where training stops (0: off).
    :param max_steps: stop when this many optimizer steps are done, LR untouched (0: off).
    :param precision: "fp32", "bf16" or "fp16".
    :param keep_checkpoints: keep only the newest N complete checkpoints (0: keep all).
    :param config: resolved flags, stored in the training state and compared on resume.
    :param resume_may_change: names of the flags of `config` that may differ from the checkpoint's on resume
        (default: image_train.py's classification); any other difference is an error.
    :param logger: a `Logger` (default: one writing into log_dir on rank 0).
    :param progress: show a tqdm bar on rank 0.
    :param evaluator: called every eval_interval steps with a model holding the first EMA rate's weights; returns
        {metric: value} on rank 0 (logged to progress.csv), None elsewhere (e.g. train_eval.TrainingEvaluator).
    :param eval_interval: optimizer steps between evaluations (0: never).
    """

    def __init__(
        self,
        *,
        model,
        diffusion,
        data,
        batch_size,
        microbatch,
        lr,
        ema_rate,
        log_interval,
        save_interval,
        resume_checkpoint,
        log_dir,
        use_fp16=False,
        fp16_scale_growth=1e-3,
        schedule_sampler=None,
        weight_decay=0.0,
        lr_anneal_steps=0,
        max_steps=0,
        precision="fp32",
        keep_checkpoints=0,
        config=None,
        resume_may_change=RESUME_MAY_CHANGE,
        logger=None,
        progress=True,
        evaluator=None,
        eval_interval=0,
        save_interval_minutes=0.0,
    ):
        for name, value, minimum in (("batch_size", batch_size, 1), ("log_interval", log_interval, 1),
                                     ("save_interval_minutes", save_interval_minutes, 0),
                                     ("save_interval", save_interval, 1), ("lr_anneal_steps", lr_anneal_steps, 0),
                                     ("max_steps", max_steps, 0), ("keep_checkpoints", keep_checkpoints, 0),
                                     ("eval_interval", eval_interval, 0)):
            if value < minimum:
                raise ValueError(f"--{name} {value} must be >= {minimum}")
        if lr < 0:
            raise ValueError(f"--lr {lr} must be >= 0")
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rates = parse_ema_rates(ema_rate)
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.save_interval_minutes = save_interval_minutes
        self.log_dir = log_dir
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.lr_anneal_steps = lr_anneal_steps
        self.max_steps = max_steps
        self.precision = resolve_precision(precision, use_fp16)
        self.keep_checkpoints = keep_checkpoints
        self.config = dict(config or {})
        self.progress = progress
        self.evaluator = evaluator if eval_interval > 0 else None
        self.eval_interval = eval_interval
        self._eval_model = None

        self.rank, self.world_size = dist_util.rank_and_world_size()
        self.global_batch = batch_size * self.world_size
        self.device = dist_util.dev()
        self.model.to(self.device)

        resume = None
        if resume_checkpoint:
            resume = checkpoint.load_resume_point(
                resume_checkpoint, self.ema_rates, config=self.config or None, may_change=resume_may_change,
                defaults=train_flag_defaults(),
            )
            load_state_dict_checked(self.model, resume.model, resume.source)
        self.step = resume.step if resume else 0
        self._last_saved_step = self.step
        checkpoint.check_log_dir(log_dir, self.step, remove_temporaries=self.rank == 0)
        self.logger = logger or Logger(log_dir, enabled=self.rank == 0)
        self.logger.drop_rows_after(self.step)
        if resume:
            self._log_resume(resume)
        # Before the EMA copies are made, so that they too start equal on every rank.
        dist_util.sync_params(self.model.parameters())

        self.params = list(self.model.parameters())
        self.ema_params = {rate: [p.detach().clone() for p in self.params] for rate in self.ema_rates}
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, **_fast_adamw(self.device))
        self.grad_scaler = torch.amp.GradScaler(
            self.device.type,
            init_scale=2.0**INITIAL_LG_LOSS_SCALE,
            growth_factor=2.0,
            backoff_factor=0.5,
            growth_interval=max(1, round(1.0 / fp16_scale_growth)),
            enabled=self.precision == "fp16",
        )
        self._pending_rng_state = None
        if resume:
            self._load_resume_point(resume)

        if self.world_size > 1:
            self.ddp_model = DDP(
                self.model,
                device_ids=[self.device] if self.device.type == "cuda" else None,
                bucket_cap_mb=128,
            )
        else:
            self.ddp_model = self.model
        self.stats = LossStats(diffusion, self.device)
        self._consecutive_skipped_steps = 0
        self._interval_start = (time.perf_counter(), self.step)

    # ------------------------------------------------------------------------------------------------------------
    # Resume

    def _log_resume(self, resume):
        changes = "; ".join(f"--{flag} {old!r} -> {new!r}" for flag, old, new in resume.changed_flags)
        self.logger.info(
            f"resuming from {resume.source} at step {resume.step}"
            + (f"; flags changed since the checkpoint: {changes}" if changes else "")
        )

    def _load_resume_point(self, resume):
        named = [name for name, _ in self.model.named_parameters()]
        with torch.no_grad():
            for rate, ema_state in resume.ema.items():
                for ema_param, name in zip(self.ema_params[rate], named):
                    ema_param.copy_(ema_state[name])
        if resume.optimizer is not None:
            self.opt.load_state_dict(resume.optimizer)
            match_state_layout(self.opt)
            # The flag's learning rate applies: a reference-style file has no stored config to check --lr against.
            for group in self.opt.param_groups:
                group["lr"] = self.lr
        state = resume.state
        if state is None:
            return
        if state["grad_scaler"] and self.precision == "fp16":
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.schedule_sampler.load_state_dict(state["schedule_sampler"])
        if len(state["rng"]) != self.world_size:
            self.logger.info(
                f"warning: {resume.source} was saved by {len(state['rng'])} ranks, this run has {self.world_size}: "
                "random streams and data order start afresh, so the resume is not exact"
            )
            return
        if hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(state["data"])
        # Restored when the first batch is in hand: starting a data iterator may draw from the global generators
        # (DataLoader seeds its workers so), which the uninterrupted run did before the checkpoint.
        self._pending_rng_state = state["rng"][self.rank]

    # ------------------------------------------------------------------------------------------------------------
    # The loop

    def run_loop(self):
        """Train until the stop step; checkpoint every save_interval steps (and save_interval_minutes) and at the end.

        :raises preemption.Stopped: after the checkpoint of the step a stop signal interrupted (see preemption.py).
        """
        stop_step = self._stop_step()
        self.logger.info(
            f"training from step {self.step} to {stop_step or 'forever'}: {self.world_size} rank(s) x batch "
            f"{self.batch_size} (microbatch {self.microbatch}), precision {self.precision}, device {self.device}"
        )
        bar = tqdm(
            total=stop_step or None,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=self.rank != 0 or not self.progress,
        )
        decisions = preemption.StepDecisions(self.device, self.rank, self.world_size, self.save_interval_minutes)
        try:
            request = preemption.StopRequest()
            with preemption.signal_handlers(request.handle):
                while not (stop_step and self.step >= stop_step):
                    batch, cond = next(self.data)
                    self.run_step(batch, cond)
                    bar.update(1)
                    # Equal on every rank; the last step finishes the run whatever arrived during it.
                    stop_signal, save_now = decisions.after_step(request.signum)
                    stop_signal = stop_signal if self.step != stop_step else 0
                    if stop_signal or self._is_log_step(self.step):
                        scalars = self.log_step()
                        bar.set_postfix(loss=f"{scalars['loss']:.4g}", refresh=False)
                    if stop_signal or save_now or self.step % self.save_interval == 0:
                        self.save()
                        decisions.saved()
                    if stop_signal:
                        stopped = preemption.Stopped(stop_signal, self.step, self.log_dir)
                        self.logger.info(str(stopped))
                        raise stopped
                    if self.evaluator is not None and self.step % self.eval_interval == 0:
                        self.evaluate()
                if self.step != self._last_saved_step:
                    self.save()
        finally:
            bar.close()

    def _stop_step(self):
        return min((s for s in (self.max_steps, self.lr_anneal_steps) if s > 0), default=0)

    def _is_log_step(self, step):
        """Every log_interval steps, and after the first and the last step."""
        return step % self.log_interval == 0 or step in (1, self._stop_step())

    def run_step(self, batch, cond):
        """One optimizer step on a batch of this rank."""
        if self._pending_rng_state is not None:
            checkpoint.restore_rng_state(self._pending_rng_state)
            self._pending_rng_state = None
        log_now = self._is_log_step(self.step + 1)
        self.forward_backward(batch, cond)
        self.optimize(log_now)
        self.step += 1

    def forward_backward(self, batch, cond):
        """Accumulate into .grad the gradient of the batch-mean loss (microbatch losses weighted by their share)."""
        self.opt.zero_grad(set_to_none=True)
        batch_size = batch.shape[0]
        for start in range(0, batch_size, self.microbatch):
            # non_blocking: a host-to-GPU copy that does not wait for the previous step's queued kernels.
            micro = batch[start : start + self.microbatch].to(self.device, non_blocking=True)
            micro_cond = {
                k: v[start : start + self.microbatch].to(self.device, non_blocking=True) for k, v in cond.items()
            }
            is_last = start + self.microbatch >= batch_size
            t, weights = self.schedule_sampler.sample(micro.shape[0], self.device)
            # DDP all-reduces on the last microbatch only; the others accumulate locally.
            no_sync = self.ddp_model.no_sync() if self.ddp_model is not self.model and not is_last else None
            with no_sync or contextlib.nullcontext():
                with self._autocast():
                    losses = self.diffusion.training_losses(self.ddp_model, micro, t, model_kwargs=micro_cond)
                if isinstance(self.schedule_sampler, LossAwareSampler):
                    self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
                self.stats.add(t, weights, losses)
                loss = (losses["loss"] * weights).mean() * (micro.shape[0] / batch_size)
                self.grad_scaler.scale(loss).backward()

    def _autocast(self):
        return autocast_for(self.precision, self.device.type)

    def optimize(self, log_now):
        """Optimizer step (skipped by the fp16 loss scale on inf/NaN gradients), then the EMA update."""
        self.grad_scaler.unscale_(self.opt)
        if log_now:
            self.stats.set("grad_norm", _global_norm([p.grad for p in self.params if p.grad is not None]))
        if self.lr_anneal_steps:
            for group in self.opt.param_groups:
                group["lr"] = self.lr * (1.0 - self.step / self.lr_anneal_steps)
        if self.precision == "fp16":
            scale_before = self.grad_scaler.get_scale()
            self.grad_scaler.step(self.opt)
            self.grad_scaler.update()
            if self.grad_scaler.get_scale() < scale_before:
                self._skipped_fp16_step()
                return
            self._consecutive_skipped_steps = 0
        else:
            self.opt.step()
        self._update_ema()

    def _skipped_fp16_step(self):
        self._consecutive_skipped_steps += 1
        if self._consecutive_skipped_steps >= MAX_CONSECUTIVE_SKIPPED_FP16_STEPS:
            raise FloatingPointError(
                f"fp16: {self._consecutive_skipped_steps} consecutive steps up to step {self.step + 1} had inf/NaN "
                f"gradients (loss scale now {self.grad_scaler.get_scale():g}); the loss itself is not finite. "
                + self._last_checkpoint_advice("with --precision bf16 or fp32, or a lower --lr")
            )

    @torch.no_grad()
    def _update_ema(self):
        for rate, ema_params in self.ema_params.items():
            torch._foreach_lerp_(ema_params, self.params, 1.0 - float(rate))

    # ------------------------------------------------------------------------------------------------------------
    # Logging and checkpoints

    def log_step(self):
        """Write the interval's means (one host sync) and the norms; returns the row written."""
        self.stats.set("param_norm", _global_norm(self.params))
        means, nonfinite = self.stats.pop_means()
        self._raise_if_nonfinite(self._on_any_rank(nonfinite))
        now = time.perf_counter()
        start_time, start_step = self._interval_start
        sec_per_step = (now - start_time) / max(1, self.step - start_step)
        self._interval_start = (now, self.step)
        scalars = {"step": self.step, "samples": self.step * self.global_batch, **means}
        if self.precision == "fp16":
            scalars["lg_loss_scale"] = math.log2(self.grad_scaler.get_scale())
        scalars["sec_per_step"] = sec_per_step
        scalars["images_per_s"] = self.global_batch / sec_per_step
        self.logger.write_scalars(scalars, self.step)
        return scalars

    def evaluate(self):
        """Score the weights of the first EMA rate with the evaluator; rank 0 logs the scores to progress.csv.

        The random states are restored afterwards, so a run that evaluates continues exactly as one resumed from
        the checkpoint of the same step (which was saved before the evaluation).
        """
        if self._eval_model is None:
            self._eval_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        with torch.no_grad():
            torch._foreach_copy_(list(self._eval_model.parameters()), self.ema_params[self.ema_rates[0]])
        rng_state = checkpoint.capture_rng_state()
        try:
            scores = self.evaluator(self._eval_model)
        finally:
            checkpoint.restore_rng_state(rng_state)
        if scores is not None:
            row = {"step": self.step, "samples": self.step * self.global_batch, **scores}
            self.logger.write_scalars(row, self.step)
        return scores

    def _raise_if_nonfinite(self, nonfinite):
        # fp16 meets inf/NaN losses by design (the loss scale handles them); fp32/bf16 must not.
        if nonfinite and self.precision != "fp16":
            message = (
                f"the training loss became inf/NaN before step {self.step} ({self.precision}). "
                + self._last_checkpoint_advice("with a lower --lr")
            )
            self.logger.info(message)
            raise FloatingPointError(message)

    def _on_any_rank(self, flag):
        """True on every rank if `flag` is True on any, so that all ranks stop together instead of hanging."""
        if self.world_size == 1:
            return flag
        flags = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags.item())

    def _last_checkpoint_advice(self, remedy):
        """Where the last finite weights are and how to train on from them `remedy` (e.g. "with a lower --lr")."""
        steps = checkpoint.complete_steps(self.log_dir)
        if not steps:
            return f"No checkpoint was saved; train again {remedy}"
        # --lr and --precision change the maths, so a resume may not change them: a new run starts from the weights.
        return (
            f"The last good checkpoint is {checkpoint.state_path(self.log_dir, steps[-1])}; to train on from it "
            f"{remedy}, {checkpoint.restart_advice(self.log_dir, steps[-1])}"
        )

    def save(self):
        """Write the checkpoint of the current step (rank 0), after checking that the weights are finite."""
        weights_finite = math.isfinite(_global_norm(self.params).item())
        self._raise_if_nonfinite(self._on_any_rank(self.stats.nonfinite_seen() or not weights_finite))
        rng_states = [checkpoint.capture_rng_state()]
        if self.world_size > 1:
            rng_states = [None] * self.world_size
            dist.all_gather_object(rng_states, checkpoint.capture_rng_state())
        if self.rank == 0:
            state = checkpoint.training_state(
                step=self.step,
                model=_to_cpu(self.model.state_dict()),
                ema={rate: self._ema_state_dict(rate) for rate in self.ema_rates},
                optimizer=self.opt.state_dict(),
                grad_scaler=self.grad_scaler.state_dict(),
                schedule_sampler=self.schedule_sampler.state_dict(),
                rng=rng_states,
                data=self.data.state_dict() if hasattr(self.data, "state_dict") else {},
                config=self.config,
            )
            checkpoint.save_checkpoint(self.log_dir, state)
            deleted = checkpoint.prune_checkpoints(self.log_dir, self.keep_checkpoints)
            self.logger.info(
                f"saved checkpoint {self.step} in {self.log_dir}"
                + (f"; deleted step(s) {', '.join(map(str, deleted))}" if deleted else "")
            )
        self._last_saved_step = self.step
        dist_util.barrier()

    def _ema_state_dict(self, rate):
        """The model's state_dict with the EMA values in place of the parameters (same keys)."""
        state = self.model.state_dict()
        state.update(zip((name for name, _ in self.model.named_parameters()), self.ema_params[rate]))
        return _to_cpu(state)


class LossStats:
    """Per-sample losses of one log interval, summed on the device by t-quartile and SNR stage.

    Rows written (each the mean over the interval's samples of value × importance weight, as the reference):
    `key`, `key_q0`..`key_q3` (quartile ⌊4t/T⌋ of the respaced T) and `key_coarse`, `key_content`,
    `key_cleanup` (the paper's stages: SNR < 1e-2, 1e-2..1, > 1), for key in loss, mse (P2-weighted),
    mse_raw (unweighted) and vb, whichever the diffusion returns. Bins without samples are left out.
    """

    def __init__(self, diffusion, device):
        num_timesteps = diffusion.num_timesteps
        quartile = (4 * torch.arange(num_timesteps)) // num_timesteps
        stage = snr_stage(torch.from_numpy(diffusion.snr))
        # Bins 0-3: quartiles; 4-6: stages; 7: all samples.
        self.bins_of_t = torch.stack([quartile, 4 + stage, torch.full_like(quartile, 7)], dim=1).to(device)
        self.bin_suffixes = [f"_q{q}" for q in range(4)] + [f"_{name}" for name in SNR_STAGE_NAMES] + [""]
        self.device = device
        self._reset()

    def _reset(self):
        self.sums = {}
        self.counts = torch.zeros(len(self.bin_suffixes), device=self.device)
        self.scalars = {}
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)

    def add(self, t, weights, losses):
        """Add a microbatch: t [N], importance weights [N], losses {key: [N]} (keys outside LOSS_KEYS ignored)."""
        bins = self.bins_of_t[t].reshape(-1)
        self.counts.index_add_(0, bins, torch.ones_like(bins, dtype=self.counts.dtype))
        for key in LOSS_KEYS:
            if key in losses:
                values = (losses[key].detach().float() * weights).repeat_interleave(self.bins_of_t.shape[1])
                if key not in self.sums:
                    self.sums[key] = torch.zeros_like(self.counts)
                self.sums[key].index_add_(0, bins, values)
        self.nonfinite |= ~torch.isfinite(losses["loss"].detach()).all()

    def set(self, key, value):
        """A 0-d device tensor reported as is at the next pop_means (e.g. grad_norm)."""
        self.scalars[key] = value

    def nonfinite_seen(self):
        return bool(self.nonfinite.item())

    def pop_means(self):
        """({row name: float}, whether a non-finite loss was seen) for the interval, with one host sync; then reset."""
        fetched = _fetch_to_host(
            {"counts": self.counts, "nonfinite": self.nonfinite, **self.scalars, **{("sum", k): v for k, v in self.sums.items()}}
        )
        counts = fetched["counts"]
        means = {}
        for key in self.sums:
            sums = fetched[("sum", key)]
            # The overall mean (the last bin) first, then quartiles and stages, as the reference lists them.
            for j in [len(counts) - 1] + list(range(len(counts) - 1)):
                if counts[j] > 0:
                    means[key + self.bin_suffixes[j]] = sums[j] / counts[j]
        means.update({key: fetched[key][0] for key in self.scalars})
        nonfinite = fetched["nonfinite"][0] > 0
        self._reset()
        return means, nonfinite


def _fetch_to_host(tensors):
    """{name: device tensor} -> {name: flat list of floats}, copying everything in one transfer (one sync)."""
    flat = [t.detach().reshape(-1).float() for t in tensors.values()]
    values = torch.cat(flat).tolist()
    fetched, offset = {}, 0
    for name, t in zip(tensors, flat):
        fetched[name] = values[offset : offset + t.numel()]
        offset += t.numel()
    return fetched


def _global_norm(tensors):
    """L2 norm of all `tensors` together, as a 0-d device tensor (no host sync)."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([t.detach().float() for t in tensors])))


def _to_cpu(state_dict):
    # Written synchronously, so no copy is needed for tensors already on the CPU.
    return {k: v.detach().cpu() for k, v in state_dict.items()}


def match_state_layout(optimizer):
    """Give each per-parameter state tensor (exp_avg, ...) its parameter's memory layout, in place.

    The fused AdamW kernel walks parameter and state as flat arrays, so state saved by a run with another
    --channels_last setting (or by the reference) would silently be applied to the wrong elements.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _fast_adamw(device):
    # The fused kernel (one pass over each tensor) where PyTorch has one; the multi-tensor path elsewhere. On a CPU
    # the foreach path is no faster than the per-parameter loop, while fused is faster (measured in the benchmark).
    return {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
