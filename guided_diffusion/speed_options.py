"""Speed options of the U-Net — memory layout, folded upsample convs, torch.compile — and choosing them per CPU.

Two options change which conv kernels run, and whether they pay depends on the CPU family's kernels (oneDNN picks
other algorithms on other instruction sets): NHWC memory order (`channels_last`) and nearest ×2 upsampling folded
into the following 3×3 conv as one stride-2 transposed conv (`fold_upsample`, fused.upsample_conv3x3). NHWC
measured faster than NCHW on an Intel Xeon and at parity on an AMD EPYC; the fold pays on large inputs and not on
small ones, from a size that depends on the CPU. So on a CPU, "auto" times the plain and the rewritten form once
on the model's real shapes (the whole U-Net for the layout, each upsampling layer for the fold), keeps the plain
form unless the other is clearly faster, and logs the choice. The timings are cached per (CPU model, torch
version, threads, shapes) in $XDG_CACHE_HOME/p2-diffusion/speed_options.json (default ~/.cache/...), so that
later runs on the machine — a resumed training run above all — make the same choice (delete the file to measure
again). On other devices "auto" means NCHW with the fold on. Every choice computes the same maths up to float
rounding.
"""

import argparse
import hashlib
import json
import os
import platform
import time

import torch
import torch.distributed as dist

from .script_util import str2bool
from .super_res import SuperResModel
from .unet import upsampling_layers

# A rewritten form replaces the plain one only when it takes at most this share of the plain form's time: a
# margin against timing noise, so that at parity the run keeps the reference's computation.
SWITCH_BELOW = 0.95
# Timed calls per form, alternating between the forms so that load changes on a shared machine hit both alike;
# each after an untimed call in the same form.
ROUNDS = 3

_decisions = {}  # cache key -> [seconds with the rewritten form (NHWC, fold), seconds with the plain form]


def parse_speed_flag(value, flag):
    """True, False or "auto" from a flag value: a bool, "auto" or any str2bool spelling (a ValueError naming `flag`
    otherwise)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return str2bool(value)
    except (argparse.ArgumentTypeError, AttributeError):
        raise ValueError(f"{flag} must be auto, true or false; got {value!r}") from None


def wall_clock(what, choice, run):
    """Seconds one call of run() takes: the default timer (`what` and `choice` name the form, for other timers)."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def apply_speed_options(
    model,
    compile=False,
    channels_last=False,
    fold_upsample=True,
    *,
    device=None,
    batch_size=1,
    training=False,
    timer=wall_clock,
    log=print,
):
    """Set `model`'s speed options in place; parameters, state_dict keys and (within float rounding) outputs stay.

    :param compile: compile the forward pass with torch.compile (Module.compile, so that state_dict keys and
        checkpoints stay unprefixed); the first call of each input shape and autograd mode compiles.
    :param channels_last: True, False or "auto" (or a flag string): store the 4-D weights in NHWC order, so that
        convolutions run their NHWC kernels and hand NHWC activations on (tensors keep their [N, C, H, W] shape).
    :param fold_upsample: True, False or "auto": fold the nearest ×2 upsampling into the following conv in every
        upsampling layer ("auto" decides per layer shape).
    :param device: where the model will run (default: where its parameters are); "auto" measures on a CPU only.
    :param batch_size: images per forward pass, the workload "auto" times.
    :param training: time forward and backward passes (training) or inference-mode forward passes (sampling).
    :param timer: timer(what, choice, run) -> seconds of one call of run(); tests inject a fake one.
    :param log: called with one line per choice "auto" makes (measured or from the cache), with its timings.
    :return: `model`.
    """
    channels_last = parse_speed_flag(channels_last, "--channels_last")
    fold_upsample = parse_speed_flag(fold_upsample, "fold_upsample")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if device.type != "cpu":
        # Not measured on these devices: the layout the reference uses, and the fold's 4/9 of the multiply-adds.
        channels_last = False if channels_last == "auto" else channels_last
        fold_upsample = True if fold_upsample == "auto" else fold_upsample
    measure = _Measurement(model, batch_size, training, timer, log)
    if "auto" in (channels_last, fold_upsample):
        # Every rank must use the same layout (DDP pairs gradient elements by memory position): rank 0 decides.
        channels_last, folds = _on_rank_zero(lambda: measure.choose(channels_last, fold_upsample))
    else:
        folds = dict.fromkeys(upsampling_layers(model), fold_upsample)
    _set_layout(model, channels_last)
    for name, layer in upsampling_layers(model).items():
        layer.fold_upsample = folds[name]
    if compile:
        model.compile()
    return model


def applied_speed_options(model):
    """What `apply_speed_options` left on `model`, read from the model itself (so a report cannot claim a setting that
    was not applied): {"channels_last": every 4-D weight in NHWC order, "folded_upsamples": [names of the upsampling
    layers with the fold on], "upsampling_layers": how many there are, "compiled": the forward is compiled}."""
    weights = [p for p in model.parameters() if p.dim() == 4]
    layers = upsampling_layers(model)
    return dict(
        channels_last=bool(weights) and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights),
        folded_upsamples=[name for name, layer in layers.items() if layer.fold_upsample],
        upsampling_layers=len(layers),
        compiled=getattr(model, "_compiled_call_impl", None) is not None,
    )


