"""ClassifierTrainLoop: training the noisy-image classifier of classifier guidance (scripts/classifier_train.py).

One optimizer step (the reference's): the batch is noised to x_t at t drawn uniformly (clean images at t = 0 without
--noised), split into microbatches whose cross-entropy losses are weighted by their share of the batch, and AdamW
steps; with --anneal_lr the learning rate at step s is lr·(1 - s/iterations). Every --eval_interval steps one batch
of --val_data_dir is scored without gradients, with draws of its own. The weights stay fp32; bf16 and fp16 run the
forward pass under autocast (fp16 with a dynamic loss scale starting at 2^16, as the reference's classifier).

Logged (progress.csv, the reference's keys): step, samples, and per prefix train/val the loss, acc@1 and acc@5, each
overall and per t quartile (_q0 .. _q3, quartile ⌊4t/T⌋). The step counter counts optimizer steps and numbers the
checkpoints: modelNNNNNN.pt and optNNNNNN.pt as the reference writes them, then stateNNNNNN.pt (an exact resume:
random states, data positions, loss scale), all written by guided_diffusion/checkpoint.py; there is no EMA.
SIGTERM, SIGUSR1 and Ctrl-C stop the loop after a checkpoint of the step they interrupted (preemption.py).
"""

import contextlib
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel.distributed import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from . import checkpoint, dist_util, preemption
from .logger import Logger
from .precision import autocast_for
from .resample import UniformSampler
from .state_dict_check import load_state_dict_checked

INITIAL_LG_LOSS_SCALE = 16.0  # the reference classifier's starting log2 loss scale
TOP_K = (1, 5)


