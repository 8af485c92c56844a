"""Bits per dimension of dataset images under a diffusion model (scripts/image_nll.py), resumable on any ranks.

Each image's bound is GaussianDiffusion.calc_bpd_loop's: the prior term plus one variational term per (respaced)
timestep, in bits per dimension. Image k draws the noise of every timestep from the generator of (seed, k)
(sampling.PerSampleGenerator), so its numbers depend neither on the batch size nor on the number of ranks.

Output folder (resumable; the part files are the record of finished work):
    run.json                        what determines the numbers (checkpoint, flags, images, seed); a rerun must match
    parts/bpd_<first>_<count>.npz   one per evaluated batch: index [B], total_bpd [B], prior_bpd [B] and the terms
                                    vb, mse, xstart_mse [B, T], written atomically
    vb_terms.npz, mse_terms.npz, xstart_mse_terms.npz
                                    the reference's files: arr_0 float32 [T], the term's mean over the images, column
                                    j for timestep T-1-j as calc_bpd_loop returns them
    bpd.npz                         index, total_bpd, prior_bpd [N] per image, in index order
    nll.json                        the summary: mean bits/dim, its standard error, the prior's share, the files
A rerun with the same arguments evaluates only the images without a part file, so an interrupted run loses at most
the batches in flight; --num_samples may grow between runs, never shrink. Rank 0 writes the summary files.
"""

import json
import math
import os
import re

import numpy as np
import torch
from tqdm.auto import tqdm

from . import fileio
from .analysis import to_model_range
from .fileio import atomic_write, write_json
from .sampling import PerSampleGenerator, plan_batches

TERMS = ("vb", "mse", "xstart_mse")  # calc_bpd_loop's per-timestep terms, in the reference's file names
PER_IMAGE = ("total_bpd", "prior_bpd")
SUMMARY_FILE = "nll.json"
_PART_NAME = re.compile(r"^bpd_\d+_\d+\.npz$")


def image_bpd(model, diffusion, images, indices, seed, clip_denoised=True, model_kwargs=None, device="cpu",
              on_step=None):
    """calc_bpd_loop of images `indices`, with each image's noise from the generator of (seed, index).

    :param images: uint8 [B, H, W, 3].
    :param on_step: None, or callable() run after each timestep.
    :return: {"index": int64 [B], "total_bpd", "prior_bpd": float32 [B], "vb", "mse", "xstart_mse": float32 [B, T]}.
    """
    x = to_model_range(images, device)
    noise = PerSampleGenerator(seed, indices, device)
    with torch.no_grad():
        out = diffusion.calc_bpd_loop(model, x, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
                                      noise_fn=noise.randn_like, on_step=on_step)
    result = {key: out[key].float().cpu().numpy() for key in (*PER_IMAGE, *TERMS)}
    return {"index": np.asarray(indices, dtype=np.int64), **result}


