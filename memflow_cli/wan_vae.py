"""memflow's own Wan2.1 VAE decoder: its configuration and the modules that hold its weights.

A render only decodes, and `vae_stream.DecoderStream` computes the decoder itself from the weights and the
few facts each module keeps (a causal conv's kernel and spatial padding, a resampling's mode, an RMS norm's
scale). These modules are those holders: their parameter names and shapes are those of diffusers'
`AutoencoderKLWan` (`post_quant_conv.*`, `decoder.*`), so its state dicts and the converted-VAE cache load
into them as they are, and a render never imports diffusers (seconds of imports). Only the decode side is
here: the encoder's tensors of a file are not read.

`WanVAEConfig.from_diffusers` reads the same dict as a diffusers `vae/config.json` (or
`weights.WAN21_VAE_CONFIG`) and refuses what is not a Wan2.1 VAE (Wan2.2's residual decoder, patchified
frames) with an error naming the field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

RGB = 3  # the video's channels
# The keys of a diffusers `AutoencoderKLWan` config: those the decoder's shape needs, those it may have, and
# those it does not depend on (the encoder's and the training's).
_REQUIRED_KEYS = frozenset({"base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample", "latents_mean",
                            "latents_std"})  # fmt: skip
_OPTIONAL_KEYS = frozenset({"decoder_base_dim", "scale_factor_temporal", "scale_factor_spatial"})
_IGNORED_KEYS = frozenset({"attn_scales", "dropout", "in_channels", "clip_output"})
_NOT_WAN21 = "memflow decodes with the Wan2.1 VAE only"


@dataclass(frozen=True)
class WanVAEConfig:
    """The Wan2.1 VAE's shape as far as decoding goes, with its latent statistics; sizes are derived."""

    base_dim: int  # the widest stage's width is base_dim * dim_mult[-1]
    z_dim: int  # latent channels
    dim_mult: tuple[int, ...]  # width multipliers of the encoder's stages (the decoder's, reversed)
    num_res_blocks: int  # the encoder's per stage; the decoder has one more per stage
    temporal_downsample: tuple[bool, ...]  # the encoder's stages that halve time (the decoder doubles it there)
    latents_mean: tuple[float, ...]
    latents_std: tuple[float, ...]
    decoder_base_dim: int | None = None  # the decoder's own base width (None: base_dim)

    def __post_init__(self) -> None:
        stages = len(self.dim_mult)
        if stages < 1 or len(self.temporal_downsample) != stages - 1:
            raise ValueError(f"temperal_downsample has {len(self.temporal_downsample)} entries; a VAE of "
                             f"{stages} stages (dim_mult) needs {stages - 1}")  # fmt: skip
        for name in ("latents_mean", "latents_std"):
            if len(values := getattr(self, name)) != self.z_dim:
                raise ValueError(f"{name} has {len(values)} values, not one per latent channel ({self.z_dim})")
        if min(self.base_dim, self.z_dim, self.num_res_blocks + 1, *self.dim_mult) < 1:
            raise ValueError("base_dim, z_dim, dim_mult must be positive and num_res_blocks not negative")
        if self.decoder_base_dim is not None and self.decoder_base_dim < 1:
            raise ValueError(f"decoder_base_dim is {self.decoder_base_dim}: it must be positive")

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> WanVAEConfig:
        """From diffusers `AutoencoderKLWan` arguments (a `vae/config.json`: its `_` keys are skipped); a
        ValueError naming the field for a config that is not Wan2.1's."""
        values = {key: value for key, value in config.items() if not key.startswith("_")}
        _refuse_other_vaes(values)
        width = values.get("decoder_base_dim")
        made = cls(
            base_dim=_field(values, "base_dim", int),
            z_dim=_field(values, "z_dim", int),
            dim_mult=_field(values, "dim_mult", lambda ms: tuple(int(m) for m in ms)),
            num_res_blocks=_field(values, "num_res_blocks", int),
            temporal_downsample=_field(values, "temperal_downsample", lambda ts: tuple(bool(t) for t in ts)),
            latents_mean=_field(values, "latents_mean", lambda vs: tuple(float(v) for v in vs)),
            latents_std=_field(values, "latents_std", lambda vs: tuple(float(v) for v in vs)),
            decoder_base_dim=None if width is None else _field(values, "decoder_base_dim", int),
        )
        derived = {"scale_factor_spatial": made.spatial_ratio, "scale_factor_temporal": made.temporal_ratio}
        for name, ratio in derived.items():
            if values.get(name) not in (None, ratio):
                raise ValueError(f"{name} is {values[name]}, but the stages give {ratio}")
        return made

    @property
    def decoder_dims(self) -> tuple[int, ...]:
        """The decoder's widths: the mid block's, then each up stage's output."""
        width = self.decoder_base_dim or self.base_dim
        return tuple(width * m for m in (self.dim_mult[-1], *reversed(self.dim_mult)))

    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        """The decoder's up stages that double time: the encoder's downsampling stages, in reverse."""
        return tuple(reversed(self.temporal_downsample))

    @property
    def spatial_ratio(self) -> int:
        """Video pixels per latent pixel, along each side."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_ratio(self) -> int:
        """Video frames per latent frame, after a video's first."""
        return 2 ** sum(self.temporal_downsample)


def _field(values: Mapping[str, Any], name: str, read: Callable[[Any], Any]) -> Any:
    """`read(values[name])`; a ValueError naming the field where its value is not of the kind `read` takes."""
    try:
        return read(values[name])
    except (TypeError, ValueError):
        raise ValueError(f"{name} is {values[name]!r}: not a number or list of numbers of its kind") from None


