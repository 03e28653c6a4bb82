"""Streaming VAE decode: latent chunks in, RGB frames out, with a persistent causal cache.

The Wan VAE decoder is causal in time: the official code (and diffusers' `AutoencoderKLWan._decode`) runs it
one latent frame at a time and carries, for every causal 3-D conv, the last two input frames.
`StreamingDecoder` runs memflow's decoder (`wan_vae.WanVAE`) through a `DecoderStream` (`vae_stream.py`),
which keeps those frames alive between calls, so decoding a video chunk by chunk gives exactly the frames
of decoding it all at once, while memory stays flat: only the fixed-size causal history outlives a chunk.

The history belongs to this object, not to the VAE, so two videos decoded by one VAE cannot disturb each
other.

Only the very first latent frame of a video must pass alone (the time upsampler skips its convolution on
that call). Every later call may carry several frames: a causal conv over T frames with the last two
cached is the same arithmetic as T one-frame calls, and a few large kernels run faster on a GPU than many
small ones, but the full-resolution activations grow with T (with diffusers' own cache handling on an
H100 at 832x480, three frames per call were 6% faster than one and needed 4 GiB more). So
`frames_per_call` defaults to 1; None passes a whole chunk at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .speed.decoder import DecoderGraphs
from .vae_stream import PLAIN_KERNELS, DecoderKernels, DecoderStream
from .wan_vae import WanVAE, WanVAEConfig


def frames_from_decoded(x: torch.Tensor) -> torch.Tensor:
    """Decoder output [N, 3, H, W] in [-1, 1] -> uint8 frames [N, H, W, 3] on the CPU.

    As the official code does: float32, clamp, map to [0, 1], times 255, then truncate (not round).
    """
    video = (0.5 * x.float().clamp(-1.0, 1.0) + 0.5).clamp(0.0, 1.0)
    return (video * 255.0).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()


def check_latent_chunk(latents: torch.Tensor, channels: int) -> None:
    """A chunk as the generator yields it, [1, F > 0, channels, h, w] (frame-major, one video); else ValueError."""
    shape_ok = latents.dim() == 5 and latents.shape[0] == 1 and latents.shape[2] == channels
    if not shape_ok or latents.shape[1] == 0:
        shape = list(latents.shape)
        raise ValueError(f"latents must be [1, F>0, {channels}, h, w] (frame-major, one video), got {shape}")


class StreamingDecoder:
    """Decodes the latent chunks of one video at a time, keeping the VAE's causal cache between chunks.

    `kernels` are the decoder's steps between convolutions; the fast path passes compiled ones
    (`FastPath.decoder_kernels`). With `graphs` a VAE on CUDA replays each decoder call from a CUDA graph,
    one per call shape (`speed.decoder.DecoderGraphs`); on the CPU every call runs as it is. Off by default:
    on an H100 (torch 2.11) the replays equal the eager decode but save under 1% of its time (its convs are
    long kernels). Each decoder's graphs own their memory pool: one pool handle shared by every decoder of the
    process made every capture fail (the caching allocator's `use_count > 0` assert).
    """

    def __init__(
        self,
        vae: WanVAE,
        dtype: torch.dtype | None = None,
        frames_per_call: int | None = 1,
        *,
        kernels: DecoderKernels = PLAIN_KERNELS,
        graphs: bool = False,
    ):
        if frames_per_call is not None and frames_per_call < 1:
            raise ValueError(f"frames_per_call must be at least 1 or None, got {frames_per_call}")
        if not isinstance(vae, WanVAE):
            raise TypeError(f"expected memflow's Wan2.1 VAE (wan_vae.WanVAE), got {type(vae).__name__}")
        self.vae = vae.eval()
        self.frames_per_call = frames_per_call
        self.device = vae.device
        self.dtype = dtype or vae.dtype
        if self.dtype != vae.dtype:
            vae.to(dtype=self.dtype)
        self.latent_channels: int = vae.config.z_dim
        self._mean, self._inv_std = self._normalisation(vae.config)
        self._stream = DecoderStream(vae.decoder, kernels)
        graphed = graphs and self.device.type == "cuda"
        self._call: Callable[[torch.Tensor], torch.Tensor] = DecoderGraphs(self._stream) if graphed else self._stream

    @property
    def graphs(self) -> DecoderGraphs | None:
        """The CUDA graphs the decoder calls replay from; None where every call runs as it is (the CPU)."""
        return self._call if isinstance(self._call, DecoderGraphs) else None

    def _normalisation(self, config: WanVAEConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and 1/std, shaped [1, C, 1, 1, 1], in the compute dtype (as the reference does)."""
        shape = (1, self.latent_channels, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, dtype=self.dtype, device=self.device).view(shape)
        std = torch.tensor(config.latents_std, dtype=self.dtype, device=self.device).view(shape)
        return mean, 1.0 / std

    def reset(self) -> None:
        """Start a new video: drop the causal cache."""
        self._stream.reset()

    def causal_state(self) -> tuple[torch.Tensor, ...]:
        """A CPU copy of what the next chunk's frames depend on of the video so far (`DecoderStream.causal_state`)."""
        return self._stream.causal_state()

    @property
    def causal_state_bytes(self) -> int:
        return self._stream.causal_state_bytes

    def restore(self, state: tuple[torch.Tensor, ...]) -> None:
        """Go on with a video whose `causal_state` was `state` (a ValueError if it is another decoder's)."""
        self._stream.restore(state)

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """Generator latents [1, F, C, h, w] (normalised) -> VAE latents z [1, C, F, h, w]."""
        self._check_latents(latents)
        x = latents.to(device=self.device, dtype=self.dtype).permute(0, 2, 1, 3, 4)  # [1, C, F, h, w]
        return x / self._inv_std + self._mean  # z = latent * std + mean, via the reference's rounded 1/std

    def _check_latents(self, latents: torch.Tensor) -> None:
        check_latent_chunk(latents, self.latent_channels)

    @torch.inference_mode()
    def decode_z(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents z [1, C, F, h, w] -> frames [1, 3, N, H, W] in [-1, 1], continuing the cached video."""
        x = self.vae.post_quant_conv(z)  # 1x1x1 conv: frames are independent
        outputs = [self._call(piece) for piece in self._calls(x)]
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
        return out.float().clamp(-1.0, 1.0)

    def _calls(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Split latent frames [1, C, F, h, w] into decoder calls: a video's first frame alone, then runs."""
        pieces: list[torch.Tensor] = []
        if self._stream.at_start:
            pieces.append(x[:, :, :1])
            x = x[:, :, 1:]
        step = self.frames_per_call or max(x.shape[2], 1)
        pieces.extend(x[:, :, i : i + step] for i in range(0, x.shape[2], step))
        return pieces

    def decode_float(self, latents: torch.Tensor) -> torch.Tensor:
        """One generator chunk [1, F, C, h, w] -> float32 frames [N, 3, H, W] in [-1, 1]."""
        frames = self.decode_z(self.denormalise(latents))  # [1, 3, N, H, W]
        return frames[0].permute(1, 0, 2, 3)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """One generator chunk [1, F, C, h, w] -> uint8 frames [N, H, W, 3] on the CPU."""
        return frames_from_decoded(self.decode_float(latents))
