"""Sample generation shared by scripts/image_sample.py and in-training evaluation (docs/compatibility.md,
"Samplers" and "Sample files").

Reproducibility: sample i is drawn from its own torch.Generator seeded from (seed, i), so its class
label, x_T and every step's noise depend only on `seed` and `i` (and the device type, whose random
streams differ), never on the batch size or the number of ranks. Ranks split the same list of batches,
so runs on any number of ranks with the same batch size compute the same batches and give bit-identical
samples, given the same kernels (device type, and on a CPU the same number of threads per process).
Across batch sizes (or thread counts) the network itself is not bitwise invariant: kernels pick other
algorithms and reduction orders (e.g. a GEMV for a batch of one), so a rare pixel whose value lies
within ~1e-6 of a quantisation step moves by one level; the noise is identical.

Quantiser (one for every output; docs/compatibility.md, "Sample files"): uint8 of clamp((x + 1) * 127.5,
0, 255), where the cast truncates, exactly as the reference npz. The PNGs hold the same uint8 pixels, so
the npz and the PNG folder agree bit for bit (the reference's PNGs rounded instead).

Sample folder (resumable; the PNGs are the record of finished work):
    run.json                       arguments that determine the samples; a rerun must match them
    images/000000.png ...          one PNG per sample, named by global index, written atomically;
                                   class-conditional samples carry their label as PNG text "class_label"
    samples_{N}x{H}x{W}x3.npz      arr_0 uint8 [N, H, W, 3] (+ arr_1 int64 [N] labels), written by rank 0
    grid.png                       the first 64 samples, 8 per row
A rerun with the same arguments skips every index whose PNG exists, so an interrupted run (Ctrl-C,
SIGKILL, preemption) loses at most the batches in flight. `num_samples` may grow between runs (the
first samples are unchanged), never shrink. The folder must be on a filesystem every rank sees.
"""

import json
import math
import os
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from . import fileio, ode_samplers
from .fileio import atomic_write
from .precision import PRECISIONS, network_at_precision, sampling_autograd_mode
from .script_util import NUM_CLASSES

GRID_SAMPLES = 64
GRID_COLUMNS = 8
GRID_PADDING_PX = 2
LABEL_PNG_KEY = "class_label"
RUN_FILE = "run.json"
IMAGES_DIR = "images"
_PNG_NAME = re.compile(r"^(\d+)\.png$")


class SamplingArgumentError(ValueError):
    """A sampling request that cannot be served as given (bad count, or a folder made with other arguments)."""


@dataclass(frozen=True)
class SamplingOptions:
    """What determines a sample besides the network, the diffusion and its global index."""

    image_size: int              # pixels per side
    class_cond: bool = False     # draw a label per sample (uniform over 0..num_classes-1) and pass it as y
    num_classes: int = NUM_CLASSES  # label_emb rows of the model (the checkpoint's, in image_sample.py)
    use_ddim: bool = False       # DDIM over the respaced steps instead of ancestral sampling
    ddim_eta: float = 0.0        # η of DDIM; 0 = deterministic after x_T
    clip_denoised: bool = True   # clamp x̂₀ to [-1, 1] at each step
    precision: str = "fp32"      # network precision: fp32, or bf16 / fp16 autocast
    seed: int = 0                # base seed; sample i uses the generator seeded from (seed, i)
    sampler: str = ""            # "" = ancestral or DDIM (use_ddim) over the respaced steps, else ode_samplers.SAMPLERS
    steps: int = 0               # noise levels of an ode_samplers sampler (0 with "")
    step_schedule: str = ""      # their placement: ode_samplers.STEP_SCHEDULES; "" = the sampler's default
    heun_churn: ode_samplers.HeunChurn = ode_samplers.NO_CHURN  # EDM Algorithm 2's churn of heun (none by default)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise SamplingArgumentError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.seed < 0:
            raise SamplingArgumentError(f"--seed {self.seed} must be >= 0")
        if self.ddim_eta < 0:
            raise SamplingArgumentError(f"--ddim_eta {self.ddim_eta} must be >= 0")
        if self.sampler:
            ode_samplers.network_evaluations(self.sampler, self.steps)  # checks the name
            if self.steps < 1 or self.use_ddim:
                raise SamplingArgumentError(f"--sampler {self.sampler} needs --steps >= 1 and no --use_ddim")
        if self.heun_churn.churn and self.sampler != "heun":
            raise SamplingArgumentError(f"--heun_churn {self.heun_churn.churn:g} needs --sampler heun")

    def identity(self):
        """The options as they determine the pixels; the few-step fields only when such a sampler runs and the churn
        only when non-zero, so folders made before these options existed keep the identity they always had."""
        fields = asdict(self)
        if not self.sampler:
            for key in ("sampler", "steps", "step_schedule"):
                del fields[key]
        if self.heun_churn.churn:
            fields["heun_churn"] = self.heun_churn.identity()
        else:
            del fields["heun_churn"]
        return fields

    def network_evaluations(self, diffusion):
        """Network calls per sample: one per respaced step of `diffusion`, or the few-step sampler's count."""
        if self.sampler:
            return ode_samplers.network_evaluations(self.sampler, self.steps)
        return diffusion.num_timesteps


