"""Streaming TAEHV decode: the generator's latent chunks in, uint8 frames out, the decoder's memory carried.

`StreamingTaeDecoder` has the public interface of `decode.StreamingDecoder` (`decode`, `reset`, `device`), so
the engine runs either. Each chunk continues the video: the memory blocks' last inputs are carried over
(`TaeMemory`), and the first `trimmed_frames` raw frames are dropped once per video, so a video's first chunk
of 3 latents gives 9 frames and every later one 12, the frames of decoding the whole video at once.
"""

from __future__ import annotations

import torch

from ..decode import check_latent_chunk
from .model import TaehvDecoder, TaeMemory, frames_from_raw


def frames_to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Frames [N, 3, H, W] in [0, 1] -> uint8 [N, H, W, 3] on the CPU (rounded to the nearest level).

    The levels are made where the frames are (a quarter of float32's bytes cross to the CPU, bf16 frames are
    rounded in float32); from a GPU they are copied into page-locked memory without blocking, then the
    decoding stream is waited on. The page-locked block returns to torch's host cache when the caller drops
    the frames, so a writer that keeps several chunks never sees one overwritten.
    """
    levels = torch.empty((frames.shape[0], *frames.shape[2:], frames.shape[1]), dtype=torch.uint8,
                         device=frames.device)  # fmt: skip
    levels.permute(0, 3, 1, 2).copy_((frames.float() * 255.0).round_())
    if levels.device.type != "cuda":
        return levels
    host = torch.empty(levels.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(levels, non_blocking=True)
    torch.cuda.current_stream(levels.device).synchronize()
    return host


class StreamingTaeDecoder:
    """Decodes the latent chunks of one video at a time with a TAEHV decoder, in its dtype and on its device."""

    def __init__(self, decoder: TaehvDecoder):
        self.decoder = decoder
        parameter = next(decoder.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.latent_channels = decoder.config.latent_channels
        self._memory = TaeMemory()

    def reset(self) -> None:
        """Start a new video: the next chunk's frames have no past, and its first raw frames are dropped."""
        self._memory.reset()

    @torch.inference_mode()
    def decode_float(self, latents: torch.Tensor) -> torch.Tensor:
        """One generator chunk [1, F, C, h, w] -> float frames [N, 3, H, W] in [0, 1], continuing the video."""
        self._check_latents(latents)
        trim = 0 if self._memory.started else self.decoder.config.trimmed_frames
        raw = self.decoder(latents.to(device=self.device, dtype=self.dtype), self._memory)  # [1, 4F, 3, H, W]
        return frames_from_raw(raw, trim)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """One generator chunk [1, F, C, h, w] -> uint8 frames [N, H, W, 3] on the CPU."""
        return frames_to_uint8(self.decode_float(latents))

    def _check_latents(self, latents: torch.Tensor) -> None:
        check_latent_chunk(latents, self.latent_channels)
