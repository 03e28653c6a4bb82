"""Speed, chosen once and applied from outside the model: `choose_fast_path` returns a `FastPath` value.

The model code stays plain eager PyTorch. The value says what computes each part (`Kernels`, which the
transformer is built with: attention, linear layers, fused q/k/v, FP8, its blocks' steps compiled or not),
what runs the passes of one video (CUDA graph replays or the plain pass) and what the VAE decoder's steps
between convs are. Whoever builds the model and the decoder (the engine) holds it and hands each part to
what uses it; nothing is applied to a model after it is built.

Five paths on CUDA (`FastPath.name`): "triton-graphed", what every command runs by default (below);
"eager", plain PyTorch (`--no-compile`, the reference); "compiled" (`--compile`), the
blocks' steps compiled by Inductor (a minute's compile on an empty cache), q/k/v fused, the FFN's GELU in
the matmul's epilogue and each video's repeated passes replayed from CUDA graphs; "graphed" (the Python
API's `compile=None`), the compiled path's layers and graphs with nothing compiled, which ran no faster than
eager on an H100 (issue #25); "triton-graphed" and "triton" (`glue=True`, with and without the graphs), the
graphed path's layers with the blocks' elementwise glue in hand-fused Triton kernels (`glue.py`: what
Inductor fuses, five small kernels compiled at load instead of a minute of Inductor; Triton's disk cache
keeps them). On an H100 a steady chunk took 283 ms triton-graphed, 303 ms compiled and 435 ms eager (issue
#25), so `compile_cache.AUTO_UNCOMPILED` makes triton-graphed the default.
The CPU runs plain PyTorch.

By concern: `attention.py` (SDPA's backend priority, the flash-attn 3 probe), `compile.py` (torch.compile
from any thread, the blocks' compiled steps), `compile_cache.py` (compiled kernels kept across processes,
and whether a run compiles at all), `process.py` (every process-wide setting, in one place), `graphs.py`
(CUDA graphs of passes), `linear.py` (the blocks' linear layers), `glue.py` (the blocks' fused Triton glue),
`decoder.py` (the VAE decoder's layout and compiled steps).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, replace

import torch
from torch.nn.attention import SDPBackend

from ..model import memory
from ..model.glue import PLAIN_GLUE, Glue
from ..model.transformer import PLAIN_KERNELS, Kernels
from ..settings import TransformerConfig
from ..vae_stream import PLAIN_KERNELS as PLAIN_DECODER_KERNELS
from ..vae_stream import DecoderKernels
from ..wan_vae import WanVAE
from . import attention
from .compile import compiled, compiled_block_step
from .decoder import EAGER_CUDA_DECODER, channels_last_convs, fused_decoder_kernels
from .fp8 import fp8_kernels
from .graphs import GraphedPasses
from .linear import LinearGELU
from .process import process_settings

__all__ = ["FastPath", "choose_fast_path", "EAGER"]


def triton_glue(config: TransformerConfig, device: torch.device, dtype: torch.dtype) -> Glue:
    """The blocks' glue as fused Triton kernels, compiled now at the model's sizes; where Triton is missing or
    a kernel does not build on this GPU, the plain glue, with a warning (the path is then reported as such)."""
    try:
        from .glue import triton_glue as compiled_glue

        return compiled_glue(config.dim, config.head_dim, device, dtype)
    except Exception as failure:  # no Triton, or no kernel for this GPU: still correct, just not fused
        warnings.warn(f"the fused Triton glue is not available ({failure}); the blocks run plain PyTorch glue",
                      stacklevel=2)  # fmt: skip
        return PLAIN_GLUE


@dataclass(frozen=True)
class FastPath:
    """How the model and the decoder run: chosen once per engine, then only read."""

    compile: bool  # Inductor: compiled block steps and SMA key set, fused decoder steps (CUDA only)
    self_attention: str  # name of the self-attention kernel, for reports
    kernels: Kernels  # what the transformer is built with: attention, SMA key set, linear layers, block steps
    decoder_kernels: DecoderKernels  # the VAE decoder's steps between its convolutions
    graphed_passes: type[GraphedPasses] | None = None  # runs one video's passes from CUDA graphs; None: plainly
    sdpa_backends: tuple[SDPBackend, ...] = ()  # SDPA's backend priority (empty: torch's own choice)
    fp8: bool = False  # the blocks' per-token linear layers in FP8 (`fp8.py`; check `fp8_unsupported_reason`)

    @property
    def attention_name(self) -> str:
        """What computes the model's attention, for reports."""
        return attention.describe(self.self_attention, self.sdpa_backends)

    @property
    def glue(self) -> bool:
        """The blocks' glue runs in fused Triton kernels (`glue.py`)."""
        return self.kernels.glue.name != PLAIN_GLUE.name

    @property
    def name(self) -> str:
        """Which path this is, for reports: "compiled", "graphed", "triton-graphed", "triton" or "eager"."""
        if self.compile:
            return "compiled"
        if self.graphed_passes is None:
            return "triton" if self.glue else "eager"
        return "triton-graphed" if self.glue else "graphed"

    @property
    def asked(self) -> bool | None:
        """The `compile` that chooses this path again: True (`--compile`), False (`--no-compile`), None (neither:
        the triton paths are what no flag asks for once `compile_cache.AUTO_UNCOMPILED` names them)."""
        return {"compiled": True, "eager": False}.get(self.name)

    def sdpa_priority(self) -> contextlib.AbstractContextManager[None]:
        """Within this block SDPA tries the chosen backends first."""
        return attention.sdpa_priority(self.sdpa_backends)

    def prepare_vae(self, vae: WanVAE) -> None:
        """The VAE's conv weights in the layout its fast convolutions read (channels-last on CUDA)."""
        channels_last_convs(vae)