def sample_seed(seed, index):
    """63-bit seed of sample `index`'s generator, well mixed from (seed, index) by numpy's SeedSequence."""
    low, high = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return (int(high) << 31) ^ int(low)


class PerSampleGenerator:
    """A batch of independent random streams: row k of every draw comes from sample indices[k]'s generator."""

    def __init__(self, seed, indices, device):
        self.generators = [
            torch.Generator(device=device).manual_seed(sample_seed(seed, int(i))) for i in indices
        ]
        self.device = torch.device(device)

    def randn(self, shape):
        """Standard normal noise [len(indices), *shape[1:]], float32, on the generators' device."""
        self._check_rows(shape[0])
        return torch.stack(
            [torch.randn(tuple(shape[1:]), generator=g, device=self.device) for g in self.generators]
        )

    def randn_like(self, x):
        return self.randn(x.shape).to(x.dtype)

    def randint(self, low, high):
        """One integer per sample, uniform over [low, high), int64 [len(indices)]."""
        return torch.cat(
            [torch.randint(low, high, (1,), generator=g, device=self.device) for g in self.generators]
        )

    def _check_rows(self, rows):
        if rows != len(self.generators):
            raise ValueError(f"asked for {rows} rows of noise from {len(self.generators)} per-sample generators")


def quantize_to_uint8(images):
    """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C] via clamp((x + 1) * 127.5, 0, 255), truncated ("Sample files")."""
    return ((images + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@sampling_autograd_mode()
def generate_batch(model, diffusion, indices, options, device, cond_fn=None, conditioning=None):
    """Generate the samples with global indices `indices` (docs/compatibility.md, "Samplers"; per-sample noise).

    :param model: the U-Net, in eval mode, on `device`.
    :param diffusion: a (respaced) GaussianDiffusion; ancestral or DDIM over its steps, or the noise levels of an
        ode_samplers sampler (options.sampler).
    :param indices: global sample indices, one per row of the batch.
    :param options: SamplingOptions.
    :param cond_fn: classifier guidance for the ancestral and DDIM samplers (classifier_guidance.classifier_cond_fn);
        it gets the labels y, so options.class_cond must be set.
    :param conditioning: None, or callable(indices) -> dict of model kwargs [B, ...] given to those samples (a
        super-resolution model's low_res); labels it gives as "y" replace the drawn ones.
    :return: (images uint8 numpy [B, H, W, 3], labels int64 numpy [B] or None).
    """
    if cond_fn is not None and (options.sampler or not options.class_cond):
        raise SamplingArgumentError(
            "classifier guidance runs with the ancestral and DDIM samplers on labelled samples"
            + (f", not with --sampler {options.sampler}" if options.sampler else "")
        )
    generator = PerSampleGenerator(options.seed, indices, device)
    model_kwargs = {}
    if options.class_cond:
        # Drawn first from each sample's stream, so a label can be known without running the network.
        model_kwargs["y"] = generator.randint(0, options.num_classes)
    if conditioning is not None:
        model_kwargs.update({k: v.to(device) for k, v in conditioning(indices).items()})
    shape = (len(indices), 3, options.image_size, options.image_size)
    loop_kwargs = dict(
        noise=generator.randn(shape),
        clip_denoised=options.clip_denoised,
        model_kwargs=model_kwargs,
        device=device,
        noise_fn=generator.randn_like,
    )
    network = network_at_precision(model, options.precision, device)
    if options.sampler:
        samples = ode_samplers.sample_loop(
            network, diffusion, options.sampler, options.steps, loop_kwargs["noise"],
            step_schedule=options.step_schedule or None, clip_denoised=options.clip_denoised,
            model_kwargs=model_kwargs, noise_fn=generator.randn_like, heun_churn=options.heun_churn,
        )
    elif options.use_ddim:
        samples = diffusion.ddim_sample_loop(network, shape, eta=options.ddim_eta, cond_fn=cond_fn, **loop_kwargs)
    else:
        samples = diffusion.p_sample_loop(network, shape, cond_fn=cond_fn, **loop_kwargs)
    labels = model_kwargs["y"].cpu().numpy() if options.class_cond else None
    return quantize_to_uint8(samples).cpu().numpy(), labels


def write_png(path, image, label=None):
    """Write uint8 [H, W, 3] losslessly; `label` (int) goes into the PNG text chunk "class_label"."""
    info = PngImagePlugin.PngInfo()
    if label is not None:
        info.add_text(LABEL_PNG_KEY, str(int(label)))
    atomic_write(path, lambda f: Image.fromarray(image, mode="RGB").save(f, format="PNG", pnginfo=info))


def read_png(path):
    """-> (uint8 [H, W, 3], label int or None) as written by write_png."""
    with Image.open(path) as im:
        label = im.text.get(LABEL_PNG_KEY)
        return np.asarray(im.convert("RGB")), (None if label is None else int(label))


def image_grid(images, columns=GRID_COLUMNS, padding_px=GRID_PADDING_PX):
    """uint8 [N, H, W, 3] -> one uint8 image with `columns` per row, black `padding_px` borders."""
    count, height, width, channels = images.shape
    rows = math.ceil(count / columns)
    columns = min(columns, count)
    grid = np.zeros(
        (rows * (height + padding_px) + padding_px, columns * (width + padding_px) + padding_px, channels),
        dtype=np.uint8,
    )
    for k, image in enumerate(images):
        top = padding_px + (k // columns) * (height + padding_px)
        left = padding_px + (k % columns) * (width + padding_px)
        grid[top : top + height, left : left + width] = image
    return grid


def npz_name(num_samples, image_size):
    return f"samples_{num_samples}x{image_size}x{image_size}x3.npz"


def plan_batches(missing_indices, batch_size, world_size):
    """Cut the sorted missing indices into batches; rank r takes batches r, r + world, r + 2·world, ...

    :return: list of rounds; round k lists every rank's batch (numpy int64 arrays) of that round, so
        a rank knows both its own batch (round[rank], absent in a short last round) and the round's size.
        There are exactly ⌈len(missing) / batch_size⌉ batches: the reference's loop never
        advanced its batch counter (docs/compatibility.md, "Reference defects fixed here").
    """
    missing = np.asarray(sorted(missing_indices), dtype=np.int64)
    batches = [missing[k : k + batch_size] for k in range(0, len(missing), batch_size)]
    return [batches[k : k + world_size] for k in range(0, len(batches), world_size)]


class SampleFolder:
    """The files of one sampling run (layout in the module docstring) and its resume bookkeeping."""

    def __init__(self, path):
        self.path = path
        self.images_dir = os.path.join(path, IMAGES_DIR)
        self.run_file = os.path.join(path, RUN_FILE)
        self.grid_path = os.path.join(path, "grid.png")

    def png_path(self, index):
        return os.path.join(self.images_dir, f"{index:06d}.png")

    def npz_path(self, num_samples, image_size):
        return os.path.join(self.path, npz_name(num_samples, image_size))

    def check_run(self, identity, num_samples):
        """Refuse a folder written with other sample-determining arguments or with more samples.

        :param identity: JSON-serialisable dict of everything that determines sample i's pixels.
        """
        if not os.path.exists(self.run_file):
            return
        with open(self.run_file) as f:
            stored = json.load(f)
        changed = sorted(
            key
            for key in set(identity) | set(stored["identity"])
            if identity.get(key) != stored["identity"].get(key)
        )
        if changed:
            details = "; ".join(
                f"{key}: folder has {stored['identity'].get(key)!r}, now {identity.get(key)!r}" for key in changed
            )
            raise SamplingArgumentError(
                f"sample folder {self.path!r} holds samples made with other arguments ({details}); "
                "rerun with the folder's arguments to resume, or pass a fresh --sample_dir"
            )
        if num_samples < stored["num_samples"]:
            raise SamplingArgumentError(
                f"sample folder {self.path!r} was started with --num_samples {stored['num_samples']}; "
                f"--num_samples {num_samples} would leave extra PNGs in {self.images_dir!r}. "
                "Use at least that many, or a fresh --sample_dir"
            )

    def record_run(self, identity, num_samples, **details):
        """Write run.json: the identity, the sample count and `details` (e.g. network evaluations per sample)."""
        os.makedirs(self.images_dir, exist_ok=True)
        fileio.write_text(self.run_file, json.dumps({"identity": identity, "num_samples": num_samples, **details},
                                                    indent=2, sort_keys=True))

    def finished_indices(self):
        """Global indices whose PNG exists (PNGs are written atomically, so each is complete)."""
        if not os.path.isdir(self.images_dir):
            return set()
        return {int(m.group(1)) for m in map(_PNG_NAME.match, os.listdir(self.images_dir)) if m}

    def remove_stale_temporaries(self):
        """Delete temporary files of writes a killed run left (hidden, see atomic_write); before any rank writes."""
        for directory in (self.path, self.images_dir):
            fileio.remove_temporaries(directory)

    def write_batch(self, indices, images, labels):
        for k, index in enumerate(indices):
            write_png(self.png_path(int(index)), images[k], None if labels is None else labels[k])

    def assemble(self, num_samples, image_size, class_cond):
        """Read PNGs 0..num_samples-1 and write the npz and grid.png. :return: the npz path."""
        missing = sorted(set(range(num_samples)) - self.finished_indices())
        if missing:
            raise RuntimeError(
                f"{len(missing)} sample(s) are missing from {self.images_dir!r} (first: {missing[:5]}); "
                "rerun the same command to generate them"
            )
        images = np.empty((num_samples, image_size, image_size, 3), dtype=np.uint8)
        labels = np.empty((num_samples,), dtype=np.int64)
        for index in range(num_samples):
            image, label = read_png(self.png_path(index))
            if image.shape != images.shape[1:]:
                raise ValueError(f"{self.png_path(index)!r} is {image.shape}, expected {images.shape[1:]}")
            images[index] = image
            if class_cond:
                if label is None:
                    raise ValueError(f"{self.png_path(index)!r} has no {LABEL_PNG_KEY!r}; the run is class-conditional")
                labels[index] = label
        arrays = [images, labels] if class_cond else [images]
        npz_path = self.npz_path(num_samples, image_size)
        atomic_write(npz_path, lambda f: np.savez(f, *arrays))
        grid = image_grid(images[:GRID_SAMPLES])
        atomic_write(self.grid_path, lambda f: Image.fromarray(grid, mode="RGB").save(f, format="PNG"))
        return npz_path


@dataclass
class SamplingResult:
    npz_path: str
    images_dir: str
    grid_path: str
    num_samples: int
    num_generated: int           # samples made by this run (all ranks); the rest were already on disk
    steps_per_sample: int        # respaced steps, or the noise levels of a few-step sampler
    evaluations_per_sample: int  # network evaluations per sample (Heun: two per step except the last)

    @property
    def network_evaluations(self):
        return self.num_generated * self.evaluations_per_sample


def sample_to_folder(
    model,
    diffusion,
    options,
    num_samples,
    batch_size,
    sample_dir,
    identity,
    device,
    rank=0,
    world_size=1,
    barrier=lambda: None,
    cond_fn=None,
    conditioning=None,
):
    """Generate samples 0..num_samples-1 into `sample_dir`, resuming what is there; rank 0 writes the npz.

    Every rank calls this with the same arguments. `identity` (JSON-serialisable) is everything
    besides `options` that determines the pixels (checkpoint fingerprint, model and diffusion flags, the
    classifier's and its scale with `cond_fn`, and what `conditioning` gives; both are passed on to generate_batch).
    :return: SamplingResult (paths on every rank; the npz exists once this returns).
    """
    if num_samples < 1:
        raise SamplingArgumentError(f"--num_samples {num_samples} must be >= 1")
    if batch_size < 1:
        raise SamplingArgumentError(f"--batch_size {batch_size} must be >= 1")
    folder = SampleFolder(sample_dir)
    identity = {**identity, **options.identity(), "device_type": torch.device(device).type}
    folder.check_run(identity, num_samples)
    if rank == 0:
        folder.remove_stale_temporaries()
    missing = set(range(num_samples)) - folder.finished_indices()
    # Every rank must plan from the same listing, before any rank writes.
    barrier()
    if rank == 0:
        folder.record_run(identity, num_samples,
                          network_evaluations_per_sample=options.network_evaluations(diffusion))
    barrier()
    rounds = plan_batches(missing, batch_size, world_size)
    with tqdm(
        total=num_samples,
        initial=num_samples - len(missing),
        unit="img",
        desc="sampling",
        disable=(rank != 0),
        dynamic_ncols=True,
    ) as bar:
        for batches in rounds:
            if rank < len(batches):
                images, labels = generate_batch(model, diffusion, batches[rank], options, device, cond_fn, conditioning)
                folder.write_batch(batches[rank], images, labels)
            bar.update(sum(len(b) for b in batches))
    barrier()
    npz_path = folder.npz_path(num_samples, options.image_size)
    # A finished folder is left as it is: rerunning a completed command costs nothing.
    already_assembled = os.path.exists(npz_path) and os.path.exists(folder.grid_path)
    if rank == 0 and (missing or not already_assembled):
        folder.assemble(num_samples, options.image_size, options.class_cond)
    barrier()
    return SamplingResult(
        npz_path=npz_path,
        images_dir=folder.images_dir,
        grid_path=folder.grid_path,
        num_samples=num_samples,
        num_generated=len(missing),
        steps_per_sample=options.steps or diffusion.num_timesteps,
        evaluations_per_sample=options.network_evaluations(diffusion),
    )
