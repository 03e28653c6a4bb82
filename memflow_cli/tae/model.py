"""The TAEHV decoder (`taew2_1`: Wan 2.1 latents -> RGB), a plain module built from a `TaehvConfig`.

Written from the facts in ../shared/parity/tae/README.md. Every convolution is 2-D and works on one frame;
time is mixed only by the memory blocks (each sees its own input of the frame before) and by the time-grow
layers (one frame becomes `s` frames). That makes the decoder causal: a video decoded chunk by chunk, with
each memory block's last input carried over (`TaeMemory`), gives the frames of decoding it whole.

The module is built in its final form, not the file's: each stage's time-grow layer, nearest upsampling and
3x3 conv are one 2x2 conv on the small frames and a pixel shuffle (`GrowUpConv`), its kernel made from the
released weights at load (`phase_kernel`, called by `weights.decoder_state`).

Tensors inside are [N*T, C, H, W] (frames batched, channels-last), with N (videos) kept beside them to find
frame t-1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TaehvConfig:
    """The decoder's shape. The default is the released `taew2_1` (Wan 2.1: 16 latent channels, 8x in space,
    4x in time); the demo model uses a narrow one (`demo.build_demo_taehv`)."""

    latent_channels: int = 16
    widths: tuple[int, ...] = (256, 128, 64)  # channels of each stage's memory blocks
    time_upscale: tuple[bool, ...] = (False, True, True)  # per stage: does its time-grow layer double the frames
    blocks_per_stage: int = 3
    rgb_channels: int = 3
    latent_clamp: float = 3.0  # the soft clamp of the input: c * tanh(x / c)

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.time_upscale) or not self.widths:
            raise ValueError(f"one time_upscale per stage: widths {self.widths}, time_upscale {self.time_upscale}")

    @property
    def frames_per_latent(self) -> int:
        """Raw frames each latent frame becomes (4 for taew2_1)."""
        return 2 ** sum(self.time_upscale)

    @property
    def trimmed_frames(self) -> int:
        """Raw frames dropped once at the start of a video, so that T latents make the Wan count 4T - 3."""
        return self.frames_per_latent - 1

    def video_frames(self, latent_frames: int) -> int:
        return self.frames_per_latent * latent_frames - self.trimmed_frames


TAEW2_1 = TaehvConfig()


def _conv3(channels_in: int, channels_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=bias)


class MemoryBlock(nn.Module):
    """relu(convs([x_t, x_{t-1}]) + x_t): three 3x3 convs over the frame and this block's input one frame back.

    With `fused_cuda`, on a CUDA tensor each conv with its bias, ReLU (and the residual) is one cuDNN call
    (`torch.cudnn_convolution_add_relu`): no separate passes over the frames for them, and one rounding in
    bf16 instead of three. `weights.prepared` chooses it where `cudnn_fusion_works` on the device and dtype.
    """

    def __init__(self, channels: int, fused_cuda: bool = False):
        super().__init__()
        self.fused_cuda = fused_cuda
        self.conv = nn.Sequential(
            _conv3(2 * channels, channels), nn.ReLU(inplace=True), _conv3(channels, channels), nn.ReLU(inplace=True),
            _conv3(channels, channels),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, with_past: torch.Tensor) -> torch.Tensor:
        """x: [N*T, C, H, W]; with_past: [N*T, 2C, H, W], x beside each frame's input one frame back."""
        if self.fused_cuda and x.is_cuda:
            first, second, third = self.conv[0], self.conv[2], self.conv[4]
            y = conv_bias_add_relu(with_past, first, x, 0.0)  # z must be finite even where alpha is 0
            y = conv_bias_add_relu(y, second, y, 0.0)
            return conv_bias_add_relu(y, third, x, 1.0)
        return self.conv(with_past).add_(x).relu_()


def conv_bias_add_relu(x: torch.Tensor, conv: nn.Conv2d, z: torch.Tensor, alpha: float) -> torch.Tensor:
    """relu(conv(x) + bias + alpha z) for a 3x3 conv with padding 1, in one cuDNN call (CUDA only)."""
    return torch.cudnn_convolution_add_relu(x, conv.weight, z, alpha, conv.bias, (1, 1), (1, 1), (1, 1), 1)


