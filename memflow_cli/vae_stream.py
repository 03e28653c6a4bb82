"""The Wan2.1 VAE decoder as a stream: memflow's decoder modules (`wan_vae.py`), with causal bookkeeping.

The decoder is causal in time: each 3-D conv with a temporal kernel of 3 sees the current frames and the
two input frames before them. diffusers keeps those two frames in a list (`feat_cache`) and, for every conv
of every call, clones them, concatenates them in front of the new frames and pads the result spatially:
about nine frame copies per conv whose own input is three frames. At 832x480 those copies cost as much GPU
time as the convolutions themselves.

`DecoderStream` walks the decoder's modules (`wan_vae.WanDecoder`, diffusers' names and weights) in the
official order (the Wan2.1 layout: conv_in, mid block, up blocks, norm_out, conv_out) but gives each causal
conv a persistent history of its last two input frames (`CausalConvCache`: allocated once and updated in
place, so a CUDA graph of a call stays valid). A call assembles `[history | new frames]` in a scratch
window: the RMS norm + SiLU before a conv writes its output straight into the window, the conv pads
spatially by itself, and only the two newest frames are copied back into the history. The steps between
convs are `DecoderKernels`, which the CUDA paths swap for faster ones (`speed/decoder.py`). The arithmetic
is the official Wan VAE's: every RMS norm (the mid block's attention included) normalises in the
activation dtype as the official code does, where diffusers >= 0.38 upcasts bfloat16 to float32. On the
CPU the frames are bit for bit the official ones in float32 and bfloat16 (`tests/test_codec_parity.py`);
the memory traffic around each conv drops to about a third.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .wan_vae import AttentionBlock, CausalConv3d, Resample, ResidualBlock, RMSNorm, UpBlock, WanDecoder

# Writes SiLU(RMS norm of x + x_bias) into out: (out, x, x_bias or None, gamma, beta, scale).
NormSiLUInto = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | float, float], None
]
# x + x_bias + shortcut: (x, x_bias or None, shortcut).
ResidualSum = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]
# Nearest-neighbour resize of images [N, C, H, W]: (images, scale_factor, mode).
Upsample = Callable[[torch.Tensor, tuple[float, float], str], torch.Tensor]
# Fills a conv's window slot from the layer's input: (slot, x).
Fill = Callable[[torch.Tensor, torch.Tensor], None]


def plus_bias(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [B, C, ...] plus a per-channel bias [C] (None: nothing to add), rounded to x's dtype."""
    return x if bias is None else x + bias.view(-1, *(1,) * (x.dim() - 2))


def rms_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | float, scale: float) -> torch.Tensor:
    """RMS norm over channels (dim 1) as the official Wan VAE computes it: normalised in x's own dtype.

    diffusers' `WanRMS_norm` normalises half-precision inputs in float32 since 0.38; the official code does
    not, and in bfloat16 that one rounding spreads through the decoder to about 1% of the video.
    """
    return F.normalize(x, dim=1) * scale * gamma + beta


def rms_norm_silu(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | float, scale: float) -> torch.Tensor:
    """`rms_norm` then SiLU."""
    return F.silu(rms_norm(x, gamma, beta, scale))


def rms_norm_silu_into(
    out: torch.Tensor,
    x: torch.Tensor,
    x_bias: torch.Tensor | None,
    gamma: torch.Tensor,
    beta: torch.Tensor | float,
    scale: float,
) -> None:
    """`rms_norm_silu` of x (plus the bias its conv left out) written into `out`, a conv's window."""
    out.copy_(rms_norm_silu(plus_bias(x, x_bias), gamma, beta, scale))


def residual_sum(x: torch.Tensor, x_bias: torch.Tensor | None, shortcut: torch.Tensor) -> torch.Tensor:
    """A residual block's output: its last conv's output (plus the bias that conv left out) plus the shortcut."""
    return plus_bias(x, x_bias) + shortcut


def upsample_nearest(images: torch.Tensor, scale_factor: tuple[float, float], mode: str) -> torch.Tensor:
    """Nearest-neighbour resize; it copies values, so in the input dtype it equals diffusers' float32 round trip."""
    return F.interpolate(images, scale_factor=scale_factor, mode=mode)


