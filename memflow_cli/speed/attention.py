"""Which kernels compute attention: SDPA's backend priority on CUDA, and flash-attn 3 for self-attention.

flash-attn 3 is taken only where it is installed, the GPU is a Hopper, the model is bf16 or fp16 and the
kernel agrees with SDPA on a test call (`checked_attention`); torch SDPA otherwise.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..model.transformer import AttentionKernel

# fastest first on Hopper at MemFlow's shapes: cuDNN, then flash, then memory-efficient
CUDA_BACKENDS: tuple[SDPBackend, ...] = (
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
)

SDPA = "sdpa"
FLASH_ATTENTION_3 = "flash-attn 3"
# A self-attention kernel is trusted when its output on a test problem is this close to SDPA's in float32
# (relative L2): bf16 rounding gives about 2e-3, a kernel that mixes up heads and tokens about 1.
FAITHFUL_ATTENTION = 1e-2


def sdpa_backends_for(device: torch.device) -> tuple[SDPBackend, ...]:
    """SDPA's backends in the order to try them on `device`; empty where torch's own choice stands (CPU)."""
    return CUDA_BACKENDS if device.type == "cuda" else ()


@contextlib.contextmanager
def sdpa_priority(backends: Sequence[SDPBackend]) -> Iterator[None]:
    """Within this block SDPA tries `backends` in this order (nothing changes when there are none)."""
    if not backends:
        yield
        return
    with sdpa_kernel(list(backends), set_priority=True):
        yield


def describe(self_attention: str, backends: Sequence[SDPBackend]) -> str:
    """What computes the model's attention, for reports."""
    if not backends:
        return "sdpa (cpu)"
    sdpa = "sdpa: " + " > ".join(b.name.lower() for b in backends)
    return sdpa if self_attention == SDPA else f"{self_attention} for self-attention, {sdpa} for cross-attention"


# Where flash-attn 3's `flash_attn_func` is looked for, first found first: the Dao-AILab build (as a package
# or its flat module), then the forward-only `fa3-fwd` wheel (`pip install "memflow-cli[hopper]"`).
FLASH_ATTENTION_3_MODULES = ("flash_attn_3.flash_attn_interface", "flash_attn_interface", "fa3_fwd_interface")


def flash_attention_3() -> tuple[str, Callable[..., Any]] | None:
    """The first installed flash-attn 3 (built for Hopper GPUs only): its module name and `flash_attn_func`."""
    for name in FLASH_ATTENTION_3_MODULES:
        try:
            return name, importlib.import_module(name).flash_attn_func
        except ModuleNotFoundError as error:
            if error.name is None or name.startswith(error.name):  # this one is not installed
                continue
            failure: ImportError = error  # installed, but something it imports is missing
        except ImportError as error:  # installed, but built for another torch or CUDA
            failure = error
        message = f"flash-attn 3 ({name}) is installed but does not load ({failure}); it is not used"
        warnings.warn(message, stacklevel=2)
    return None


def heads_last(kernel: Callable[..., Any]) -> AttentionKernel:
    """A flash-attn kernel, which takes and returns [B, N, H, D], as a drop-in for SDPA on [B, H, N, D].

    Only views are exchanged: the model's queries are [B, N, H, D] in memory already, and the cache's
    keys and values keep their layout (flash-attn reads any strides with a contiguous last dimension).
    """

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        if isinstance(out, tuple):  # builds from before mid-2025 also return the softmax log-sum-exp
            out = out[0]
        return out.transpose(1, 2)

    return attention


def attention_error(attention: AttentionKernel, heads: int, head_dim: int, device: torch.device, dtype) -> float:
    """Relative L2 distance between `attention` and float32 SDPA on one random problem of the model's heads.

    Keys and values are strided slices of a larger buffer, as the KV cache hands them over.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn((1, 200, heads, head_dim), generator=generator, device=device).to(dtype).transpose(1, 2)
    cache = torch.randn((2, 1, heads, 400, head_dim), generator=generator, device=device).to(dtype)
    k, v = cache[0, :, :, :328], cache[1, :, :, :328]
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    return ((attention(q, k, v).float() - expected).norm() / expected.norm()).item()


def checked_attention(
    name: str, attention: AttentionKernel, heads: int, head_dim: int, device: torch.device, dtype
) -> AttentionKernel | None:
    """`attention` if it runs and agrees with SDPA on a test problem; otherwise None, with a warning."""
    try:
        error = attention_error(attention, heads, head_dim, device, dtype)
    except Exception as failure:  # e.g. a head size or GPU this build has no kernel for
        warnings.warn(f"{name} failed on a test call ({failure}); self-attention stays on torch SDPA", stacklevel=2)
        return None
    if not error <= FAITHFUL_ATTENTION:  # NaN included
        warnings.warn(
            f"{name} differs from torch SDPA by {error:.2e} (relative L2) on a test call, more than "
            f"{FAITHFUL_ATTENTION:.0e}; self-attention stays on torch SDPA",
            stacklevel=2,
        )
        return None
    return attention


def flash_attention_3_may_run(device: torch.device, dtype: torch.dtype) -> bool:
    """A Hopper GPU and a bf16 or fp16 model (flash-attn 3 has no float32 kernels; `fa3-fwd` has no fp16 ones)."""
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
    return hopper and dtype in (torch.bfloat16, torch.float16)


def self_attention_kernel(
    device: torch.device, heads: int, head_dim: int, dtype
) -> tuple[str, AttentionKernel]:
    """The self-attention kernel for a model on `device`, with its name.

    flash-attn 3 where it is installed, the GPU is a Hopper and the kernel agrees with SDPA on a test call
    (on an H200 at MemFlow's shapes `fa3-fwd` ran at 656 TFLOP/s, cuDNN's fused attention at 541); torch
    SDPA otherwise, whose backend `sdpa_priority` orders. The name says which module ran.
    """
    sdpa = (SDPA, F.scaled_dot_product_attention)
    found = flash_attention_3() if flash_attention_3_may_run(device, dtype) else None
    if found is None:
        return sdpa
    name = f"{FLASH_ATTENTION_3} ({found[0]})"
    attention = checked_attention(name, heads_last(found[1]), heads, head_dim, device, dtype)
    return sdpa if attention is None else (name, attention)