class ClassifierTrainLoop:
    """Trains `model` (an EncoderUNetModel) to classify x_t until step `iterations`.

    :param model: the classifier (fp32 weights); moved to `dist_util.dev()`.
    :param diffusion: the diffusion whose q(x_t | x_0) noises the images (and whose T sets the quartiles).
    :param data, val_data: iterators of (x [B, 3, S, S] in [-1, 1], {"y": int64 [B]}) as image_datasets.load_data
        returns them (with state_dict() / load_state_dict() for an exact resume); val_data may be None.
    :param batch_size: images per rank per step. :param microbatch: images per forward pass (<= 0: the batch).
    :param noised: noise the images to a uniform random t, else classify clean images at t = 0.
    :param iterations: the step training stops at (and, with anneal_lr, where the learning rate reaches 0).
    :param log_interval, eval_interval, save_interval: in optimizer steps.
    :param save_interval_minutes: also a checkpoint when this much wall-clock time passed since the last (0: off).
    :param resume_checkpoint: "" or what `checkpoint.load_resume_point` accepts.
    :param precision: "fp32", "bf16" or "fp16".
    :param keep_checkpoints: keep only the newest N complete checkpoints (0: keep all).
    :param config: the resolved flags, stored in the training state and compared on resume.
    :param resume_may_change: the flags of `config` that may differ from the checkpoint's on resume.
    """

    def __init__(self, *, model, diffusion, data, val_data, batch_size, microbatch, lr, weight_decay, anneal_lr,
                 iterations, noised, log_interval, eval_interval, save_interval, resume_checkpoint, log_dir,
                 precision="fp32", keep_checkpoints=0, save_interval_minutes=0.0, config=None,
                 resume_may_change=frozenset(), logger=None, progress=True):
        for name, value, minimum in (("batch_size", batch_size, 1), ("iterations", iterations, 1),
                                     ("log_interval", log_interval, 1), ("eval_interval", eval_interval, 1),
                                     ("save_interval", save_interval, 1), ("keep_checkpoints", keep_checkpoints, 0),
                                     ("save_interval_minutes", save_interval_minutes, 0)):
            if value < minimum:
                raise ValueError(f"--{name} {value} must be >= {minimum}")
        self.model, self.diffusion, self.data, self.val_data = model, diffusion, data, val_data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr, self.anneal_lr, self.iterations, self.noised = lr, anneal_lr, iterations, noised
        self.log_interval, self.eval_interval, self.save_interval = log_interval, eval_interval, save_interval
        self.save_interval_minutes = save_interval_minutes
        self.log_dir, self.precision, self.keep_checkpoints = log_dir, precision, keep_checkpoints
        self.config = dict(config or {})
        self.progress = progress
        self.rank, self.world_size = dist_util.rank_and_world_size()
        self.device = dist_util.dev()
        self.model.to(self.device)
        self.schedule_sampler = UniformSampler(diffusion)
        self.stats = ClassifierStats(diffusion.num_timesteps)

        resume = None
        if resume_checkpoint:
            resume = checkpoint.load_resume_point(resume_checkpoint, [], config=self.config or None,
                                                  may_change=resume_may_change)
            load_state_dict_checked(self.model, resume.model, resume.source)
        self.step = resume.step if resume else 0
        checkpoint.check_log_dir(log_dir, self.step, remove_temporaries=self.rank == 0)
        self.logger = logger or Logger(log_dir, enabled=self.rank == 0)
        self.logger.drop_rows_after(self.step)
        dist_util.sync_params(self.model.parameters())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        self.grad_scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0**INITIAL_LG_LOSS_SCALE,
                                                enabled=precision == "fp16")
        self._pending_rng_state = None
        if resume:
            self._load_resume_point(resume)
        self.ddp_model = self.model
        if self.world_size > 1:
            self.ddp_model = DDP(self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                 bucket_cap_mb=128)

    def _load_resume_point(self, resume):
        """Optimizer (with the flag's --lr), and from a state file the loss scale, data positions and random states."""
        self.logger.info(f"resuming from {resume.source} at step {resume.step}")
        if resume.optimizer is not None:
            self.opt.load_state_dict(resume.optimizer)
            self.opt.param_groups[0]["lr"] = self.lr  # one group
        state = resume.state or {}
        if state.get("grad_scaler") and self.precision == "fp16":
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        if not state:
            return
        if len(state["rng"]) != self.world_size:
            self.logger.info(f"warning: {resume.source} was saved by {len(state['rng'])} ranks, this run has "
                             f"{self.world_size}: random streams and data order start afresh")
            return
        for name, data in (("train", self.data), ("val", self.val_data)):
            if data is not None and state["data"].get(name):
                data.load_state_dict(state["data"][name])
        self._pending_rng_state = state["rng"][self.rank]

    # ------------------------------------------------------------------------------------------------------------

    def run_loop(self):
        """Train up to step `iterations`: validation, log rows, checkpoints (and the last step's), stop signals.

        :raises preemption.Stopped: after the checkpoint of the step a stop signal interrupted.
        """
        self.logger.info(f"training the classifier from step {self.step} to {self.iterations}: {self.world_size} "
                         f"rank(s) x batch {self.batch_size} (microbatch {self.microbatch}), {self.precision}")
        decisions = preemption.StepDecisions(self.device, self.rank, self.world_size, self.save_interval_minutes)
        request = preemption.StopRequest()
        bar = tqdm(total=self.iterations, initial=self.step, unit="step", disable=self.rank != 0 or not self.progress)
        with bar, preemption.signal_handlers(request.handle):
            while self.step < self.iterations:
                batch, cond = next(self.data)
                self.run_step(batch, cond["y"])
                bar.update(1)
                if self.val_data is not None and self.step % self.eval_interval == 0:
                    self.validate()
                stop_signal, save_now = decisions.after_step(request.signum)
                stop_signal = 0 if self.step == self.iterations else stop_signal
                if stop_signal or self.step % self.log_interval == 0 or self.step in (1, self.iterations):
                    self.log_step()
                if stop_signal or save_now or self.step % self.save_interval == 0 or self.step == self.iterations:
                    self.save()
                    decisions.saved()
                if stop_signal:
                    raise preemption.Stopped(stop_signal, self.step, self.log_dir)

    def run_step(self, batch, labels):
        """One optimizer step on this rank's batch."""
        if self._pending_rng_state is not None:
            checkpoint.restore_rng_state(self._pending_rng_state)
            self._pending_rng_state = None
        if self.anneal_lr:
            for group in self.opt.param_groups:
                group["lr"] = self.lr * (1.0 - self.step / self.iterations)
        self.opt.zero_grad(set_to_none=True)
        self._forward(batch, labels, "train", backward=True)
        self.grad_scaler.step(self.opt)
        self.grad_scaler.update()
        self.step += 1

    @torch.no_grad()
    def validate(self):
        """Score one batch of the validation set (its rows go into the next log row with the prefix val).

        Its t and noise come from the global generators seeded by (step, rank), which are then restored: validating
        (or starting the validation loader, which draws a seed, for the first time after a resume) changes no
        training draw, so a resumed run validates and trains exactly as an uninterrupted one.
        """
        rng_state = checkpoint.capture_rng_state()
        self.model.eval()
        try:
            batch, cond = next(self.val_data)
            torch.manual_seed(int(np.random.SeedSequence([self.step, self.rank]).generate_state(1)[0]))
            self._forward(batch, cond["y"], "val", backward=False)
        finally:
            self.model.train()
            checkpoint.restore_rng_state(rng_state)

    def _forward(self, batch, labels, prefix, backward):
        batch, labels = batch.to(self.device), labels.to(self.device)
        if self.noised:
            t, _ = self.schedule_sampler.sample(batch.shape[0], self.device)
            batch = self.diffusion.q_sample(batch, t)
        else:
            t = torch.zeros(batch.shape[0], dtype=torch.long, device=self.device)
        network = self.ddp_model if backward else self.model
        for start in range(0, batch.shape[0], self.microbatch):
            part = slice(start, start + self.microbatch)
            with autocast_for(self.precision, self.device.type):
                logits = network(batch[part], classifier_timesteps(self.diffusion, t[part]))
            loss = F.cross_entropy(logits.float(), labels[part], reduction="none")
            self.stats.add(prefix, t[part], loss, logits, labels[part])
            if backward:
                last = start + self.microbatch >= batch.shape[0]
                no_sync = self.ddp_model.no_sync() if self.ddp_model is not self.model and not last else None
                with no_sync or contextlib.nullcontext():
                    self.grad_scaler.scale(loss.mean() * (len(loss) / batch.shape[0])).backward()

    def log_step(self):
        """Write the interval's means as one progress.csv row; returns it."""
        means = self.stats.pop_means()
        if self.precision != "fp16" and not all(map(math.isfinite, means.values())):
            raise FloatingPointError(f"the classifier's loss became inf/NaN before step {self.step} ({self.precision});"
                                     " train again with a lower --lr (checkpoints so far are in the log dir)")
        row = {"step": self.step, "samples": self.step * self.batch_size * self.world_size, **means}
        self.logger.write_scalars(row, self.step)
        return row

    def save(self):
        """Write the checkpoint of the current step (rank 0 writes; every rank contributes its random state)."""
        rng = [checkpoint.capture_rng_state()]
        if self.world_size > 1:
            rng = [None] * self.world_size
            dist.all_gather_object(rng, checkpoint.capture_rng_state())
        if self.rank == 0:
            data = {name: source.state_dict() for name, source in (("train", self.data), ("val", self.val_data))
                    if hasattr(source, "state_dict")}
            state = checkpoint.training_state(
                step=self.step, model={k: v.detach().cpu() for k, v in self.model.state_dict().items()}, ema={},
                optimizer=self.opt.state_dict(), grad_scaler=self.grad_scaler.state_dict(), schedule_sampler={},
                rng=rng, data=data, config=self.config,
            )
            checkpoint.save_checkpoint(self.log_dir, state)
            deleted = checkpoint.prune_checkpoints(self.log_dir, self.keep_checkpoints)
            self.logger.info(f"saved checkpoint {self.step} in {self.log_dir}"
                             + (f"; deleted step(s) {', '.join(map(str, deleted))}" if deleted else ""))
        dist_util.barrier()