@dataclass(frozen=True)
class DecoderKernels:
    """The decoder's steps between its convolutions: plain PyTorch here, compiled ones on the fast path.

    With `bias_after_conv` a residual block's two convs run without their bias and the step after each adds
    it (norm2 for conv1, the residual sum for conv2). cuDNN adds a conv's bias in a separate pass over the
    output anyway; fused into the next step, that pass over the largest activations disappears. On the CPU a
    conv adds its bias inside the kernel, so the plain kernels keep it there (bit for bit diffusers).

    With `channel_tile`, a causal conv with at least three quarters of a tile of output channels, but less
    than one, computes zero filters up to a whole tile and hands on a view of its real channels: the
    full-resolution stage has 96 channels, where cuDNN's Hopper kernels run a third slower than at 128.
    Each output channel is its own sum, so the real channels come out as they did.

    With `convs_2d` every causal conv runs as one 2-D conv: the frames its kernel sees (two from the history,
    one new) are stacked on the channel axis, so its [C_out, C_in, 3, kh, kw] filters become [C_out, 3 C_in,
    kh, kw], and all output frames of a call are one batch of images. cuDNN's 2-D bf16 kernels are faster
    than its 3-D ones for the same sums. The 1x1x1 shortcut convs become one matrix product over the
    channels of every pixel. The sums are the same, in another order: equal to float32 rounding.

    With `upsample_subpixel` the 3x3 conv after each 2x nearest upsampling runs on the small image: each of
    the four output pixels a small pixel becomes sees only 2x2 small pixels, with the 3x3 filter's taps that
    land on the same small pixel summed (`UpsampledConv`). 4/9 of the multiplications, and the upsampled
    image is never made. The summed filters are rounded once to the weights' dtype: equal to float32
    rounding in float32; in bf16 one more rounding of the filters than the official decoder.

    With `late_frames` the stages after the last time upsampling (the up blocks that keep the frame count, the
    last norm and conv) run on that many frames at a time. Each causal conv's history carries the video on from
    one piece to the next as it does from call to call, and every other step there works frame by frame, so each
    output frame is the same sum of the same inputs; the largest activations (full size, four frames per latent
    frame) are made for that many frames instead of all of a call's. The decoder runs beside generation, so its
    peak adds to the generator's.
    """

    norm_silu: NormSiLUInto = rms_norm_silu_into
    residual: ResidualSum = residual_sum
    upsample: Upsample = upsample_nearest
    bias_after_conv: bool = False
    channel_tile: int | None = None
    convs_2d: bool = False
    upsample_subpixel: bool = False
    late_frames: int | None = None


PLAIN_KERNELS = DecoderKernels()


def padded_channels(channels: int, tile: int | None) -> int:
    """A whole `tile` for between three quarters of one and one tile of channels; any other count as it is."""
    if tile is not None and 4 * channels >= 3 * tile and channels < tile:
        return tile
    return channels


def _copy_into(out: torch.Tensor, x: torch.Tensor) -> None:
    out.copy_(x)