class NllFolder:
    """The files of one bits/dim run (layout in the module docstring) and its resume bookkeeping."""

    def __init__(self, path):
        self.path = path
        self.parts_dir = os.path.join(path, "parts")
        self.run_file = os.path.join(path, "run.json")

    def check_run(self, identity, num_images):
        """Refuse a folder written with other arguments, or with more images than `num_images`."""
        if not os.path.exists(self.run_file):
            return
        with open(self.run_file) as f:
            stored = json.load(f)
        changed = sorted(k for k in set(identity) | set(stored["identity"]) if identity.get(k) != stored["identity"].get(k))
        if changed:
            details = "; ".join(f"{k}: folder has {stored['identity'].get(k)!r}, now {identity.get(k)!r}" for k in changed)
            raise ValueError(
                f"bits/dim folder {self.path!r} holds results of other arguments ({details}); rerun with the "
                "folder's arguments to resume, or pass a fresh --out_dir"
            )
        if num_images < stored["num_images"]:
            raise ValueError(
                f"bits/dim folder {self.path!r} was started with {stored['num_images']} images; {num_images} would "
                "leave results of others in it. Use at least that many (--num_samples), or a fresh --out_dir"
            )

    def record_run(self, identity, num_images):
        os.makedirs(self.parts_dir, exist_ok=True)
        fileio.write_text(self.run_file, json.dumps({"identity": identity, "num_images": num_images}, indent=2,
                                                    sort_keys=True))

    def part_files(self):
        if not os.path.isdir(self.parts_dir):
            return []
        return sorted(os.path.join(self.parts_dir, n) for n in os.listdir(self.parts_dir) if _PART_NAME.match(n))

    def finished_indices(self):
        """Indices of the images whose results are on disk."""
        done = set()
        for path in self.part_files():
            with np.load(path) as part:
                done.update(part["index"].tolist())
        return done

    def write_part(self, result):
        index = result["index"]
        path = os.path.join(self.parts_dir, f"bpd_{index[0]:06d}_{len(index)}.npz")
        atomic_write(path, lambda f: np.savez(f, **result))

    def assemble(self, num_images, details):
        """Gather the parts of images 0..num_images-1 into the term files, bpd.npz and nll.json; returns the
        summary dict."""
        rows = {}
        for path in self.part_files():
            with np.load(path) as part:
                for k, index in enumerate(part["index"].tolist()):
                    if index < num_images:
                        rows[index] = {key: part[key][k] for key in (*PER_IMAGE, *TERMS)}
        missing = sorted(set(range(num_images)) - set(rows))
        if missing:
            raise RuntimeError(f"{len(missing)} image(s) have no results in {self.parts_dir!r} (first: "
                               f"{missing[:5]}); rerun the same command to evaluate them")
        table = {key: np.stack([rows[i][key] for i in range(num_images)]) for key in (*PER_IMAGE, *TERMS)}
        for term in TERMS:
            mean = table[term].astype(np.float64).mean(axis=0).astype(np.float32)
            atomic_write(os.path.join(self.path, f"{term}_terms.npz"), lambda f, mean=mean: np.savez(f, mean))
        per_image = {"index": np.arange(num_images, dtype=np.int64), **{k: table[k] for k in PER_IMAGE}}
        atomic_write(os.path.join(self.path, "bpd.npz"), lambda f: np.savez(f, **per_image))
        total = table["total_bpd"].astype(np.float64)
        summary = {
            "bpd": float(total.mean()),
            "bpd_standard_error": float(total.std(ddof=1) / math.sqrt(num_images)) if num_images > 1 else None,
            "prior_bpd": float(table["prior_bpd"].astype(np.float64).mean()),
            "num_images": num_images,
            "timesteps": int(table["vb"].shape[1]),
            "term_files": {term: f"{term}_terms.npz" for term in TERMS},
            "per_image_file": "bpd.npz",
            **details,
        }
        write_json(os.path.join(self.path, SUMMARY_FILE), summary)
        return summary


def bpd_to_folder(model, diffusion, image_set, labels, num_images, batch_size, out_dir, identity, seed=0,
                  clip_denoised=True, device="cpu", rank=0, world_size=1, barrier=lambda: None, details=None):
    """Evaluate images 0..num_images-1 of `image_set` into `out_dir`, resuming what is there.

    Every rank calls this with the same arguments; ranks split the missing images' batches.
    :param image_set: analysis.ImageSet (uint8 images by index, at the model's size).
    :param labels: int64 [len(image_set)] class labels for a class-conditional model, else None.
    :param identity: JSON-serialisable dict of everything besides seed and clip_denoised that determines the numbers.
    :param details: extra JSON-serialisable fields of the summary (e.g. the checkpoint path).
    :return: (summary dict, images evaluated by this call on all ranks); the files exist once this returns.
    """
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"--num_samples {num_images} and --batch_size {batch_size} must be >= 1")
    folder = NllFolder(out_dir)
    identity = {**identity, "seed": seed, "clip_denoised": clip_denoised, "device_type": torch.device(device).type}
    folder.check_run(identity, num_images)
    if rank == 0:
        fileio.remove_temporaries(folder.parts_dir)
    missing = set(range(num_images)) - folder.finished_indices()
    barrier()  # every rank plans from the same listing, before any rank writes
    if rank == 0:
        folder.record_run(identity, num_images)
    barrier()
    with tqdm(total=len(missing), unit="image", disable=rank != 0, desc="bits/dim",
              bar_format="{l_bar}{bar}| {n:.1f}/{total} images [{elapsed}<{remaining}]") as bar:
        done = 0
        for batches in plan_batches(missing, batch_size, world_size):
            # Rank 0 advances the bar for every rank's batch of this round, a fraction per timestep.
            done += sum(len(b) for b in batches)
            per_step = sum(len(b) for b in batches) / diffusion.num_timesteps
            if rank < len(batches):
                indices = batches[rank]
                model_kwargs = {} if labels is None else {"y": torch.from_numpy(labels[indices]).to(device)}
                folder.write_part(image_bpd(model, diffusion, image_set.load(indices), indices, seed, clip_denoised,
                                            model_kwargs, device, on_step=lambda: bar.update(per_step)))
            bar.n = done  # exact at the end of each round, whatever the float sum of the fractions
            bar.refresh()
    barrier()
    summary = None
    if rank == 0:
        summary = folder.assemble(num_images, {**(details or {}), "seed": seed, "clip_denoised": clip_denoised})
    barrier()
    if summary is None:
        with open(os.path.join(out_dir, SUMMARY_FILE)) as f:
            summary = json.load(f)
    return summary, len(missing)
