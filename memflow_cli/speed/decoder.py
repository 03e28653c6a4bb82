"""The VAE decoder on the fast path: channels-last convolutions and its steps between convs compiled.

The compiled steps are its RMS norm and the SiLU after it (seven full passes over the largest activations
of the whole pipeline in eager mode, one fused), the residual sum with the biases of the residual blocks'
convs folded in, and the nearest-neighbour upsampling.
"""

from __future__ import annotations

import functools

import torch

from ..vae_stream import DecoderKernels, residual_sum, rms_norm_silu_into, upsample_nearest
from .compile import compiled, eager_rounding
from .process import compile_settings


def channels_last_convs(vae: torch.nn.Module) -> None:
    """The VAE's conv weights in channels-last layout on CUDA (cuDNN's fast 3-D convs); nothing elsewhere.

    Only the weights' memory layout changes, not their values.
    """
    if next(vae.parameters()).device.type != "cuda":
        return
    for module in vae.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
        elif isinstance(module, torch.nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)


@functools.cache
def fused_decoder_kernels() -> DecoderKernels:
    """The VAE decoder's norm + SiLU, residual sum and upsampling as compiled kernels (made once; CUDA).

    The norm + SiLU and the residual sum add the bias a residual block's conv leaves out, and read the
    real channels of a conv computed with tiled filters (96 channels computed as 128: a third faster on
    Hopper). Intermediate results are rounded to the activation dtype where eager PyTorch rounds them
    (`emulate_precision_casts`), so a fused step computes what the plain one does, in one pass over
    memory instead of several.
    """
    compile_settings()
    as_eager = eager_rounding()
    return DecoderKernels(
        norm_silu=compiled(rms_norm_silu_into, as_eager),
        residual=compiled(residual_sum, as_eager),
        upsample=compiled(upsample_nearest),
        bias_after_conv=True,
        channel_tile=128,
    )
