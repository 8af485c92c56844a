"""Half-precision conversion of the U-Net's convolutions (ADM's `use_fp16`; docs/compatibility.md, "U-Net and
checkpoint layout")."""

import torch
import torch.nn as nn

# The U-Net's convolutions: 2-D for images, 1-D (kernel 1) for the attention's qkv and proj_out.
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d)


def convert_module_to_f16(module):
    """Cast the weight and bias of `module` to float16 in place if it is a convolution; leave any other module."""
    if isinstance(module, _CONVOLUTIONS):
        module.to(torch.float16)


def convert_module_to_f32(module):
    """Undo convert_module_to_f16: cast a convolution's weight and bias back to float32 in place."""
    if isinstance(module, _CONVOLUTIONS):
        module.to(torch.float32)
