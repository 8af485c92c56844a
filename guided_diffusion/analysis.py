"""The pieces of the paper's analyses of noise levels (Sec. 3.1: Fig. 1, Fig. 2, Fig. B, Fig. C; Table 4).

- `ImageSet`: dataset images by index (folder, zip or sample npz), centre-cropped as training crops them.
- Noise levels: log grids of SNR; x_t at a continuous SNR without a model (Fig. 1); the respaced timestep whose
  SNR is nearest to a target (Fig. 2).
- `reconstruct`: stochastic reconstruction, x_0 -> x_t ~ q(x_t | x_0) -> the learned reverse process from t to 0.
- Distances as functions of SNR between noisy images (Fig. 1) and between images and their reconstructions
  (Fig. C), with any perceptual network of `perceptual.load_perceptual_network`.

Images enter every network as uint8, the pixels a saved image holds (sampling.quantize_to_uint8): a noisy x_t is
clamped to [-1, 1] on the way, as it is when it is looked at.
"""

import math
import os

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import evaluation
from .image_datasets import center_crop_arr, decode_image, open_image_source
from .sampling import PerSampleGenerator, quantize_to_uint8


class AnalysisError(ValueError):
    """An input that an analysis cannot use; the message names it and says what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Images


class ImageSet:
    """Images of a folder or zip ("" = the bundled demo set, sorted as training lists them) or of a sample npz
    (arr_0 uint8 [N, H, W, 3]), read by index and centre-cropped to `image_size` (0 = the first image's short side).
    """

    def __init__(self, source, image_size=0):
        if source.lower().endswith(".npz"):
            try:
                self._array = evaluation.load_npz_images(source)
            except (OSError, KeyError, evaluation.EvaluationError) as err:
                raise AnalysisError(f"{source}: {err}") from None
            self._files = None
            self.path = os.path.abspath(source)
        else:
            self._files = open_image_source(source)
            self._array = None
            self.path = self._files.path
        self.image_size = image_size or min(self._image(0).size)

    def __len__(self):
        return len(self._array) if self._files is None else len(self._files.names)

    def load(self, indices):
        """uint8 [len(indices), S, S, 3] of the images at `indices`."""
        for index in indices:
            if not 0 <= index < len(self):
                raise AnalysisError(f"{self.path} holds {len(self)} images; image index {index} does not exist")
        return np.stack([center_crop_arr(self._image(int(i)), self.image_size) for i in indices])

    def _image(self, index):
        if self._files is None:
            return Image.fromarray(self._array[index])
        return decode_image(self._files.read(self._files.names[index]))


def to_model_range(images, device="cpu"):
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1] on `device`, as the training data loader scales."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


# ---------------------------------------------------------------------------------------------------------------
# Noise levels


def parse_snrs(text, flag="--snrs"):
    """"1e-3,1e-2,1" -> float64 [K] of positive SNRs, in the order given."""
    try:
        snrs = np.array([float(part) for part in text.split(",")], dtype=np.float64)
    except ValueError:
        raise AnalysisError(f"{flag} {text!r}: expected comma-separated numbers such as 1e-3,1e-2,1e-1,1,10") from None
    if not (np.isfinite(snrs).all() and (snrs > 0).all()):
        raise AnalysisError(f"{flag} {text!r}: every SNR must be a positive finite number")
    return snrs


def snr_grid(low, high, points_per_decade):
    """Log-spaced SNRs from `low` to `high` inclusive, `points_per_decade` per factor 10; float64, ascending."""
    if not 0 < low < high or points_per_decade < 1:
        raise AnalysisError(
            f"SNR grid {low:g}..{high:g} with {points_per_decade} per decade: need 0 < low < high and >= 1 per decade"
        )
    decades = np.log10(high) - np.log10(low)
    return np.logspace(np.log10(low), np.log10(high), int(round(decades * points_per_decade)) + 1)


def perturb_to_snr(x_start, snr, noise):
    """x_t = √ᾱ x_0 + √(1-ᾱ) ε with ᾱ = SNR/(1+SNR), so that ᾱ/(1-ᾱ) = SNR (Eq. (2), (4)), for any SNR > 0.

    :param x_start: [N, C, H, W] in [-1, 1].
    :param snr: a positive float.
    :param noise: ε, shaped like x_start.
    """
    alpha_bar = snr / (1.0 + snr)
    return alpha_bar**0.5 * x_start + (1.0 - alpha_bar) ** 0.5 * noise


def timestep_nearest_snr(diffusion, snr):
    """(index into the diffusion's steps, its SNR) of the step whose SNR_t is nearest to `snr` in log scale.

    For a SpacedDiffusion the index counts respaced steps; `original_timestep` maps it back.
    """
    index = int(np.argmin(np.abs(np.log(diffusion.snr) - np.log(snr))))
    return index, float(diffusion.snr[index])


def original_timestep(diffusion, index):
    """The base process's timestep of respaced step `index` (the index itself for an unspaced diffusion)."""
    timestep_map = getattr(diffusion, "timestep_map", None)
    return int(index if timestep_map is None else timestep_map[index])


# ---------------------------------------------------------------------------------------------------------------
# Stochastic reconstruction (Fig. 2)


@torch.no_grad()
def denoise_from(model, diffusion, x_t, step, use_ddim=False, ddim_eta=0.0, clip_denoised=True, noise_fn=None,
                 on_step=None):
    """Run the reverse process from respaced step `step` down to 0: step + 1 network evaluations.

    :param x_t: [N, C, H, W] at step `step`.
    :param use_ddim: DDIM steps (with `ddim_eta`) instead of ancestral ones.
    :param noise_fn: x -> standard normal noise shaped like x (per-sample generators plug in here).
    :param on_step: called after each step (progress bars).
    :return: x_0, [N, C, H, W].
    """
    x = x_t
    for i in range(step, -1, -1):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        if use_ddim:
            out = diffusion.ddim_sample(model, x, t, clip_denoised=clip_denoised, eta=ddim_eta, noise_fn=noise_fn)
        else:
            out = diffusion.p_sample(model, x, t, clip_denoised=clip_denoised, noise_fn=noise_fn)
        x = out["sample"]
        if on_step is not None:
            on_step()
    return x


def reconstruct(model, diffusion, images, indices, step, seed, device, on_step=None, **denoise_options):
    """Stochastic reconstruction x̂_0 of each image from x_t at respaced step `step` (paper Fig. 2).

    Image k draws ε of q(x_t | x_0) and then every step's noise from the generator of (seed, indices[k])
    (sampling.PerSampleGenerator), so its reconstruction depends on (seed, its index, step) alone, and every step
    of a sweep starts from the same ε.

    :param images: uint8 [N, H, W, 3].
    :param indices: [N] ints naming the images' random streams.
    :param denoise_options: use_ddim, ddim_eta, clip_denoised (see `denoise_from`).
    :return: uint8 [N, H, W, 3] reconstructions.
    """
    generator = PerSampleGenerator(seed, indices, device)
    x_start = to_model_range(images, device)
    t = torch.full((len(images),), step, device=device, dtype=torch.long)
    x_t = diffusion.q_sample(x_start, t, noise=generator.randn(x_start.shape))
    x_0 = denoise_from(model, diffusion, x_t, step, noise_fn=generator.randn_like, on_step=on_step, **denoise_options)
    return quantize_to_uint8(x_0).cpu().numpy()


class CountingNetwork:
    """Calls `model` and counts the rows (images) it evaluated: network evaluations, summed over images."""

    def __init__(self, model):
        self.model = model
        self.rows = 0

    def __call__(self, x, t, **kwargs):
        self.rows += x.shape[0]
        return self.model(x, t, **kwargs)


def reconstruction_sweep(model, diffusion, images, snrs, seed=0, device="cpu", batch_size=16, **denoise_options):
    """Reconstructions of every image from the respaced step whose SNR is nearest to each target (Fig. 2, Fig. C).

    :param images: uint8 [N, H, W, 3]; image k uses the random stream of index k (see `reconstruct`).
    :param snrs: [S] target SNRs.
    :param denoise_options: use_ddim, ddim_eta, clip_denoised.
    :return: dict with 'step' (respaced) and 'timestep' (original) int lists [S], 'snr' (the steps' actual SNR)
        float list [S], and 'reconstructions' uint8 [S, N, H, W, 3].
    """
    steps = [timestep_nearest_snr(diffusion, snr)[0] for snr in snrs]
    num_batches = math.ceil(len(images) / batch_size)
    columns = []
    with tqdm(total=num_batches * sum(step + 1 for step in steps), desc="denoising", unit="step") as bar:
        for step in steps:
            columns.append(np.concatenate([
                reconstruct(model, diffusion, images[start : start + batch_size],
                            range(start, min(start + batch_size, len(images))), step, seed, device,
                            on_step=lambda: bar.update(1), **denoise_options)
                for start in range(0, len(images), batch_size)
            ]))
    return {
        "step": steps,
        "timestep": [original_timestep(diffusion, step) for step in steps],
        "snr": [float(diffusion.snr[step]) for step in steps],
        "reconstructions": np.stack(columns),
    }


def reconstruction_distances(network, inputs, reconstructions):
    """float64 [S, N]: d(inputs[k], reconstructions[s, k]) (paper Fig. C).

    :param inputs: uint8 [N, H, W, 3].
    :param reconstructions: uint8 [S, N, H, W, 3], as `reconstruction_sweep` returns them.
    """
    anchors = np.concatenate([inputs] * len(reconstructions))
    (distances,) = network.distances(anchors, reconstructions.reshape(-1, *inputs.shape[1:]))
    return distances.reshape(len(reconstructions), len(inputs))


# Noisy images handed to a network in one call: ~256 MB of uint8 pixels at the most.
MAX_PIXEL_BYTES_PER_CALL = 1 << 28


def noisy_pair_distances(images, other_images, snrs, network, seed=0):
    """Distances between noisy images as functions of SNR (paper Fig. 1): for each pair k and SNR s,
    same[s, k] = d(x_tA, x_tB), x_tA and x_tB two noisings of images[k], and
    different[s, k] = d(x_tA, x'_t), x'_t a noising of other_images[k].

    Noising is `perturb_to_snr`, no model involved. Pair k draws its three ε from the generator of (seed, k) and
    keeps them at every SNR, so the curves vary with SNR alone.

    :param images, other_images: uint8 [K, H, W, 3] (x_0 and x'_0).
    :param snrs: [S] SNRs.
    :param network: a perceptual distance (`perceptual.load_perceptual_network`).
    :return: (same, different), float64 [S, K] each.
    """
    x_start, x_other = to_model_range(images), to_model_range(other_images)
    generator = PerSampleGenerator(seed, range(len(images)), "cpu")
    noise_a, noise_b, noise_other = (generator.randn(x_start.shape) for _ in range(3))
    snrs_per_call = max(1, MAX_PIXEL_BYTES_PER_CALL // (3 * images.nbytes))
    same, different = [], []
    for first in range(0, len(snrs), snrs_per_call):
        chunk = snrs[first : first + snrs_per_call]
        noisy = [
            np.concatenate([quantize_to_uint8(perturb_to_snr(x, snr, noise)).numpy() for snr in chunk])
            for x, noise in ((x_start, noise_a), (x_start, noise_b), (x_other, noise_other))
        ]
        same_chunk, different_chunk = network.distances(*noisy)
        same.append(same_chunk.reshape(len(chunk), len(images)))
        different.append(different_chunk.reshape(len(chunk), len(images)))
    return np.concatenate(same), np.concatenate(different)
