"""The VAE decoder on CUDA: channels-last convolutions, its calls replayed from CUDA graphs (off by default:
captures failed on torch 2.11, see `decode.StreamingDecoder`), compiled steps, causal convs as 2-D convs.

`DecoderGraphs` replays each decoder call from a CUDA graph (one per call shape): the few hundred kernel
launches of a call cost one. The compiled steps (the fast path's option) are its RMS norm and the SiLU
after it (seven full passes over the largest activations of the whole pipeline in eager mode, one fused),
the residual sum with the biases of the residual blocks' convs folded in, and the nearest-neighbour
upsampling.
"""

from __future__ import annotations

import contextlib
import enum
import functools
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..vae_stream import (
    PLAIN_KERNELS,
    DecoderKernels,
    DecoderStream,
    plus_bias,
    residual_sum,
    rms_norm_silu_into,
    upsample_nearest,
)
from ..wan_vae import WanVAE
from .compile import compiled, eager_rounding
from .process import compile_settings


def channels_last_convs(vae: WanVAE) -> None:
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


def rms_norm_silu_over_channels_into(
    out: torch.Tensor,
    x: torch.Tensor,
    x_bias: torch.Tensor | None,
    gamma: torch.Tensor,
    beta: torch.Tensor | float,
    scale: float,
) -> None:
    """`rms_norm_silu_into` from two of torch's own kernels, no compiler: its RMS norm over the last dim, then SiLU.

    In channels-last memory the channels are the last dim, so `F.rms_norm` normalises x [B, C, T, h, w] as rows
    of C (fused on CUDA, in float32 for bf16 input, one rounding), and SiLU writes straight into `out`: two
    passes over memory where the plain steps take about seven. The official norm is `normalize(x) * scale *
    gamma`, and normalize(x) * sqrt(C) is x / rms(x); its rounding in bf16 differs from the official one's
    (fewer roundings), so this is the CUDA eager path's step, not the CPU's.
    """
    x = plus_bias(x, x_bias)
    channels = x.shape[1]
    weight = gamma.reshape(channels)
    if scale != channels**0.5:
        weight = weight * (scale / channels**0.5)
    # eps: normalize divides by max(|x|, 1e-12), i.e. by sqrt(mean(x^2) + 1e-24 / C) * sqrt(C) near zero
    normed = F.rms_norm(x.movedim(1, -1), (channels,), weight, eps=1e-24 / channels)  # [B, T, h, w, C]
    if isinstance(beta, torch.Tensor):
        normed = normed + beta.reshape(channels)
    torch.ops.aten.silu.out(normed.movedim(-1, 1), out=out)


# The full-size stages of the CUDA decoders two frames at a time (`late_frames`): a latent frame's four frames at
# once held about 2.2 GiB more at the peak than the TAEHV decoder's path on an H100 (11.33 against 9.09 GiB, bench).
CUDA_LATE_FRAMES = 2
# The CUDA decoder without a compiler: torch's RMS norm + SiLU, 96-channel convs computed as 128 (`channel_tile`).
# Biases stay inside the convs: no eager step after a conv could add them for free.
EAGER_CUDA_KERNELS = DecoderKernels(
    norm_silu=rms_norm_silu_over_channels_into, channel_tile=128, late_frames=CUDA_LATE_FRAMES
)
# The same with every causal conv computed as a 2-D conv over its stacked frames (`DecoderKernels.convs_2d`) and
# the convs after the 2x upsamplings on the small images (`upsample_subpixel`).
EAGER_CUDA_2D_KERNELS = replace(EAGER_CUDA_KERNELS, convs_2d=True, upsample_subpixel=True)


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
        late_frames=CUDA_LATE_FRAMES,
    )