def _refuse_other_vaes(values: dict[str, Any]) -> None:
    """A ValueError naming the field where a config is not the Wan2.1 VAE's (Wan2.2's residual decoder, frames
    patchified, other outputs, fields unknown or missing); the fields that say Wan2.1 are taken out of `values`."""
    if values.pop("is_residual", False):
        raise ValueError(f"is_residual is true (the Wan2.2 VAE): {_NOT_WAN21}")
    if (patch := values.pop("patch_size", None)) not in (None, 1):
        raise ValueError(f"patch_size is {patch} (frames patchified, Wan2.2): {_NOT_WAN21}")
    if (outputs := values.pop("out_channels", RGB)) != RGB:
        raise ValueError(f"out_channels is {outputs}, not {RGB} (RGB): {_NOT_WAN21}")
    if unknown := sorted(set(values) - _REQUIRED_KEYS - _OPTIONAL_KEYS - _IGNORED_KEYS):
        raise ValueError(f"unknown field(s) {', '.join(unknown)}: {_NOT_WAN21}")
    if missing := sorted(_REQUIRED_KEYS - set(values)):
        raise ValueError(f"no {', '.join(missing)}: not a Wan VAE config")


class CausalConv3d(nn.Conv3d):
    """A 3-D conv causal in time: it sees its current frames and the `time_keep` input frames before them
    (zeros before a video's first), and pads space by `spatial_padding` (h, w). Stride 1."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, int, int],
        spatial_padding: tuple[int, int] = (0, 0),
    ):
        super().__init__(in_channels, out_channels, kernel)
        self.time_keep = kernel[0] - 1  # input frames before the current ones that the kernel sees
        self.spatial_padding: tuple[int, int] = tuple(spatial_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The conv of a whole video x [B, C, T, h, w] from its first frame (streaming: `vae_stream`)."""
        h, w = self.spatial_padding
        if h or w or self.time_keep:
            x = F.pad(x, (w, w, h, h, self.time_keep, 0))
        return F.conv3d(x, self.weight, self.bias)


def _conv3x3x3(in_channels: int, out_channels: int) -> CausalConv3d:
    return CausalConv3d(in_channels, out_channels, (3, 3, 3), (1, 1))


class RMSNorm(nn.Module):
    """RMS norm over channels with a gain per channel (`gamma`, broadcast over frames and pixels or over
    pixels) and no bias; `scale` is sqrt(channels), as the official norm multiplies."""

    def __init__(self, channels: int, images: bool = False):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels, *(1,) * (2 if images else 3)))
        self.scale = channels**0.5
        self.bias = 0.0


class ResidualBlock(nn.Module):
    """norm1, SiLU, conv1, norm2, SiLU, conv2, plus the input (through a 1x1x1 conv where widths differ)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = RMSNorm(in_channels)
        self.conv1 = _conv3x3x3(in_channels, out_channels)
        self.norm2 = RMSNorm(out_channels)
        self.conv2 = _conv3x3x3(out_channels, out_channels)
        same = in_channels == out_channels
        self.conv_shortcut = nn.Identity() if same else CausalConv3d(in_channels, out_channels, (1, 1, 1))


class AttentionBlock(nn.Module):
    """Single-head self-attention over each frame's pixels (1x1 convs for q, k, v and the projection)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = RMSNorm(channels, images=True)
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)


class MidBlock(nn.Module):
    """A residual block, attention, a residual block."""

    def __init__(self, channels: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(channels, channels), ResidualBlock(channels, channels)])
        self.attentions = nn.ModuleList([AttentionBlock(channels)])


class Resample(nn.Module):
    """Twice the size per frame (2x nearest, then a 3x3 conv to half the channels); with mode 'upsample3d'
    twice the frames first (`time_conv` makes two frames' channels of each frame, except on a video's first)."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.mode = "upsample3d" if temporal else "upsample2d"
        upsample = nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact")
        self.resample = nn.Sequential(upsample, nn.Conv2d(channels, channels // 2, 3, padding=1))
        if temporal:
            self.time_conv = CausalConv3d(channels, 2 * channels, (3, 1, 1))


class UpBlock(nn.Module):
    """`num_res_blocks` + 1 residual blocks, then a resampling (none in the last stage)."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, resample: Resample | None):
        super().__init__()
        widths = [in_channels] + [out_channels] * blocks
        self.resnets = nn.ModuleList(ResidualBlock(a, out_channels) for a in widths)
        self.upsamplers = None if resample is None else nn.ModuleList([resample])


class WanDecoder(nn.Module):
    """conv_in, mid block, up blocks, norm_out + SiLU, conv_out: latents to RGB frames."""

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        dims = config.decoder_dims
        self.conv_in = _conv3x3x3(config.z_dim, dims[0])
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = nn.ModuleList()
        last = len(dims) - 2
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            in_dim = in_dim if i == 0 else in_dim // 2  # each resampling halved the channels
            resample = None if i == last else Resample(out_dim, config.temporal_upsample[i])
            self.up_blocks.append(UpBlock(in_dim, out_dim, config.num_res_blocks, resample))
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = _conv3x3x3(dims[-1], RGB)


class WanVAE(nn.Module):
    """The decode side of the Wan2.1 VAE: `post_quant_conv` (latents to the decoder's input) and `decoder`."""

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        self.config = config
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, (1, 1, 1))
        self.decoder = WanDecoder(config)

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype
