"""Speed, applied from outside the model in one place: attention kernel choice and regional compile.

The model code stays plain eager PyTorch. `accelerate` compiles the two pure
per-block steps (everything but the cache read/write and the attention call),
hands self-attention to flash-attn 3 where it is installed and works
(`self_attention_kernel`), and `attention_kernels` picks the fastest SDPA
backend the machine has for the rest.
`fused_decoder_kernels` are the VAE decoder's steps between convolutions as
compiled kernels: its RMS norm and the SiLU after it (seven full passes over the
largest activations of the whole pipeline in eager mode, one fused), the residual
sum with the biases of the residual blocks' convs folded in, and the
nearest-neighbour upsampling.

Decoding runs on a worker thread beside generation (`overlap.py`), and torch.compile
is not thread-safe: while one thread traces a new graph, a compiled call on another
thread fails. `compiled` therefore serialises every call of a compiled function
(compiling or not) under one lock; the lock is held for a kernel launch, not for
the GPU's work.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .model import memory
from .model.transformer import Block, CausalWanTransformer, PassState
from .vae_stream import PLAIN_KERNELS, DecoderKernels, residual_sum, rms_norm_silu_into, upsample_nearest

# fastest first on Hopper at MemFlow's shapes: cuDNN, then flash, then memory-efficient
CUDA_BACKENDS = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


# Graphs that one compiled function may build before dynamo gives up and runs it eagerly.
MODEL_GRAPHS = 16  # per pass kind, and SMA's key set per bank view and window length while the cache fills
# one per input shape and layout (strided views of tiled convs, with or without a bias) a decoder step
# sees: about 20 at one latent frame per call, 45 when a whole chunk passes at once
VAE_GRAPHS = 64


SDPA = "sdpa"
FLASH_ATTENTION_3 = "flash-attn 3"
# A self-attention kernel is trusted when its output on a test problem is this close to SDPA's in float32
# (relative L2): bf16 rounding gives about 2e-3, a kernel that mixes up heads and tokens about 1.
FAITHFUL_ATTENTION = 1e-2

AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # q, k, v [B, H, N, D]


def attention_backend_name(model: CausalWanTransformer) -> str:
    """What computes the model's attention, for reports."""
    if next(model.parameters()).device.type != "cuda":
        return "sdpa (cpu)"
    sdpa = "sdpa: " + " > ".join(b.name.lower() for b in CUDA_BACKENDS)
    name = getattr(model, "self_attention_name", SDPA)
    return sdpa if name == SDPA else f"{name} for self-attention, {sdpa} for cross-attention"


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
    SDPA otherwise, whose backend `attention_kernels` picks. The name says which module ran.
    """
    sdpa = (SDPA, F.scaled_dot_product_attention)
    found = flash_attention_3() if flash_attention_3_may_run(device, dtype) else None
    if found is None:
        return sdpa
    name = f"{FLASH_ATTENTION_3} ({found[0]})"
    attention = checked_attention(name, heads_last(found[1]), heads, head_dim, device, dtype)
    return sdpa if attention is None else (name, attention)


@contextlib.contextmanager
def attention_kernels(device: torch.device) -> Iterator[None]:
    """Within this block, SDPA prefers cuDNN attention, then flash, on CUDA."""
    if device.type != "cuda":
        yield
        return
    with sdpa_kernel(CUDA_BACKENDS, set_priority=True):
        yield


_COMPILED_CALLS = threading.RLock()


def compiled(function: Callable[..., Any], options: dict[str, Any] | None = None) -> Callable[..., Any]:
    """`torch.compile(function)` with static shapes, callable from any thread (one call at a time).

    `options` are Inductor settings for this function alone.
    """
    graph = torch.compile(function, dynamic=False, options=options)

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        with _COMPILED_CALLS:
            return graph(*args, **kwargs)

    return call


def accelerate(model: CausalWanTransformer, *, compile: bool) -> None:
    """Pick the self-attention kernel; with `compile`, fuse each block's q/k/v matmuls and FFN activation and
    compile its pure steps (static shapes: few graphs)."""
    param = next(model.parameters())
    device = param.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if not hasattr(model, "self_attention_name"):
        config = model.config
        model.self_attention_name, attention = self_attention_kernel(
            device, config.num_heads, config.head_dim, param.dtype
        )
        for block in model.blocks:
            block.self_attn.attention = attention
    if not compile or getattr(model, "compiled", False):
        return
    model.compiled = True
    _allow_recompiles(MODEL_GRAPHS)
    sma_key_set = compiled(memory.sma_key_set)
    for block in model.blocks:
        block.self_attn.fuse_qkv()
        fuse_ffn_activation(block)
        block.self_attn.sma_key_set = sma_key_set
        block.attention_inputs = compiled(block.attention_inputs)
        block.after_attention = compiled(block.after_attention)


class LinearGELU(nn.Module):
    """A Linear layer and the tanh-GELU after it as one matmul whose epilogue adds the bias and applies GELU.

    On CUDA, where cuBLASLt takes the call (bf16 and float32 at the transformer's shapes), that is its GELU
    epilogue (the tanh form) applied to the float32 accumulator before the single rounding to the output
    dtype: faster than a matmul plus a separate GELU pass, and slightly closer to float32. Elsewhere it is
    the plain Linear and GELU.
    Holds the Linear's own parameters, so the checkpoint names stay as they were.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:  # the CPU kernel of `_addmm_activation` applies the exact (erf) GELU: not ours
            return F.gelu(F.linear(x, self.weight, self.bias), approximate="tanh")
        flat = torch._addmm_activation(self.bias, x.flatten(0, -2), self.weight.t(), use_gelu=True)
        return flat.unflatten(0, x.shape[:-1])


def fuse_ffn_activation(block: Block) -> None:
    """Run a block's first FFN Linear and its GELU as one `LinearGELU` (same parameters, same names)."""
    if isinstance(block.ffn[0], LinearGELU):
        return
    block.ffn[0] = LinearGELU(block.ffn[0])
    block.ffn[1] = nn.Identity()


def accelerate_vae(vae: torch.nn.Module) -> None:
    """Channels-last layout and cuDNN autotuning for the VAE's convolutions on CUDA.

    The decoder's compiled kernels are handed to each video's decoder: `decoder_kernels_for`.
    """
    if next(vae.parameters()).device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    for module in vae.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
        elif isinstance(module, torch.nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)


def passes_for(compiled: bool) -> type[GraphedPasses] | None:
    """What the generator runs its passes through: CUDA graph replays on the fast path, the model otherwise."""
    return GraphedPasses if compiled else None


def decoder_kernels_for(compiled: bool) -> DecoderKernels:
    """The decoder's steps between convolutions: compiled kernels on the fast path, plain PyTorch otherwise."""
    return fused_decoder_kernels() if compiled else PLAIN_KERNELS


@functools.cache
def fused_decoder_kernels() -> DecoderKernels:
    """The VAE decoder's norm + SiLU, residual sum and upsampling as compiled kernels (made once; CUDA).

    The norm + SiLU and the residual sum add the bias a residual block's conv leaves out, and read the
    real channels of a conv computed with tiled filters (96 channels computed as 128: a third faster on
    Hopper). Intermediate results are rounded to the activation dtype where eager PyTorch rounds them
    (`emulate_precision_casts`), so a fused step computes what the plain one does, in one pass over
    memory instead of several.
    """
    _allow_recompiles(VAE_GRAPHS)
    as_eager = _eager_rounding()
    return DecoderKernels(
        norm_silu=compiled(rms_norm_silu_into, as_eager),
        residual=compiled(residual_sum, as_eager),
        upsample=compiled(upsample_nearest),
        bias_after_conv=True,
        channel_tile=128,
    )


def _eager_rounding() -> dict[str, Any] | None:
    """Inductor's option to round where eager PyTorch rounds, where this torch has it (else its default)."""
    import torch._inductor.config as inductor

    return {"emulate_precision_casts": True} if hasattr(inductor, "emulate_precision_casts") else None


def _allow_recompiles(graphs: int) -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), graphs))


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor  # static input latents
    rope: tuple[torch.Tensor, torch.Tensor]  # static cos/sin tables
    out: torch.Tensor  # static output, overwritten by the next replay