class DecoderKernelSet(enum.Enum):
    """The decoder's kernel sets by name (`tests/gpu_tools/decoder_speed.py` times each on the GPU)."""

    PLAIN = "plain"  # plain PyTorch steps, 3-D convs: the CPU's, bit for bit the official decoder there
    EAGER_CUDA = "eager-cuda"  # torch's RMS norm + SiLU, 96 channels computed as 128, no compiler
    EAGER_CUDA_2D = "eager-cuda-2d"  # eager-cuda, causal convs as 2-D convs, upsampling convs on the small image
    COMPILED = "compiled"  # Inductor's fused steps, biases folded into them (the --compile path)
    COMPILED_2D = "compiled-2d"  # compiled, causal convs as 2-D convs, upsampling convs on the small image

    def kernels(self) -> DecoderKernels:
        """The set itself (a compiled one is made, once, on first use)."""
        if self in (DecoderKernelSet.COMPILED, DecoderKernelSet.COMPILED_2D):
            as_2d = self is DecoderKernelSet.COMPILED_2D
            return replace(fused_decoder_kernels(), convs_2d=as_2d, upsample_subpixel=as_2d)
        return {
            DecoderKernelSet.PLAIN: PLAIN_KERNELS,
            DecoderKernelSet.EAGER_CUDA: EAGER_CUDA_KERNELS,
            DecoderKernelSet.EAGER_CUDA_2D: EAGER_CUDA_2D_KERNELS,
        }[self]


# The decoder of the CUDA paths that compile nothing (eager, graphed, triton): on an H100 (issue #25,
# decoder_speed.py) a steady 12-frame chunk took 211 ms plain, 171 ms eager-cuda, 180 ms eager-cuda-2d and
# 124 ms compiled (21.8 s of compile), eager-cuda's bf16 error the lowest (relative L2 0.0154, bar 0.0190).
EAGER_CUDA_DECODER = DecoderKernelSet.EAGER_CUDA


@dataclass(frozen=True)
class CallShape:
    """What a decoder call's graph depends on besides the caches' buffers."""

    first: bool  # the video's first call: the time upsamplers skip their convolution
    shape: tuple[int, ...]  # the latent frames' [B, C, T, h, w]
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class CapturedCall:
    """One decoder call captured as a CUDA graph, with the input it reads and the output it writes."""

    graph: torch.cuda.CUDAGraph
    input: torch.Tensor
    output: torch.Tensor

    @property
    def pool(self) -> tuple[int, int]:
        """The memory pool the graph allocated from: the one later captures of its decoder share."""
        return self.graph.pool()

    def replay(self, x: torch.Tensor) -> torch.Tensor:
        """The call on x, on the current stream of x's device; the frames are copied out (the next replay
        overwrites them)."""
        with torch.cuda.device(x.device):  # the decode device need not be the current one
            self.input.copy_(x)
            self.graph.replay()
            return self.output.clone()


