"""Super-resolution: the U-Net conditioned on a low-resolution image, and the training batches that feed it.

SuperResModel has the reference's parameter names and shapes (its first conv takes the image and the upsampled
low-resolution input, 2·C channels), so the released ADM upsamplers (64->256, 128->512) load with strict=True.
Training gives each batch its low-resolution input as the reference does: area downsampling of the batch itself
(`LowResBatches`). Sampling reads it from a base-sample npz (`BaseSamples`).
"""

import numpy as np
import torch
import torch.nn.functional as F

from .unet import UNetModel


class SuperResModel(UNetModel):
    """The ADM U-Net with a low-resolution input: `low_res` is upsampled bilinearly to x's size and concatenated to x
    as extra channels. Constructor arguments as UNetModel's; `in_channels` counts the image channels C, and the
    model's own `in_channels` attribute is 2·C, as in the reference."""

    def __init__(self, image_size, in_channels, *args, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)

    def forward(self, x, timesteps, y=None, low_res=None):
        """x: [N, C, H, W]; timesteps: [N]; y: [N] labels of a class-conditional model; low_res: [N, C, h, w] in
        [-1, 1], any h, w (the reference upsamples 64 -> 256 and 128 -> 512). Returns [N, out_channels, H, W]."""
        channels = self.in_channels // 2
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [N, {channels}, H, W]")
        if low_res is None:
            raise ValueError("a super-resolution model needs its low-resolution input: pass low_res [N, C, h, w]")
        if low_res.ndim != 4 or low_res.shape[:2] != x.shape[:2]:
            raise ValueError(f"low_res has shape {tuple(low_res.shape)}; expected [N, C, h, w] = "
                             f"[{x.shape[0]}, {channels}, h, w]")
        upsampled = F.interpolate(low_res.to(x.dtype), x.shape[2:], mode="bilinear")
        return super().forward(torch.cat([x, upsampled], dim=1), timesteps, y)


def downsample(images, small_size):
    """[N, C, H, W] -> [N, C, small_size, small_size] by area averaging (the reference's low-resolution input)."""
    return F.interpolate(images, small_size, mode="area")


class LowResBatches:
    """Training batches (x, cond) of an `image_datasets.load_data` iterator with cond["low_res"] = downsample(x).

    The low-resolution input is made from the batch after its crop and flip, so both show the same picture; resume
    state and close() are those of the wrapped iterator.
    """

    def __init__(self, data, small_size):
        self.data = data
        self.small_size = small_size

    def __iter__(self):
        return self

    def __next__(self):
        batch, cond = next(self.data)
        return batch, {**cond, "low_res": downsample(batch, self.small_size)}

    def state_dict(self):
        return self.data.state_dict()

    def load_state_dict(self, state):
        self.data.load_state_dict(state)

    def close(self):
        self.data.close()


class BaseSamples:
    """The low-resolution inputs of super_res_sample.py: an image_sample.py npz (arr_0 uint8 [N, h, w, 3], arr_1
    int64 [N] labels when class-conditional). Sample i is conditioned on base sample i mod N."""

    def __init__(self, path, small_size, class_cond):
        """:raises ValueError: naming the file when its images are not small_size px or it lacks needed labels."""
        # evaluation imports clean-fid, which only reading the npz needs: imported here, not with the model.
        from .evaluation import check_images, npz_array, open_npz

        self.path = path
        with open_npz(path) as arrays:
            self.images = check_images(npz_array(arrays, "arr_0", path), f"--base_samples {path} (arr_0)")
            labels = npz_array(arrays, "arr_1", path) if class_cond and "arr_1" in arrays.files else None
        if self.images.shape[1:3] != (small_size, small_size):
            raise ValueError(
                f"--base_samples {path!r} holds {self.images.shape[1]}x{self.images.shape[2]} images; the model "
                f"upsamples {small_size}x{small_size} (--small_size {small_size}): pass samples of that size or "
                "set --small_size to theirs"
            )
        self.labels = None
        if class_cond:
            if labels is None or labels.shape != (len(self.images),) or labels.dtype.kind not in "iu":
                raise ValueError(
                    f"--base_samples {path!r} has no labels (int arr_1 [{len(self.images)}]) but --class_cond True "
                    "needs one per image: use samples of a class-conditional model, or --class_cond False"
                )
            self.labels = labels.astype(np.int64)

    def __len__(self):
        return len(self.images)

    def check_labels(self, num_classes):
        """Refuse labels outside 0..num_classes-1 (the rows of the model's label embedding)."""
        if self.labels is not None and len(self.labels) and not 0 <= self.labels.min() <= self.labels.max() < num_classes:
            raise ValueError(
                f"--base_samples {self.path!r} has labels {self.labels.min()}..{self.labels.max()}; the model knows "
                f"classes 0..{num_classes - 1}: use base samples of a model with the same classes"
            )

    def model_kwargs(self, indices):
        """{"low_res": float32 [B, 3, h, w] in [-1, 1] (+ "y": int64 [B])} of samples `indices` (CPU tensors)."""
        rows = np.asarray(indices) % len(self.images)
        low_res = torch.from_numpy(self.images[rows]).permute(0, 3, 1, 2).float() / 127.5 - 1
        kwargs = {"low_res": low_res}
        if self.labels is not None:
            kwargs["y"] = torch.from_numpy(self.labels[rows])
        return kwargs