def classifier_timesteps(diffusion, t):
    """The timesteps the classifier is given for the diffusion's t, as sampling gives them (× 1000/T with
    --rescale_timesteps)."""
    return t.float() * (1000.0 / diffusion.num_timesteps) if diffusion.rescale_timesteps else t


class ClassifierStats:
    """Per-sample loss and top-k accuracy of one log interval, per prefix ("train", "val"), overall and by t quartile.

    Kept on the device until `pop_means`, which copies them to the host once.
    """

    def __init__(self, num_timesteps):
        self.num_timesteps = num_timesteps
        self.records = {}

    def add(self, prefix, t, loss, logits, labels):
        """t, loss, labels [N]; logits [N, K]."""
        top = logits.detach().topk(min(max(TOP_K), logits.shape[1]), dim=1).indices == labels[:, None]
        columns = [loss.detach().float()] + [top[:, :k].any(dim=1).float() for k in TOP_K]
        quartile = (4 * t // self.num_timesteps).float()
        self.records.setdefault(prefix, []).append(torch.stack([quartile, *columns], dim=1))

    def pop_means(self):
        """{f"{prefix}_{loss|acc@1|acc@5}[_qN]": mean} over the interval's samples; then start afresh."""
        means = {}
        for prefix, records in self.records.items():
            table = torch.cat(records).cpu()
            names = ["loss"] + [f"acc@{k}" for k in TOP_K]
            for j, name in enumerate(names, start=1):
                means[f"{prefix}_{name}"] = table[:, j].mean().item()
            for quartile in range(4):
                rows = table[table[:, 0] == quartile]
                for j, name in enumerate(names, start=1):
                    if len(rows):
                        means[f"{prefix}_{name}_q{quartile}"] = rows[:, j].mean().item()
        self.records = {}
        return means