EAGER = FastPath(
    compile=False, self_attention=attention.SDPA, kernels=PLAIN_KERNELS, decoder_kernels=PLAIN_DECODER_KERNELS
)  # plain PyTorch: what the CPU runs


def choose_fast_path(
    config: TransformerConfig,
    device: torch.device,
    dtype: torch.dtype,
    *,
    compile: bool | None = None,
    fp8: bool = False,
    glue: bool = False,
) -> FastPath:
    """The fastest faithful way to run a model of `config` on `device` in `dtype`.

    On CUDA: SDPA's fastest backends first, flash-attn 3 for self-attention where it works, and then as
    `compile` says: None the graphed path (the Python API's; no command asks for it), True the compiled one,
    False plain eager kernels.
    With `glue` (compile None or False), the graphed path's layers and the blocks' glue in fused Triton
    kernels, compiled here (`triton_glue`), with (None) or without (False) the CUDA graphs.
    On the CPU: plain PyTorch, whatever was asked. `fp8` (asked for, never chosen here: it changes the video)
    builds the blocks' per-token linear layers in FP8.
    """
    if glue and compile is True:
        raise ValueError("the Triton glue does by hand what the compiled path's Inductor fuses: ask for one of them")
    process_settings(device, compile=compile is True, glue=glue)
    if device.type != "cuda":
        return replace(EAGER, fp8=fp8, kernels=fp8_kernels(PLAIN_KERNELS) if fp8 else PLAIN_KERNELS)
    name, self_attention = attention.self_attention_kernel(device, config.num_heads, config.head_dim, dtype)
    plain = Kernels(attention=self_attention)
    if glue:  # the graphed path's layers, the glue fused by hand; CUDA graphs where compile is None
        kernels = replace(plain, linear_gelu=LinearGELU, fused_qkv=True, glue=triton_glue(config, device, dtype))
        decoder, graphs = EAGER_CUDA_DECODER.kernels(), GraphedPasses if compile is None else None
    elif compile is False:
        kernels, decoder, graphs = plain, EAGER_CUDA_DECODER.kernels(), None
    elif compile is None:  # graphed: nothing compiled, the same layers as the compiled path
        kernels = replace(plain, linear_gelu=LinearGELU, fused_qkv=True)
        decoder, graphs = EAGER_CUDA_DECODER.kernels(), GraphedPasses
    else:
        kernels = replace(
            plain, sma_key_set=compiled(memory.sma_key_set), linear_gelu=LinearGELU, fused_qkv=True,
            block_step=compiled_block_step(),
        )  # fmt: skip
        decoder, graphs = fused_decoder_kernels(), GraphedPasses
    return FastPath(
        compile=compile is True,
        self_attention=name,
        kernels=fp8_kernels(kernels) if fp8 else kernels,
        decoder_kernels=decoder,
        graphed_passes=graphs,
        sdpa_backends=attention.sdpa_backends_for(device),
        fp8=fp8,
    )