def _set_layout(model, channels_last):
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _on_rank_zero(choose):
    """choose() on rank 0, its result broadcast to the other ranks of an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return choose()
    holder = [choose() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _cache_path():
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "p2-diffusion", "speed_options.json")


def _read_cache():
    try:
        with open(_cache_path()) as f:
            stored = json.load(f)
        return stored if isinstance(stored, dict) else {}
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measure again


def _remember(key, seconds):
    """Keep a measurement for this process and, if the cache file is writable, for later ones."""
    _decisions[key] = seconds
    path = _cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w") as f:
            json.dump({**_read_cache(), key: seconds}, f, indent=1)
        os.replace(temporary, path)  # atomic: a reader never sees half a file
    except OSError:
        pass


def _cpu_name():
    """The CPU model string (e.g. "AMD EPYC 7B13"), part of the cache key."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _Measurement:
    """The "auto" choices for one model and workload, by timing each form on the model's real shapes."""

    def __init__(self, model, batch_size, training, timer, log):
        self.model, self.batch_size, self.training, self.timer, self.log = model, batch_size, training, timer, log
        self.workload = f"{'training' if training else 'sampling'}, batch {batch_size}"

    def choose(self, channels_last, fold_upsample):
        """(channels_last, {layer name: fold_upsample}) with each "auto" replaced by the measured choice."""
        # Dropout in the timed passes must not move the run's random stream.
        layers = upsampling_layers(self.model)
        with torch.random.fork_rng(devices=[]):
            if fold_upsample != "auto":
                for layer in layers.values():
                    layer.fold_upsample = fold_upsample
            if channels_last == "auto":
                channels_last = self._choose_layout()
            _set_layout(self.model, channels_last)
            folds = self._choose_folds(layers) if fold_upsample == "auto" else dict.fromkeys(layers, fold_upsample)
        self.model.zero_grad(set_to_none=True)
        return channels_last, folds

    def _choose_layout(self):
        model, n = self.model, self.batch_size
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(n, _image_channels(model), model.image_size, model.image_size, generator=generator)
        t = torch.randint(0, 1000, (n,), generator=generator)
        kwargs = _conditioning(model, n)
        shapes = tuple(tuple(p.shape) for p in model.parameters())
        key = ("channels_last", self.training, tuple(x.shape), shapes)
        step = self._step(lambda: model(x, t, **kwargs))
        return self._faster("channels_last", key, lambda on: _set_layout(model, on), step, "the U-Net")

    def _choose_folds(self, layers):
        inputs = self._layer_inputs(layers)
        folds = {}
        for name, layer in layers.items():
            args = inputs[name]
            layout = "NHWC" if args[0].is_contiguous(memory_format=torch.channels_last) else "NCHW"
            key = ("fold_upsample", type(layer).__name__, self.training, layout, *(tuple(a.shape) for a in args))
            step = self._step(lambda layer=layer, args=args: layer(*args))

            def use(on, layer=layer):
                layer.fold_upsample = on

            folds[name] = self._faster("fold_upsample", key, use, step, f"{name} ({layout})")
        return folds

    def _layer_inputs(self, layers):
        """{name: the inputs (x[, emb]) each layer gets in one forward pass of the model at the real shapes}."""
        model, n = self.model, self.batch_size
        inputs = {}
        hooks = [
            layer.register_forward_pre_hook(
                lambda _, args, name=name: inputs.setdefault(name, tuple(a.detach().clone() for a in args))
            )
            for name, layer in layers.items()
        ]
        x = torch.zeros(n, _image_channels(model), model.image_size, model.image_size)
        try:
            with torch.no_grad():
                model(x, torch.zeros(n, dtype=torch.long), **_conditioning(model, n))
        finally:
            for hook in hooks:
                hook.remove()
        if self.training:
            inputs = {name: (args[0].requires_grad_(), *args[1:]) for name, args in inputs.items()}
        return inputs

    def _step(self, forward):
        """A callable running forward() as training (with a backward pass) or sampling (inference mode) does."""
        if self.training:

            def train():
                self.model.zero_grad(set_to_none=True)  # as each training step starts
                forward().float().square().mean().backward()

            return train

        def sample():
            with torch.inference_mode():
                forward()

        return sample

    def _faster(self, what, key, use, step, where):
        """Whether step() runs faster after use(True) (the rewritten form) than after use(False) (the plain form),
        by the SWITCH_BELOW margin; measured once per cache key, logged every time."""
        cpu = _cpu_name()
        key = hashlib.sha256(json.dumps([cpu, torch.__version__, torch.get_num_threads(), *key]).encode()).hexdigest()
        if key not in _decisions:
            _decisions.update(_read_cache())
        if key not in _decisions:
            times = {False: [], True: []}
            for _ in range(ROUNDS):
                for choice, measured in times.items():
                    use(choice)
                    # Untimed: the first steps after a switch of layout run several times slower (kernel choice,
                    # weight reorders, allocations).
                    step()
                    measured.append(self.timer(what, choice, step))
            _remember(key, [min(times[True]), min(times[False])])
        with_it, without = _decisions[key]
        chosen = with_it <= SWITCH_BELOW * without
        self.log(
            f"speed options: {what} {'on' if chosen else 'off'} for {where} ({self.workload}) on {cpu}: "
            f"{with_it * 1e3:.1f} ms with it, {without * 1e3:.1f} ms without"
        )
        return chosen


def _image_channels(model):
    """Channels of the x a forward pass takes (a SuperResModel's in_channels also count its low-resolution input)."""
    return model.in_channels // 2 if isinstance(model, SuperResModel) else model.in_channels


def _conditioning(model, n):
    """The model kwargs of a timing pass: class 0 for a class-conditional model, and a SuperResModel's low_res
    (a quarter of the size; its upsampling costs little beside the U-Net)."""
    kwargs = {"y": torch.zeros(n, dtype=torch.long)} if model.num_classes is not None else {}
    if isinstance(model, SuperResModel):
        size = max(1, model.image_size // 4)
        kwargs["low_res"] = torch.zeros(n, _image_channels(model), size, size)
    return kwargs
