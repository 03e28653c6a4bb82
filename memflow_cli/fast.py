"""Speed, applied from outside the model in one place: attention kernel choice and regional compile.

The model code stays plain eager PyTorch. `accelerate` compiles the two pure
per-block steps (everything but the cache read/write and the attention call)
and `attention_kernels` picks the fastest SDPA backend the machine has.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .model.transformer import CausalWanTransformer

# fastest first on Hopper at MemFlow's shapes: cuDNN, then flash, then memory-efficient
CUDA_BACKENDS = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def attention_backend_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "sdpa (cpu)"
    return "sdpa: " + " > ".join(b.name.lower() for b in CUDA_BACKENDS)


@contextlib.contextmanager
def attention_kernels(device: torch.device) -> Iterator[None]:
    """Within this block, SDPA prefers cuDNN attention, then flash, on CUDA."""
    if device.type != "cuda":
        yield
        return
    with sdpa_kernel(CUDA_BACKENDS, set_priority=True):
        yield


def accelerate(model: CausalWanTransformer, *, compile: bool) -> None:
    """Compile every block's pure steps (shapes are static per pass kind, so few graphs are built)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if not compile:
        return
    for block in model.blocks:
        block.attention_inputs = torch.compile(block.attention_inputs, dynamic=False)
        block.after_attention = torch.compile(block.after_attention, dynamic=False)


def accelerate_vae(vae: torch.nn.Module) -> None:
    """Channels-last 3-D layout and cuDNN autotuning for the VAE's convolutions on CUDA."""
    if next(vae.parameters()).device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    for module in vae.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
