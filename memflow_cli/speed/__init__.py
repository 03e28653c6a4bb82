"""Speed, chosen once and applied from outside the model: `choose_fast_path` returns a `FastPath` value.

The model code stays plain eager PyTorch. The value says what computes each part (`Kernels`, which the
transformer is built with), how its blocks' steps run (compiled or not), what runs the passes of one video
(CUDA graph replays or the plain pass) and what the VAE decoder's steps between convs are. Whoever
builds the model and the decoder (the engine) holds it and hands each part to what uses it.

By concern: `attention.py` (SDPA's backend priority, the flash-attn 3 probe), `compile.py` (torch.compile
from any thread, the blocks' compiled steps), `compile_cache.py` (compiled kernels kept across processes,
and whether a run compiles at all), `process.py` (every process-wide setting, in one place), `graphs.py`
(CUDA graphs of passes), `linear.py` (the blocks' linear layers), `decoder.py` (the VAE decoder's layout
and compiled steps).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch.nn.attention import SDPBackend

from ..model import memory
from ..model.transformer import PLAIN_KERNELS, CausalWanTransformer, Kernels, PassFunction
from ..settings import TransformerConfig
from ..vae_stream import PLAIN_KERNELS as PLAIN_DECODER_KERNELS
from ..vae_stream import DecoderKernels
from . import attention
from .compile import compiled, compiled_block_steps
from .decoder import channels_last_convs, fused_decoder_kernels
from .fp8 import use_fp8_linears
from .graphs import GraphedPasses
from .linear import LinearGELU
from .process import process_settings

__all__ = ["FastPath", "choose_fast_path", "EAGER"]


@dataclass(frozen=True)
class FastPath:
    """How the model and the decoder run: chosen once per engine, then only read."""

    compile: bool  # compiled block steps, CUDA graphs of repeated passes, fused decoder steps (CUDA only)
    self_attention: str  # name of the self-attention kernel, for reports
    kernels: Kernels  # what the transformer is built with: attention kernel, SMA key set, linear layers
    decoder_kernels: DecoderKernels  # the VAE decoder's steps between its convolutions
    graphed_passes: type[GraphedPasses] | None = None  # runs one video's passes from CUDA graphs; None: plainly
    sdpa_backends: tuple[SDPBackend, ...] = ()  # SDPA's backend priority (empty: torch's own choice)
    fp8: bool = False  # the blocks' per-token linear layers in FP8 (`fp8.py`; check `fp8_unsupported_reason`)

    @property
    def attention_name(self) -> str:
        """What computes the model's attention, for reports."""
        return attention.describe(self.self_attention, self.sdpa_backends)

    def pass_function(self, model: CausalWanTransformer) -> PassFunction:
        """What computes one pass of `model` (built with `kernels`): with compile, its blocks' steps compiled.

        Call once per model, after its weights are loaded: they are laid out for the fast path first (with
        compile, q/k/v as one matmul, same values and names; with fp8, the blocks' linear layers quantised).
        """
        if self.fp8:
            use_fp8_linears(model)
        elif self.compile:
            for block in model.blocks:
                block.self_attn.fuse_qkv()
        if not self.compile:
            return model
        return partial(model, steps=compiled_block_steps(model))

    def sdpa_priority(self) -> contextlib.AbstractContextManager[None]:
        """Within this block SDPA tries the chosen backends first."""
        return attention.sdpa_priority(self.sdpa_backends)

    def prepare_vae(self, vae: torch.nn.Module) -> None:
        """The VAE's conv weights in the layout its fast convolutions read (channels-last on CUDA)."""
        channels_last_convs(vae)


EAGER = FastPath(
    compile=False, self_attention=attention.SDPA, kernels=PLAIN_KERNELS, decoder_kernels=PLAIN_DECODER_KERNELS
)  # plain PyTorch: what the CPU runs


def choose_fast_path(
    config: TransformerConfig, device: torch.device, dtype: torch.dtype, *, compile: bool, fp8: bool = False
) -> FastPath:
    """The fastest faithful way to run a model of `config` on `device` in `dtype`.

    On CUDA: SDPA's fastest backends first, flash-attn 3 for self-attention where it works,
    and with `compile` the compiled steps, CUDA graphs and fused decoder steps. On the CPU: plain PyTorch.
    `fp8` (asked for, never chosen here: it changes the video) quantises the blocks' linear layers.
    """
    process_settings(device, compile=compile)
    if device.type != "cuda":
        return replace(EAGER, fp8=fp8)
    name, self_attention = attention.self_attention_kernel(device, config.num_heads, config.head_dim, dtype)
    plain = FastPath(
        compile=False,
        self_attention=name,
        kernels=Kernels(attention=self_attention),
        decoder_kernels=PLAIN_DECODER_KERNELS,
        sdpa_backends=attention.sdpa_backends_for(device),
        fp8=fp8,
    )
    if not compile:
        return plain
    return FastPath(
        compile=True,
        self_attention=name,
        kernels=Kernels(attention=self_attention, sma_key_set=compiled(memory.sma_key_set), linear_gelu=LinearGELU),
        decoder_kernels=fused_decoder_kernels(),
        graphed_passes=GraphedPasses,
        sdpa_backends=plain.sdpa_backends,
        fp8=fp8,
    )
