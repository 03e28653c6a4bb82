"""The TAEHV decoder (`taew2_1`: Wan 2.1 latents -> RGB), a plain module built from a `TaehvConfig`.

Written from the facts in ../shared/parity/tae/README.md. Every convolution is 2-D and works on one frame;
time is mixed only by the memory blocks (each sees its own input of the frame before) and by the time-grow
layers (one frame becomes `s` frames). That makes the decoder causal: a video decoded chunk by chunk, with
each memory block's last input carried over (`TaeMemory`), gives the frames of decoding it whole.

Tensors inside are [N*T, C, H, W] (frames batched), with N (videos) kept beside them to find frame t-1.
"""

from __future__ import annotations

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
    """relu(convs([x_t, x_{t-1}]) + x_t): three 3x3 convs over the frame and this block's input one frame back."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            _conv3(2 * channels, channels), nn.ReLU(), _conv3(channels, channels), nn.ReLU(), _conv3(channels, channels)
        )

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """x, past: [N*T, C, H, W] (past: each frame's input one frame back)."""
        return F.relu(self.conv(torch.cat((x, past), dim=1)) + x)


class TimeGrow(nn.Module):
    """A 1x1 conv to `factor` x C channels; channel slice j of frame t becomes frame factor*t + j."""

    def __init__(self, channels: int, factor: int):
        super().__init__()
        self.factor = factor
        self.conv = nn.Conv2d(channels, channels * factor, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N*T, C, H, W] -> [N*T*factor, C, H, W], frames in time order (channels-last in memory)."""
        if self.factor == 1:
            return self.conv(x)
        frames, channels, height, width = x.shape
        y = self.conv(x).permute(0, 2, 3, 1)  # [T, H, W, factor*C]: a view where the conv wrote channels-last
        y = y.reshape(frames, height, width, self.factor, channels).permute(0, 3, 1, 2, 4)  # [T, j, H, W, C]
        y = y.reshape(frames * self.factor, height, width, channels)  # frame factor*t + j
        return y.permute(0, 3, 1, 2)


class Stage(nn.Module):
    """Memory blocks, then x2 nearest upsampling, the time-grow layer and a 3x3 conv to the next width (the
    reference's order; `TaehvDecoder.forward` grows before it upsamples, which gives the same frames)."""

    def __init__(self, width: int, next_width: int, time_factor: int, blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(MemoryBlock(width) for _ in range(blocks))
        self.grow = TimeGrow(width, time_factor)
        self.conv = _conv3(width, next_width, bias=False)


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

    def past(self, block: int, x: torch.Tensor, videos: int) -> torch.Tensor:
        """Block `block`'s input one frame back for every frame of x [N*T, C, H, W]; then remember x's last."""
        frames = x.view(videos, -1, *x.shape[1:])  # [N, T, C, H, W]
        last = self._last_input(block, frames[:, 0])
        past = torch.empty_like(x)  # x's memory format
        shifted = past.view(frames.shape)
        shifted[:, 0] = last
        shifted[:, 1:] = frames[:, :-1]
        last.copy_(frames[:, -1])
        return past

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

    def __init__(self, config: TaehvConfig = TAEW2_1):
        super().__init__()
        self.config = config
        widths = config.widths
        self.stem = _conv3(config.latent_channels, widths[0])
        self.stages = nn.ModuleList(
            Stage(width, next_width, 2 if grows else 1, config.blocks_per_stage)
            for width, next_width, grows in zip(widths, (*widths[1:], widths[-1]), config.time_upscale, strict=True)
        )
        self.head = _conv3(widths[-1], config.rgb_channels)

    def forward(self, latents: torch.Tensor, memory: TaeMemory | None = None) -> torch.Tensor:
        """Decode T latent frames that continue the video `memory` holds (a fresh one: a new video)."""
        memory = memory or TaeMemory()
        videos, latent_frames = latents.shape[:2]
        clamp = self.config.latent_clamp
        x = latents.flatten(0, 1).contiguous(memory_format=torch.channels_last)  # [N*T, C, h, w]
        x = F.relu(self.stem(clamp * torch.tanh(x / clamp)))
        block = 0
        for stage in self.stages:
            for memory_block in stage.blocks:
                x = memory_block(x, memory.past(block, x, videos))
                block += 1
            # the reference upsamples, then grows in time: a 1x1 conv commutes with nearest upsampling, so it
            # runs first, on a quarter of the pixels
            x = stage.conv(F.interpolate(stage.grow(x), scale_factor=2.0, mode="nearest"))
        memory.started = True
        x = self.head(F.relu(x))
        return x.reshape(videos, -1, *x.shape[1:])  # [N, T * frames_per_latent, 3, H, W]


def frames_from_raw(raw: torch.Tensor, trim: int) -> torch.Tensor:
    """Raw frames [N, F, 3, H, W] -> the video's frames: clamped to [0, 1], the first `trim` dropped."""
    return raw[:, trim:].clamp(0.0, 1.0)


def decode_video(decoder: TaehvDecoder, latents: torch.Tensor) -> torch.Tensor:
    """A whole video's latents [N, T, C, h, w] -> frames [N, 4T - 3, 3, H, W] in [0, 1], in one call."""
    return frames_from_raw(decoder(latents), decoder.config.trimmed_frames)


# -- random weights -----------------------------------------------------------------------------------------

# gains of the fixtures' random weights (std = gain / sqrt(fan_in)): activations stay O(1) through the decoder
_GAIN_RELU, _GAIN_BLOCK_LAST, _GAIN_1X1, _GAIN_RGB = 2.0**0.5, 0.6, 1.0, 0.12
_BIAS_STD, _RGB_BIAS = 0.05, 0.5


def random_taehv(config: TaehvConfig = TAEW2_1, seed: int = 0) -> TaehvDecoder:
    """A decoder with seeded random weights whose output is a plausible image range (mean ~0.5, in [0, 1])
    rather than a constant: the demo model's and the random-weights model's decoder."""
    generator = torch.Generator().manual_seed(seed)
    decoder = TaehvDecoder(config)
    with torch.no_grad():
        for name, module in decoder.named_modules():
            if not isinstance(module, nn.Conv2d):
                continue
            gain = _gain(name, module)
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            module.weight.normal_(0.0, gain / fan_in**0.5, generator=generator)
            if module is decoder.head:
                module.weight -= module.weight.mean(dim=(1, 2, 3), keepdim=True)
            if module.bias is not None:
                module.bias.normal_(0.0, _BIAS_STD, generator=generator)
                if module is decoder.head:
                    module.bias += _RGB_BIAS
    return decoder.eval().requires_grad_(False)


def _gain(name: str, conv: nn.Conv2d) -> float:
    if name == "head":
        return _GAIN_RGB
    if name.endswith("conv.4"):
        return _GAIN_BLOCK_LAST
    return _GAIN_1X1 if conv.kernel_size == (1, 1) else _GAIN_RELU