class DecoderGraphs:
    """Runs a `DecoderStream`'s calls on CUDA from CUDA graphs, one per call shape, each captured at its second use.

    A shape's first call runs eagerly: it is the warm-up capture needs (cuDNN's plans, compiled steps, every
    conv's history and filters made at their addresses) and its frames are the video's own. The second call
    captures (capturing runs nothing), then replays; later calls replay. A video's first call (one latent
    frame, no time upsampling) and the later ones are different graphs, and so is every number of frames per
    call. Warm-up and capture run on the decoder's own stream (ordered after the caller's queued work, and the
    caller's next work after them), capture through `torch.cuda.graph` in thread-local mode, so that
    generation in another thread goes on launching meanwhile; a replay runs on the caller's current stream
    (the decode worker's side stream).

    Memory pool: the decoder's graphs share one, the pool of its first live graph; when every graph is
    dropped, the next capture starts a new one. The caching allocator keeps a pool's entry after its last
    graph is freed (until its memory goes back to the device) and refuses to capture into it again: sharing
    one pool handle across decoders, or across a drop, failed every capture after the first decoder's with
    its internal assert `use_count > 0` (torch 2.11, H100). A dead decoder's pool stays reserved until the
    allocator next empties its cache (each capture does, and so does an allocation that would run out).

    The caches' buffers never move (`CausalConvCache`); where they are made again (another frame size, a VAE
    moved to another device or dtype), or a weight tensor is replaced, every graph is dropped and captured anew.
    """

    def __init__(self, stream: DecoderStream):
        self.stream = stream
        self._graphs: dict[CallShape, CapturedCall] = {}
        self._seen: set[CallShape] = set()  # shapes run eagerly since the buffers were made
        self._buffers_moved = stream.buffers_moved
        self._weights = self._weight_addresses()
        self._pool: tuple[int, int] | None = None  # the live graphs' pool; None: the next capture makes one
        self._own_stream: torch.cuda.Stream | None = None

    @property
    def shapes(self) -> tuple[CallShape, ...]:
        """The call shapes captured so far."""
        return tuple(self._graphs)

    @property
    def pool(self) -> tuple[int, int] | None:
        """The memory pool of the live graphs (None while there is none)."""
        return self._pool

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        stream = self.stream
        stream.check(x)
        self._drop_stale_graphs()
        key = CallShape(stream.at_start, tuple(x.shape), x.dtype, x.device)
        captured = self._graphs.get(key)
        if captured is None and key in self._seen:
            captured = self._graphs[key] = self._capture(key, x)
        if captured is None:
            out = self._warm_up(key, x)  # this shape's first call (it may make, or move, caches' buffers)
            self._drop_stale_graphs()
            self._seen.add(key)
        else:
            out = captured.replay(x)
        stream.calls += 1
        return out

    def _weight_addresses(self) -> tuple[int, ...]:
        return tuple(parameter.data_ptr() for parameter in self.stream.decoder.parameters())

    def _drop_stale_graphs(self) -> None:
        """Forget every graph (and warm-up) when a cache's buffer or a weight tensor was replaced since (`vae.to`,
        new `.data`): the graphs would read the old addresses. Weights changed in place need nothing."""
        moved, weights = self.stream.buffers_moved, self._weight_addresses()
        if moved != self._buffers_moved or weights != self._weights:
            self._graphs.clear()
            self._seen.clear()
            self._pool = None  # its graphs are gone: the allocator would refuse it to the next capture
            self._buffers_moved, self._weights = moved, weights

    def _capture(self, key: CallShape, x: torch.Tensor) -> CapturedCall:
        """Capture the call of this shape into the decoder's pool (the first capture since a drop makes it)."""
        captured = self._capture_graph(key, x, self._pool)
        if self._pool is None:
            self._pool = captured.pool
        return captured

    @contextlib.contextmanager
    def _on_own_stream(self, device: torch.device) -> Iterator[torch.cuda.Stream | None]:
        """Work in this block runs on the decoder's own stream of `device`, after the caller's queued work and
        before the caller's next; on the CPU, as it is (None)."""
        if device.type != "cuda":
            yield None
            return
        with torch.cuda.device(device):  # the decode device need not be the current one
            if self._own_stream is None or self._own_stream.device != device:
                self._own_stream = torch.cuda.Stream(device)
            current = torch.cuda.current_stream(device)
            self._own_stream.wait_stream(current)
            with torch.cuda.stream(self._own_stream):
                yield self._own_stream
            current.wait_stream(self._own_stream)

    def _warm_up(self, key: CallShape, x: torch.Tensor) -> torch.Tensor:
        """The shape's first call, run eagerly on the stream its capture will use (cuBLAS and cuDNN set up there)."""
        caller = torch.cuda.current_stream(x.device) if x.is_cuda else None
        with self._on_own_stream(x.device):
            out = self.stream.run(x, key.first)
        if caller is not None:
            out.record_stream(caller)  # made on the decoder's stream, read on the caller's
        return out

    def _capture_graph(self, key: CallShape, x: torch.Tensor, pool: tuple[int, int] | None) -> CapturedCall:
        made = self.stream.buffers_made
        with self._on_own_stream(x.device) as own:
            static_input = x.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=own, capture_error_mode="thread_local"):
                static_output = self.stream.run(static_input, key.first)
        if self.stream.buffers_made != made:
            raise RuntimeError("a decoder cache was allocated during CUDA graph capture (its warm-up missed it)")
        return CapturedCall(graph, static_input, static_output)