@functools.cache
def cudnn_fusion_works(device: torch.device, dtype: torch.dtype, widths: tuple[int, ...]) -> bool:
    """Whether cuDNN's fused conv + bias + add + ReLU runs on `device` in `dtype` for memory blocks of these
    widths and gives what the separate ops give (float rounding apart): tried once per process, on two small
    frames, with weights of a local generator (the global random state is left alone)."""
    if device.type != "cuda" or not torch.backends.cudnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    for width in widths:
        with torch.device("meta"):
            plain, fused = MemoryBlock(width), MemoryBlock(width, fused_cuda=True)
        state = {name: torch.randn(tensor.shape, generator=generator) / (tensor[0].numel() ** 0.5)
                 for name, tensor in plain.state_dict().items()}  # fmt: skip
        for block in (plain, fused):
            block.load_state_dict(state, assign=True)
            block.to(device=device, dtype=dtype, memory_format=torch.channels_last)
        x = torch.randn(2, width, 24, 40, generator=generator).to(device=device, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        with_past = torch.cat((x, x.roll(1, dims=0)), dim=1)
        with torch.inference_mode():
            expected = plain(x, with_past).float()
            try:
                got = fused(x, with_past).float()
            except (RuntimeError, NotImplementedError):  # this cuDNN has no fused engine for it
                return False
        if not torch.allclose(got, expected, rtol=0.05, atol=0.05 * expected.abs().max().item()):
            return False
    return True


# Nearest x2 upsampling then a 3x3 conv (padding 1): output row 2i+a sees small-image rows i-1, i, i (a = 0) or
# i, i, i+1 (a = 1), so each of the 4 output phases (a, b) is a 2x2 conv of the small image whose taps sum the
# 3x3 kernel's rows and columns that fall on the same small pixel. PHASE_TAPS[a, u, r]: kernel row r falls on
# tap u (small row i - 1 + a + u) of phase a. Zero padding of the big image is zero padding of the small one.
PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def phase_kernel(grow: torch.Tensor, conv: torch.Tensor) -> torch.Tensor:
    """A stage's time-grow weight [s*C, C, 1, 1] and its 3x3 conv [C', C, 3, 3] (run on the grown, upsampled
    frames) as one 2x2 kernel [s*4*C', C, 2, 2] on the small frames: output channel ((j*2 + a)*2 + b)*C' + c is
    channel c of time phase j (frame s*t + j) at the pixels (2i + a, 2w + b). Computed in float64."""
    factor, channels = grow.shape[0] // grow.shape[1], grow.shape[1]
    taps = PHASE_TAPS.to(torch.float64)
    per_phase = torch.einsum("aur,bvk,omrk->abomuv", taps, taps, conv.double())  # [a, b, C', C, 2, 2]
    grown = grow.double().view(factor, channels, channels)  # [j, C (grown), C (in)]
    kernel = torch.einsum("abomuv,jmi->jaboiuv", per_phase, grown)  # [j, a, b, C', C (in), 2, 2]
    return kernel.reshape(-1, channels, 2, 2)


class GrowUpConv(nn.Module):
    """The end of a stage: time-grow (a 1x1 conv, one frame -> `factor` frames), nearest x2 upsampling and a 3x3
    conv without bias, run as one 2x2 conv on the small frames (`phase_kernel`, 2.25x fewer multiplications and
    no upsampled copy) whose output channels are then spread over the frames and pixels they belong to. With
    `relu`, the ReLU that follows (the head's) runs in that copy."""

    def __init__(self, channels_in: int, channels_out: int, factor: int, relu: bool = False):
        super().__init__()
        self.factor, self.channels_out, self.relu = factor, channels_out, relu
        self.weight = nn.Parameter(torch.empty(factor * 4 * channels_out, channels_in, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, C, H, W] -> [T*factor, C', 2H, 2W], frames in time order, channels-last."""
        phases = F.conv2d(x, self.weight, padding=1)  # [T, (j, a, b, C'), H+1, W+1]
        phases = phases.contiguous(memory_format=torch.channels_last)
        return spread_phases(phases, self.factor, self.channels_out, relu=self.relu)


def spread_phases(phases: torch.Tensor, factor: int, channels: int, *, relu: bool = False) -> torch.Tensor:
    """phases [T, factor*4*C, H+1, W+1] (channels-last) -> frames [T*factor, C, 2H, 2W] (channels-last), with
    `relu` through a ReLU on the way.

    Phase (j, a, b) of small pixel (i, w) sits at row i + a, column w + b (the 2x2 conv's window for that phase
    starts a row and a column later when a, b = 1), channel ((j*2 + a)*2 + b)*C + c: every index's offset is
    linear, so one strided view [T, j, H, a, W, b, C] reads them all and one copy writes the frames.
    """
    frames, depth, rows, columns = phases.shape  # depth = factor*4*C: the channels-last stride of a pixel
    height, width = rows - 1, columns - 1
    row = columns * depth
    strides = (rows * row, 4 * channels, row, row + 2 * channels, depth, depth + channels, 1)
    view = phases.as_strided((frames, factor, height, 2, width, 2, channels), strides, phases.storage_offset())
    out = torch.empty((frames * factor, channels, 2 * height, 2 * width), dtype=phases.dtype, device=phases.device,
                      memory_format=torch.channels_last)  # fmt: skip
    target = out.permute(0, 2, 3, 1).view(view.shape)  # [T*factor, 2H, 2W, C] = [T, j, H, a, W, b, C]
    if relu:
        torch.clamp_min(view, 0.0, out=target)
    else:
        target.copy_(view)
    return out


class Stage(nn.Module):
    """Memory blocks, then time-grow, x2 nearest upsampling and a 3x3 conv to the next width as one `GrowUpConv`
    (the reference upsamples before it grows; a 1x1 conv commutes with nearest upsampling)."""

    def __init__(
        self, width: int, next_width: int, time_factor: int, blocks: int, relu_after: bool = False,
        fused_cuda: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.blocks = nn.ModuleList(MemoryBlock(width, fused_cuda) for _ in range(blocks))
        self.up = GrowUpConv(width, next_width, time_factor, relu=relu_after)


class TaeMemory:
    """What a video carries from one chunk to the next: each memory block's last input frame [N, C, H, W].

    The buffers are allocated on a video's first chunk and reused by later videos of the same size; a
    fresh (or `reset`) memory gives the first frame a past of zeros, as the video's start does.
    """

    def __init__(self) -> None:
        self.last_inputs: list[torch.Tensor] = []
        self.started = False  # a frame of this video has passed

    def reset(self) -> None:
        self.started = False

    def with_past(self, block: int, x: torch.Tensor, videos: int) -> torch.Tensor:
        """x [N*T, C, H, W] beside block `block`'s input one frame back: [N*T, 2C, H, W] (x's channels first, as
        the block's first conv reads them), written in one buffer; then remember x's last frame."""
        frames = x.view(videos, -1, *x.shape[1:])  # [N, T, C, H, W]
        channels = x.shape[1]
        last = self._last_input(block, frames[:, 0])
        both = torch.empty((x.shape[0], 2 * channels, *x.shape[2:]), dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last)  # fmt: skip
        paired = both.view(videos, -1, *both.shape[1:])  # [N, T, 2C, H, W]
        paired[:, :, :channels] = frames
        paired[:, 0, channels:] = last
        paired[:, 1:, channels:] = frames[:, :-1]
        last.copy_(frames[:, -1])
        return both

    def _last_input(self, block: int, like: torch.Tensor) -> torch.Tensor:
        """Block `block`'s buffer [N, C, H, W], zero at a video's start; (re)allocated when the size changes."""
        if block == len(self.last_inputs):
            self.last_inputs.append(torch.zeros(like.shape, dtype=like.dtype, device=like.device))
        buffer = self.last_inputs[block]
        if buffer.shape != like.shape or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self.last_inputs[block] = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
        elif not self.started:
            buffer.zero_()
        return buffer


class TaehvDecoder(nn.Module):
    """Latents [N, T, C, h, w] (as the generator makes them: no Wan un-normalisation) -> raw RGB frames
    [N, 4T, 3, 8h, 8w] before the clamp and the trim (`frames_from_raw` does both)."""

    def __init__(self, config: TaehvConfig = TAEW2_1, fused_cuda: bool = False):
        super().__init__()
        self.config, self.fused_cuda = config, fused_cuda  # fused_cuda: see MemoryBlock
        widths = config.widths
        self.stem = _conv3(config.latent_channels, widths[0])
        stages = list(zip(widths, (*widths[1:], widths[-1]), config.time_upscale, strict=True))
        self.stages = nn.ModuleList(  # the last stage's copy applies the head's ReLU
            Stage(width, next_width, 2 if grows else 1, config.blocks_per_stage, index == len(stages) - 1, fused_cuda)
            for index, (width, next_width, grows) in enumerate(stages)
        )
        self.head = _conv3(widths[-1], config.rgb_channels)

    def forward(self, latents: torch.Tensor, memory: TaeMemory | None = None) -> torch.Tensor:
        """Decode T latent frames that continue the video `memory` holds (a fresh one: a new video)."""
        memory = memory or TaeMemory()
        videos, latent_frames = latents.shape[:2]
        clamp = self.config.latent_clamp
        x = latents.flatten(0, 1).contiguous(memory_format=torch.channels_last)  # [N*T, C, h, w]
        x = self.stem(clamp * torch.tanh(x / clamp)).relu_()
        block = 0
        for stage in self.stages:
            for memory_block in stage.blocks:
                x = memory_block(x, memory.with_past(block, x, videos))
                block += 1
            x = stage.up(x)
        memory.started = True
        x = self.head(x)  # the ReLU before it ran in the last stage's copy
        return x.reshape(videos, -1, *x.shape[1:])  # [N, T * frames_per_latent, 3, H, W]


def frames_from_raw(raw: torch.Tensor, trim: int) -> torch.Tensor:
    """Raw frames [N, F, 3, H, W] -> the video's frames: clamped to [0, 1], the first `trim` dropped."""
    return raw[:, trim:].clamp(0.0, 1.0)


def decode_video(decoder: TaehvDecoder, latents: torch.Tensor) -> torch.Tensor:
    """A whole video's latents [N, T, C, h, w] -> frames [N, 4T - 3, 3, H, W] in [0, 1], in one call."""
    return frames_from_raw(decoder(latents), decoder.config.trimmed_frames)
