"""Half-precision conversion of the U-Net's convolutions (ADM's `use_fp16`, COMPAT §6 "fp16")."""

import torch
import torch.nn as nn

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def convert_module_to_f16(module):
    """Cast the weight and bias of `module` to float16 in place if it is a convolution; leave any other module."""
    if isinstance(module, _CONVOLUTIONS):
        module.to(torch.float16)


def convert_module_to_f32(module):
    """Undo convert_module_to_f16: cast a convolution's weight and bias back to float32 in place."""
    if isinstance(module, _CONVOLUTIONS):
        module.to(torch.float32)