class CausalConvCache:
    """One causal conv's state over a video: its last input frames (its history) and the filters it runs.

    The history is allocated at the conv's first call, when the frame size is known, and from then on only
    written in place; `reset` zeroes it. Filters in another form than the conv's own (tiled to
    `channel_tile`, or reshaped for `as_2d`) are made at construction and refreshed in place from the conv's
    weights at every `reset`. So every call of a video, and every video after it, reads and writes the same
    memory: a CUDA graph captured over a decoder call stays valid.

    `as_2d` computes the conv as a 2-D one over its frames stacked on the channel axis (`DecoderKernels`):
    there is no window, the fill and the history write straight into the stacked images. Its history holds
    each pixel's frames side by side ([B, h, w, keep, C] in memory), as the images do.
    """

    def __init__(self, conv: CausalConv3d, channel_tile: int | None, as_2d: bool = False):
        self.conv = conv
        self.as_2d = as_2d
        self.keep = conv.time_keep  # input frames before the current ones that the kernel sees
        self.spatial_padding = (0, *conv.spatial_padding)  # (time, h, w): time is the history
        self.out_channels = conv.out_channels
        self.channels = padded_channels(conv.out_channels, channel_tile)  # computed output channels
        self.history: torch.Tensor | None = None  # [B, C_in, keep, h, w]
        self._made: tuple[torch.Tensor, torch.Tensor] | None = None  # the filters in their computed form
        self.buffers_made = 0  # histories and computed filters allocated, first ones included
        self.buffers_moved = 0  # of those, the ones that replaced a buffer (new addresses for old state)
        if self._own_filters:
            self.filters()

    @property
    def _own_filters(self) -> bool:
        """The filters run are not the conv's own tensors (tiled or reshaped): this cache keeps a copy."""
        return self.as_2d or self.channels != self.out_channels

    @torch.inference_mode()  # the buffers were made in inference mode: only there can they change in place
    def reset(self) -> None:
        """A new video: the history is zero (a first frame's causal padding); computed filters follow the weights."""
        if self.history is not None:
            self.history.zero_()
        if self._made is not None:
            weight, bias = self._made
            if weight.device != self.conv.weight.device or weight.dtype != self.conv.weight.dtype:
                self._made = None  # the VAE moved: made again now, not in the middle of a video
                self.filters()
                self.buffers_moved += 1
            else:
                weight[: self.out_channels].copy_(self._weight_in_form())
                bias[: self.out_channels].copy_(self.conv.bias)

    @torch.inference_mode()
    def restore(self, saved: torch.Tensor) -> None:
        """Take `saved` ([B, C_in, keep, h, w], from a copy of `history`) as the history: the video goes on from it."""
        if saved.dim() != 5 or saved.shape[1] != self.conv.in_channels or saved.shape[2] != self.keep:
            raise ValueError(f"a history of shape {list(saved.shape)} does not fit a conv of {self.conv.in_channels}"
                             f" input channels keeping {self.keep} frames")  # fmt: skip
        like = saved.to(self.conv.weight.device, self.conv.weight.dtype)
        self._history_for(like).copy_(like)

    def __call__(self, x: torch.Tensor, fill: Fill, with_bias: bool = True) -> torch.Tensor:
        """conv over [history | fill(x)] ([B, C_in, keep + T, h, w]); the history is then the newest frames.

        with_bias=False leaves the conv's bias out of the result (the caller's next step adds it).
        """
        history = self._history_for(x)
        weight, bias = self.filters()
        bias = bias if with_bias else None
        if self.as_2d:
            out = self._conv_2d(x, fill, history, weight, bias)
        else:
            out = self._conv_3d(x, fill, history, weight, bias)
        return out[:, : self.out_channels]  # the real channels (a view, when the filters were tiled)

    def _conv_3d(
        self, x: torch.Tensor, fill: Fill, history: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        b, _, t, h, w = x.shape
        # the window is the one buffer a call allocates: the caching allocator (or a CUDA graph's pool) hands
        # back the same memory every call, and nothing outlives the call
        window = torch.empty(
            (b, self.conv.in_channels, self.keep + t, h, w), device=x.device, dtype=x.dtype, memory_format=_layout(x)
        )
        window[:, :, : self.keep].copy_(history)
        fill(window[:, :, self.keep :], x)
        out = F.conv3d(window, weight, bias, self.conv.stride, self.spatial_padding)
        history.copy_(window[:, :, t:])
        return out

    def _conv_2d(
        self, x: torch.Tensor, fill: Fill, history: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """The conv as a 2-D one: output frame i's kernel frames (window frames i .. i + keep) side by side
        on the channel axis, tap-major (the order of `_weight_in_form`), written straight into the images.

        Tap `keep` of output frame i is new frame i: the fill writes there. Tap k < keep of output frame i is
        window frame i + k: a history frame for the first keep - k output frames, else new frame i + k - keep,
        copied from tap `keep` of output frame i + k - keep. The images are the one buffer a call allocates.
        """
        b, _, t, h, w = x.shape
        c, keep = self.conv.in_channels, self.keep
        stacked = torch.empty((b, t, h, w, keep + 1, c), device=x.device, dtype=x.dtype)  # [B, T, h, w, kt, C]
        taps = stacked.permute(0, 5, 1, 2, 3, 4)  # [B, C, T, h, w, kt]: each tap k as a 5-D view taps[..., k]
        fill(taps[..., keep], x)
        for k in range(keep):
            from_history = min(t, keep - k)
            taps[:, :, :from_history, :, :, k].copy_(history[:, :, k : k + from_history])
            if t > from_history:
                taps[:, :, from_history:, :, :, k].copy_(taps[:, :, : t - from_history, :, :, keep])
        images = stacked.view(b * t, h, w, (keep + 1) * c).permute(0, 3, 1, 2)  # channels-last [B*T, kt*C, h, w]
        out = F.conv2d(images, weight, bias, self.conv.stride[1:], self.spatial_padding[1:])
        # the next history, window frames T .. T + keep - 1, are taps 1 .. keep of the last output frame
        history.copy_(taps[:, :, t - 1, :, :, 1:].permute(0, 1, 4, 2, 3))
        return out.unflatten(0, (b, t)).transpose(1, 2)  # [B, C_out, T, h, w]

    def _history_for(self, x: torch.Tensor) -> torch.Tensor:
        """The history buffer, made (zero) at the first call or when the frame size, dtype or device change."""
        b, _, _, h, w = x.shape
        shape = (b, self.conv.in_channels, self.keep, h, w)
        history = self.history
        if history is None or history.shape != shape or history.dtype != x.dtype or history.device != x.device:
            self.buffers_moved += history is not None
            if self.as_2d:
                history = _pixel_major_zeros(shape, x)
            else:
                history = torch.zeros(shape, device=x.device, dtype=x.dtype).contiguous(memory_format=_layout(x))
            self.history = history
            self.buffers_made += 1
        return history

    def _weight_in_form(self) -> torch.Tensor:
        """The conv's weight as it is computed: [C_out, C_in, kt, kh, kw], or [C_out, kt*C_in, kh, kw] (tap-major)."""
        weight = self.conv.weight
        if self.as_2d:
            c_out, c_in, kt, kh, kw = weight.shape
            return weight.permute(0, 2, 1, 3, 4).reshape(c_out, kt * c_in, kh, kw)
        return weight

    def filters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and bias the conv runs: its own, or this cache's copy (tiled to `channels`, reshaped)."""
        if not self._own_filters:
            return self.conv.weight, self.conv.bias
        if self._made is None:
            with torch.inference_mode():
                self._made = self._make_filters()
            self.buffers_made += 1
        return self._made

    def _make_filters(self) -> tuple[torch.Tensor, torch.Tensor]:
        conv, form = self.conv, self._weight_in_form()
        weight = form.new_zeros((self.channels, *form.shape[1:]))
        weight[: self.out_channels] = form
        bias = conv.bias.new_zeros(self.channels)
        bias[: self.out_channels] = conv.bias
        if self.as_2d:
            layout = torch.channels_last if weight.is_cuda else torch.contiguous_format
        else:
            channels_last = conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
            layout = torch.channels_last_3d if channels_last else torch.contiguous_format
        return weight.contiguous(memory_format=layout), bias


def _pixel_major_zeros(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A zero [B, C, F, h, w] tensor whose memory is [B, h, w, F, C]: each pixel's frames side by side."""
    b, c, f, h, w = shape
    return torch.zeros((b, h, w, f, c), device=like.device, dtype=like.dtype).permute(0, 4, 3, 1, 2)


# The taps of a 3x3 filter that each output row (or column) phase of a 2x nearest upsampling sees on the small
# image, [phase, small tap, 3x3 tap]: phase 0 sees the small pixel before (tap 0) and its own (taps 1 + 2),
# phase 1 its own (taps 0 + 1) and the one after (tap 2).
_SUBPIXEL_TAPS = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))


class UpsampledConv:
    """A 3x3 conv (padding 1) after a 2x nearest upsampling, computed on the small image (`upsample_subpixel`).

    Output pixel (2i + a, 2j + b) is a 2x2 conv of small pixels around (i, j) with the phase's summed filter:
    all four phases are one conv2d (4 C_out filters of 2x2, padding 1) over the small image, whose phase (a,
    b) is its output shifted by (a, b); one copy interleaves them. The summed filters are made at
    construction and refreshed in place at every `reset`, as a causal conv's are.
    """

    def __init__(self, conv: nn.Conv2d):
        self.conv = conv
        self._made: tuple[torch.Tensor, torch.Tensor] | None = None
        self.buffers_made = 0
        self.buffers_moved = 0
        self.filters()

    @staticmethod
    def applies_to(upsample: nn.Module, conv: nn.Module) -> bool:
        """The resampling is a 2x nearest upsampling then a 3x3 conv of stride 1 and padding 1."""
        nearest = getattr(upsample, "mode", None) in ("nearest", "nearest-exact")
        scale = getattr(upsample, "scale_factor", None)
        doubles = (tuple(scale) if isinstance(scale, tuple | list) else (scale, scale)) == (2.0, 2.0)
        shape_ok = isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
        return nearest and doubles and shape_ok and conv.stride == (1, 1) and conv.groups == 1 and conv.bias is not None

    def _summed_weight(self) -> torch.Tensor:
        """[4 C_out, C_in, 2, 2]: phase (a, b) at filters (2a + b) C_out, its taps summed (at least in float32)."""
        weight = self.conv.weight
        exact = torch.promote_types(weight.dtype, torch.float32)  # the sums of bf16 weights, before one rounding
        taps = torch.tensor(_SUBPIXEL_TAPS, device=weight.device, dtype=exact)  # [phase, small tap, 3x3 tap]
        summed = torch.einsum("aui,ocij,bvj->abocuv", taps, weight.to(exact), taps)
        return summed.flatten(0, 2).to(weight.dtype)

    @torch.inference_mode()
    def reset(self) -> None:
        """The summed filters follow the conv's weights (made again where the VAE moved)."""
        weight, bias = self.filters()
        if weight.device != self.conv.weight.device or weight.dtype != self.conv.weight.dtype:
            self._made = None
            self.filters()
            self.buffers_moved += 1
        else:
            weight.copy_(self._summed_weight())
            bias.copy_(self.conv.bias.repeat(4))

    def filters(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._made is None:
            with torch.inference_mode():
                layout = torch.channels_last if self.conv.weight.is_cuda else torch.contiguous_format
                self._made = (self._summed_weight().contiguous(memory_format=layout), self.conv.bias.repeat(4))
            self.buffers_made += 1
        return self._made

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, C_in, h, w] -> the conv of their 2x upsampling, [N, C_out, 2h, 2w]."""
        n, _, h, w = images.shape
        c_out = self.conv.out_channels
        weight, bias = self.filters()
        phases = F.conv2d(images, weight, bias, padding=1).unflatten(1, (2, 2, c_out))  # [N, 2, 2, C_out, h+1, w+1]
        # phase (a, b) is its output from row a and column b: the shift folds into the phase dims' strides
        s_n, s_a, s_b, s_c, s_h, s_w = phases.stride()
        shifted = phases.as_strided(
            (n, 2, 2, c_out, h, w), (s_n, s_a + s_h, s_b + s_w, s_c, s_h, s_w), phases.storage_offset()
        )
        layout = torch.channels_last if images.is_cuda else torch.contiguous_format
        out = torch.empty((n, c_out, 2 * h, 2 * w), device=images.device, dtype=images.dtype, memory_format=layout)
        out.unflatten(2, (h, 2)).unflatten(4, (w, 2)).permute(0, 3, 5, 1, 2, 4).copy_(shifted)  # [N, a, b, C, h, w]
        return out


class DecoderStream:
    """Runs a Wan2.1 `WanDecoder` call by call over one video; each causal conv keeps its own cache.

    `__call__(x)` takes the next latent frames [B, C, T, h, w] (after `post_quant_conv`) and returns their
    decoded frames; the video's first call must carry its first latent frame alone, as in the official code.
    `run(x, first)` is that call without the bookkeeping: what a CUDA graph captures (`speed/decoder.py`).
    """

    def __init__(self, decoder: WanDecoder, kernels: DecoderKernels = PLAIN_KERNELS):
        if not isinstance(decoder, WanDecoder):
            raise TypeError(f"expected memflow's Wan2.1 decoder (wan_vae.WanDecoder), got {type(decoder).__name__}")
        self.decoder = decoder
        self.kernels = kernels
        self.late_blocks = _first_late_block(decoder)  # the up blocks from here on keep the frame count
        self.caches: dict[nn.Module, CausalConvCache] = {
            conv: CausalConvCache(conv, kernels.channel_tile, kernels.convs_2d)
            for conv in decoder.modules()
            if isinstance(conv, CausalConv3d) and conv.time_keep > 0  # not the shortcuts
        }
        self.upsampled: dict[nn.Module, UpsampledConv] = {}  # the convs after 2x upsamplings, on the small image
        if kernels.upsample_subpixel:
            resamplings = (m.resample for m in decoder.modules() if isinstance(m, Resample))
            self.upsampled = {
                conv: UpsampledConv(conv) for upsample, conv in resamplings if UpsampledConv.applies_to(upsample, conv)
            }
        self.calls = 0

    def reset(self) -> None:
        """Start a new video: every history is zero again, in place (the causal padding of a first frame)."""
        for cache in (*self.caches.values(), *self.upsampled.values()):
            cache.reset()
        self.calls = 0

    def causal_state(self) -> tuple[torch.Tensor, ...]:
        """What the next frames depend on of the video so far: every causal conv's history, copied to the CPU
        (nothing before the video's first frames, when some conv has not run yet)."""
        histories = [cache.history for cache in self.caches.values()]
        if self.at_start or any(history is None for history in histories):
            return ()
        return tuple(history.to("cpu", copy=True) for history in histories)

    @property
    def causal_state_bytes(self) -> int:
        """The size of `causal_state` (0 before the video's first frames)."""
        return sum(cache.history.nbytes for cache in self.caches.values() if cache.history is not None)

    def restore(self, state: tuple[torch.Tensor, ...]) -> None:
        """Go on with a video whose `causal_state` was `state`: the next call decodes what follows it."""
        if len(state) != len(self.caches):
            raise ValueError(f"a causal state of {len(state)} histories does not fit a decoder of {len(self.caches)}")
        for cache, saved in zip(self.caches.values(), state, strict=True):
            cache.restore(saved)
        self.calls = max(self.calls, 1)

    @property
    def at_start(self) -> bool:
        """No frame of the current video has been decoded yet (the next call must carry one latent frame)."""
        return self.calls == 0

    @property
    def buffers_made(self) -> int:
        """Histories and computed filters allocated so far, over all convs."""
        return sum(cache.buffers_made for cache in (*self.caches.values(), *self.upsampled.values()))

    @property
    def buffers_moved(self) -> int:
        """Of those, the ones that replaced another (a new frame size, a moved VAE): old addresses are stale."""
        return sum(cache.buffers_moved for cache in (*self.caches.values(), *self.upsampled.values()))

    def check(self, x: torch.Tensor) -> None:
        """A video's first call carries one latent frame; else a ValueError."""
        if self.at_start and x.shape[2] != 1:
            raise ValueError(f"a video's first decoder call must carry one latent frame, got {x.shape[2]}")

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        out = self.run(x, self.at_start)
        self.calls += 1
        return out

    def run(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        """The decoder over x [B, C, T, h, w]: conv_in, mid block, up blocks, norm_out + SiLU, conv_out.

        `first`: the video's first call (the time upsamplers then skip their convolution).
        """
        d = self.decoder
        x = self.caches[d.conv_in](x, _copy_into)
        x = self._residual(d.mid_block.resnets[0], x)
        for attention, resnet in zip(d.mid_block.attentions, d.mid_block.resnets[1:], strict=True):
            x = self._residual(resnet, self._attention(attention, x))
        for block in d.up_blocks[: self.late_blocks]:
            x = self._up_block(block, x, first)
        step = self.kernels.late_frames or x.shape[2]
        pieces = [self._late_stages(x[:, :, i : i + step], first) for i in range(0, x.shape[2], step)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)

    def _late_stages(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        """The up blocks from `late_blocks` on, norm_out + SiLU and conv_out, over frames x [B, C, T, h, w]."""
        d = self.decoder
        for block in d.up_blocks[self.late_blocks :]:
            x = self._up_block(block, x, first)
        return self.caches[d.conv_out](x, self._norm_silu(d.norm_out))

    def _up_block(self, block: UpBlock, x: torch.Tensor, first: bool) -> torch.Tensor:
        for resnet in block.resnets:
            x = self._residual(resnet, x)
        if block.upsamplers is not None:
            x = self._upsample(block.upsamplers[0], x, first)
        return x

    def _norm_silu(self, norm: RMSNorm, x_bias: torch.Tensor | None = None) -> Fill:
        return lambda out, x: self.kernels.norm_silu(out, x, x_bias, norm.gamma, norm.bias, norm.scale)

    def _attention(self, block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
        """The mid block's single-head self-attention over the pixels of each frame, plus x.

        Normalised by `rms_norm` (in the activation dtype), as the whole decoder is, as the official one does.
        """
        b, c, t, h, w = x.shape
        images = x.transpose(1, 2).flatten(0, 1)  # [B*T, C, h, w]
        norm = block.norm
        qkv = block.to_qkv(rms_norm(images, norm.gamma, norm.bias, norm.scale))  # [B*T, 3C, h, w]
        q, k, v = qkv.flatten(2).transpose(1, 2).unsqueeze(1).contiguous().chunk(3, dim=-1)  # each [B*T, 1, hw, C]
        attended = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        out = block.proj(attended).unflatten(0, (b, t)).transpose(1, 2)
        return out + x

    def _residual(self, block: ResidualBlock, x: torch.Tensor) -> torch.Tensor:
        """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus the (1x1x1 conv) shortcut. Dropout: eval."""
        h = self._shortcut(block.conv_shortcut, x)
        deferred = self.kernels.bias_after_conv  # then each conv's bias is added by the step after it
        x = self.caches[block.conv1](x, self._norm_silu(block.norm1), with_bias=not deferred)
        norm2 = self._norm_silu(block.norm2, block.conv1.bias if deferred else None)
        x = self.caches[block.conv2](x, norm2, with_bias=not deferred)
        return self.kernels.residual(x, block.conv2.bias if deferred else None, h)

    def _shortcut(self, shortcut: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x, or its 1x1x1 conv: a conv3d, or with `convs_2d` one matrix product over the channels of every pixel."""
        if isinstance(shortcut, nn.Identity):
            return x
        if self.kernels.convs_2d:
            pixels = x.movedim(1, -1)  # [B, T, h, w, C]: a view of channels-last memory
            return F.linear(pixels, shortcut.weight.flatten(1), shortcut.bias).movedim(-1, 1)
        return F.conv3d(x, shortcut.weight, shortcut.bias)

    def _upsample(self, resample: Resample, x: torch.Tensor, first: bool) -> torch.Tensor:
        """Twice the frames (upsample3d, except on the video's first call), then twice the size per frame."""
        if resample.mode == "upsample3d" and not first:
            b, c, t, h, w = x.shape
            doubled = self.caches[resample.time_conv](x, _copy_into)  # [B, 2C, T, h, w]
            # channel half j of time step i becomes frame 2i + j; built frame-major so channels stay last
            frames = doubled.permute(0, 2, 3, 4, 1).unflatten(-1, (2, c)).permute(0, 1, 4, 2, 3, 5)
            x = frames.reshape(b, 2 * t, h, w, c).permute(0, 4, 1, 2, 3).contiguous(memory_format=_layout(x))
        b, c, t, h, w = x.shape
        upsample, conv = resample.resample
        images = x.transpose(1, 2).flatten(0, 1)  # [B*T, C, h, w]
        if conv in self.upsampled:
            return self.upsampled[conv](images).unflatten(0, (b, t)).transpose(1, 2)
        images = self.kernels.upsample(images, upsample.scale_factor, upsample.mode)
        return conv(images).unflatten(0, (b, t)).transpose(1, 2)


def _first_late_block(decoder: WanDecoder) -> int:
    """The index of the first up block after the decoder's last time upsampling (0 where none upsamples in time)."""
    blocks = list(decoder.up_blocks)
    in_time = [i for i, b in enumerate(blocks) if b.upsamplers is not None and b.upsamplers[0].mode == "upsample3d"]
    return in_time[-1] + 1 if in_time else 0


def _layout(x: torch.Tensor) -> torch.memory_format:
    """Channels-last on CUDA (cuDNN's fast 3-D convs); the plain layout elsewhere (bit for bit the official decoder)."""
    return torch.channels_last_3d if x.is_cuda else torch.contiguous_format
