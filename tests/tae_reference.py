"""The TAEHV decoder as it ran before its stages became phase convolutions: the reference's layer order
(memory blocks with a separate past and a concatenation, a time-grow 1x1 conv, nearest x2 upsampling, a 3x3
conv on the big frames). Kept for comparison only: tests check the production module against it, and
`tests/gpu_tools/tae_speed.py` times both. Built from a released-layout state dict."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memflow_cli.tae.model import TAEW2_1, TaehvConfig


def _conv3(channels_in: int, channels_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=bias)


class PlainMemoryBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            _conv3(2 * channels, channels), nn.ReLU(), _conv3(channels, channels), nn.ReLU(), _conv3(channels, channels)
        )

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat((x, past), dim=1)) + x)


class PlainTimeGrow(nn.Module):
    def __init__(self, channels: int, factor: int):
        super().__init__()
        self.factor = factor
        self.conv = nn.Conv2d(channels, channels * factor, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, C, H, W] -> [T*factor, C, H, W]: channel slice j of frame t is frame factor*t + j."""
        if self.factor == 1:
            return self.conv(x)
        frames, channels, height, width = x.shape
        y = self.conv(x).permute(0, 2, 3, 1)  # [T, H, W, factor*C]
        y = y.reshape(frames, height, width, self.factor, channels).permute(0, 3, 1, 2, 4)  # [T, j, H, W, C]
        return y.reshape(frames * self.factor, height, width, channels).permute(0, 3, 1, 2)


class PlainStage(nn.Module):
    def __init__(self, width: int, next_width: int, time_factor: int, blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(PlainMemoryBlock(width) for _ in range(blocks))
        self.grow = PlainTimeGrow(width, time_factor)
        self.conv = _conv3(width, next_width, bias=False)


def past_of(memory: list[torch.Tensor | None], block: int, x: torch.Tensor, videos: int) -> torch.Tensor:
    """Each frame's input one frame back for block `block` (`memory[block]`: its last input so far)."""
    frames = x.view(videos, -1, *x.shape[1:])  # [N, T, C, H, W]
    if len(memory) == block:
        memory.append(None)
    last = memory[block] if memory[block] is not None else torch.zeros_like(frames[:, 0])
    past = torch.empty_like(x)
    shifted = past.view(frames.shape)
    shifted[:, 0] = last
    shifted[:, 1:] = frames[:, :-1]
    memory[block] = frames[:, -1].clone()
    return past


class PlainTaehv(nn.Module):
    """Latents [N, T, C, h, w] -> raw frames [N, 4T, 3, 8h, 8w]; `memory` (a list, empty for a new video) holds
    each block's last input between calls."""

    def __init__(self, config: TaehvConfig = TAEW2_1):
        super().__init__()
        self.config = config
        widths = config.widths
        self.stem = _conv3(config.latent_channels, widths[0])
        self.stages = nn.ModuleList(
            PlainStage(width, next_width, 2 if grows else 1, config.blocks_per_stage)
            for width, next_width, grows in zip(widths, (*widths[1:], widths[-1]), config.time_upscale, strict=True)
        )
        self.head = _conv3(widths[-1], config.rgb_channels)

    def forward(self, latents: torch.Tensor, memory: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        memory = [] if memory is None else memory
        videos = latents.shape[0]
        clamp = self.config.latent_clamp
        x = latents.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        x = F.relu(self.stem(clamp * torch.tanh(x / clamp)))
        block = 0
        for stage in self.stages:
            for memory_block in stage.blocks:
                x = memory_block(x, past_of(memory, block, x, videos))
                block += 1
            x = stage.conv(F.interpolate(stage.grow(x), scale_factor=2.0, mode="nearest"))
        x = self.head(F.relu(x))
        return x.reshape(videos, -1, *x.shape[1:])


def plain_taehv(released: dict[str, torch.Tensor], config: TaehvConfig = TAEW2_1) -> PlainTaehv:
    """The plain decoder (float32, CPU, channels-last, eval mode) with a released-layout state's weights."""
    decoder = PlainTaehv(config)
    keys = iter(released)  # the released order is the module's: every conv's weight, then its bias
    state = {name: released[next(keys)].float() for name in decoder.state_dict()}
    decoder.load_state_dict(state)
    return decoder.to(memory_format=torch.channels_last).eval().requires_grad_(False)


class PlainStreamingTae:
    """The streaming decoder's interface (`decode_float`, `decode`, `reset`, `device`) over the plain module, with
    the uint8 conversion it had: levels on the device, then a blocking copy to pageable CPU memory."""

    def __init__(self, decoder: PlainTaehv):
        self.decoder = decoder
        parameter = next(decoder.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self._memory: list[torch.Tensor | None] = []

    def reset(self) -> None:
        self._memory = []

    @torch.inference_mode()
    def decode_float(self, latents: torch.Tensor) -> torch.Tensor:
        trim = 0 if self._memory else self.decoder.config.trimmed_frames
        raw = self.decoder(latents.to(device=self.device, dtype=self.dtype), self._memory)
        return raw[0, trim:].clamp(0.0, 1.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        levels = (self.decode_float(latents).float() * 255.0).round_().to(torch.uint8)
        return levels.permute(0, 2, 3, 1).contiguous().cpu()