class GraphedPasses:
    """The transformer's passes for one video, replayed from CUDA graphs once they repeat.

    A pass is fixed by its input shape, its timestep, its cache layout, bank view and SMA setting; the
    cache and text buffers of one video never move. The first `eager_runs` passes of each kind run
    normally (compiling and autotuning), the next one is captured, and every later one is a single
    graph replay: thousands of kernel launches become one, and the GPU no longer waits between kernels.
    Passes that never repeat (the cache filling up, a prompt switch's re-cache) stay eager. A pass's output
    is valid until the next pass: the graphs share one memory pool, so any later replay may overwrite it.
    A capture synchronises the device once; replays never do.
    """

    def __init__(self, model: CausalWanTransformer, eager_runs: int = 1):
        self.model = model
        self.eager_runs = eager_runs
        self.graphs: dict[tuple, _Graph] = {}
        self.runs: dict[tuple, int] = {}
        self.uncapturable: set[tuple] = set()
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, x: torch.Tensor, timestep: float, state: PassState) -> torch.Tensor:
        key = (tuple(x.shape), float(timestep), state.plan.layout, state.bank_view, state.sma_top_k)
        graph = self.graphs.get(key)
        if graph is None:
            self.runs[key] = self.runs.get(key, 0) + 1
            if self.runs[key] <= self.eager_runs or key in self.uncapturable:
                return self.model(x, timestep, state)
            try:
                graph = self.graphs[key] = self._capture(x, timestep, state)
            except RuntimeError as error:  # this torch/GPU cannot capture the pass: it stays eager, still correct
                warnings.warn(f"CUDA graph capture failed, running this pass eagerly: {error}", stacklevel=2)
                self.uncapturable.add(key)
                return self.model(x, timestep, state)
        graph.x.copy_(x)
        for static, table in zip(graph.rope, state.rope, strict=True):
            static.copy_(table)
        graph.graph.replay()
        return graph.out

    def _capture(self, x: torch.Tensor, timestep: float, state: PassState) -> _Graph:
        static_x = x.clone()
        rope = (state.rope[0].clone(), state.rope[1].clone())
        graph = torch.cuda.CUDAGraph()
        # thread-local: the decode worker keeps launching on its own stream while this thread captures
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self.model(static_x, timestep, replace(state, rope=rope))
        return _Graph(graph, static_x, rope, out)
