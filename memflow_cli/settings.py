"""Frozen settings for the model, the video geometry, the memory and the sampler.

Every size the rest of the package needs is derived here from a handful of
numbers (resolution, patch, VAE stride, chunk length), never typed elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from memflow_cli.preview import preview

MemoryMode = Literal["nam", "sink", "none"]
MEMORY_MODES: tuple[str, ...] = ("nam", "sink", "none")

# The values each user-facing number may take, lowest and highest, both included. The sizes are latent frames
# (window, sink, bank_size, sma_top_k) or chunks (record_interval). Every frame of window + bank holds keys and
# values for every layer: 2 x 30 layers x 1560 tokens x 1536 x 2 bytes = 288 MB at 832x480 in bf16, so the
# largest window and bank (128 frames, 37 GB) still fit one 80 GB GPU beside the model; the release uses
# 12 + 3. `shift` warps the flow-matching schedule (release: 5): 1 leaves it straight, 100 puts every step
# near pure noise.
SETTING_RANGES: dict[str, tuple[float, float]] = {
    "window": (1, 64),
    "sink": (0, 61),  # and below the window by a chunk (3 frames)
    "bank_size": (1, 64),
    "record_interval": (1, 1000),
    "sma_top_k": (1, 128),
    "shift": (0.01, 100.0),
}
UNITS: dict[str, str] = {
    "window": "frames",
    "sink": "frames",
    "bank_size": "frames",
    "record_interval": "chunks",
    "sma_top_k": "frames",
}


class SettingsError(ValueError):
    """A setting has a value the generator cannot use; names the field."""

    def __init__(self, field_name: str, message: str, related: tuple[str, ...] = ()):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message
        self.related = related  # other fields the rule involves: whichever of them the user gave is to blame


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of the Wan2.1 text-to-video transformer (original Wan naming)."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True

    def __post_init__(self) -> None:
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "freq_dim", "text_dim", "text_len"):
            if getattr(self, name) < 1:
                raise SettingsError(name, f"must be a positive integer, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise SettingsError("dim", f"{self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise SettingsError("dim", "head dim must be even for the rotary embedding")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_wan_config(cls, config: dict[str, Any]) -> TransformerConfig:
        """Build from a Wan `config.json` dict; unlisted keys keep the Wan2.1 defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in known}
        if "patch_size" in kwargs:
            kwargs["patch_size"] = tuple(kwargs["patch_size"])
        model_type = config.get("model_type", "t2v")
        if model_type != "t2v":
            raise SettingsError("model_type", f"only text-to-video ('t2v') Wan models work here, got {model_type!r}")
        return cls(**kwargs)


WAN_1_3B = TransformerConfig()


@dataclass(frozen=True)
class VideoGeometry:
    """Pixel and latent sizes of the video, and the chunk grid of the generator."""

    height: int = 480
    width: int = 832
    fps: int = 16
    latent_channels: int = 16
    vae_stride_t: int = 4
    vae_stride_hw: int = 8
    patch_hw: int = 2
    frames_per_chunk: int = 3  # latent frames generated together

    def __post_init__(self) -> None:
        unit = self.vae_stride_hw * self.patch_hw
        for name in ("height", "width"):
            value = getattr(self, name)
            if value <= 0 or value % unit:
                raise SettingsError(name, f"{value} must be a positive multiple of {unit}")

    @property
    def latent_height(self) -> int:
        return self.height // self.vae_stride_hw

    @property
    def latent_width(self) -> int:
        return self.width // self.vae_stride_hw

    @property
    def tokens_per_frame(self) -> int:
        return (self.latent_height // self.patch_hw) * (self.latent_width // self.patch_hw)

    @property
    def tokens_per_chunk(self) -> int:
        return self.tokens_per_frame * self.frames_per_chunk

    @property
    def video_frames_per_chunk(self) -> int:
        return self.vae_stride_t * self.frames_per_chunk

    @property
    def chunk_seconds(self) -> float:
        return self.video_frames_per_chunk / self.fps

    def video_frames(self, latent_frames: int) -> int:
        """Decoded frames of a latent video: the first latent frame gives one, the others four each."""
        return 0 if latent_frames <= 0 else self.vae_stride_t * (latent_frames - 1) + 1

    def latent_shape(self, latent_frames: int) -> tuple[int, int, int, int]:
        return (latent_frames, self.latent_channels, self.latent_height, self.latent_width)


@dataclass(frozen=True)
class MemorySettings:
    """The KV memory: local window, attention sink and the MemFlow memory bank.

    Defaults are the official release: NAM with a 3-frame bank refreshed every
    3 chunks, a 12-frame local window that includes a 3-frame sink, SMA off.
    """

    mode: MemoryMode = "nam"
    window: int = 12  # local attention window in latent frames, sink included
    sink: int = 3  # attention-sink frames kept from the start
    bank_size: int = 3  # memory-bank capacity in frames
    record_interval: int = 3  # chunks between two recordings into the bank
    sma: bool = False  # sparse memory activation
    sma_top_k: int = 3  # frames of sink+bank kept per head when SMA is on
    # How the bank records: True as an interactive story (every `record_interval` chunks), False as a
    # single-prompt one (every chunk); None: interactive when the story switches prompt. A live session
    # sets it, not knowing in advance whether a prompt will come.
    interactive: bool | None = None

    def __post_init__(self) -> None:
        if self.mode not in MEMORY_MODES:
            raise SettingsError("memory", f"unknown mode {preview(self.mode)}; choose one of {', '.join(MEMORY_MODES)}")
        _check_range("window", self.window)
        _check_range("sink", self.sink)
        if self.sink >= self.window:
            message = f"the sink ({self.sink} frames) must be smaller than the window ({self.window} frames)"
            raise SettingsError("sink", message, related=("window",))
        for name in ("bank_size", "record_interval", "sma_top_k"):
            _check_range(name, getattr(self, name))
        if self.sma and self.mode != "nam":
            raise SettingsError("sma", f"sparse memory activation needs memory 'nam', not {self.mode!r}")

    @property
    def sink_frames(self) -> int:
        """Frames of the sink actually kept (mode `none` keeps none)."""
        return 0 if self.mode == "none" else self.sink

    @property
    def bank_frames(self) -> int:
        """Frames of bank storage (only mode `nam` has a bank)."""
        return self.bank_size if self.mode == "nam" else 0


@dataclass(frozen=True)
class SamplerSettings:
    """Few-step flow matching, as released: 4 steps warped through a shift-5 schedule."""

    steps: tuple[int, ...] = (1000, 750, 500, 250)
    shift: float = 5.0
    train_timesteps: int = 1000
    context_noise: int = 0  # timestep of the cache-writing pass

    def __post_init__(self) -> None:
        if not self.steps:
            raise SettingsError("steps", "needs at least one denoising step")
        for step in self.steps:
            if not 0 < step <= self.train_timesteps:
                raise SettingsError("steps", f"each step must be in 1..{self.train_timesteps}, got {preview(step)}")
        if list(self.steps) != sorted(self.steps, reverse=True) or len(set(self.steps)) != len(self.steps):
            raise SettingsError("steps", f"must be strictly decreasing, got {preview(list(self.steps))}")
        _check_range("shift", self.shift)


LORA_ALPHA_MAX = 1e6  # the released alpha is 256: a million scales the adapter 4000 times as much, still finite


@dataclass(frozen=True)
class LoraSettings:
    """How `lora.pt` is scaled when merged: alpha / rank (released: rank 256, alpha 256)."""

    rank: int | None = 256  # None: take the rank from the file
    alpha: float = 256.0

    def __post_init__(self) -> None:
        if self.rank is not None and (not _is_int(self.rank) or self.rank < 1):
            raise SettingsError("lora_rank", f"must be a whole number from 1 up, got {preview(self.rank)}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise SettingsError("lora_alpha", f"must be a finite number, got {preview(self.alpha)}")
        if abs(self.alpha) > LORA_ALPHA_MAX:  # alpha / rank scales B @ A: a larger scale overflows merged weights
            bound = f"{LORA_ALPHA_MAX:,.0f}"
            raise SettingsError("lora_alpha", f"must be from -{bound} to {bound}, got {self.alpha:g}")


@dataclass(frozen=True)
class GenerationSettings:
    """Everything the generator needs besides weights, prompts and noise."""

    memory: MemorySettings = field(default_factory=MemorySettings)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    geometry: VideoGeometry = field(default_factory=VideoGeometry)

    def __post_init__(self) -> None:
        local = self.memory.window - self.memory.sink_frames
        if local < self.geometry.frames_per_chunk:
            raise SettingsError(
                "window",
                f"window ({self.memory.window}) minus sink ({self.memory.sink_frames}) must hold at least one chunk "
                f"({self.geometry.frames_per_chunk} frames)",
                related=("sink",),
            )

    def with_overrides(self, overrides: dict[str, Any]) -> GenerationSettings:
        """Apply user-facing overrides (names as in `SETTING_NAMES`); raises SettingsError."""
        memory: dict[str, Any] = {}
        sampler: dict[str, Any] = {}
        for name, value in overrides.items():
            if name not in SETTING_NAMES:
                raise SettingsError(name, f"unknown setting; known: {', '.join(sorted(SETTING_NAMES))}")
            kind, attr = SETTING_NAMES[name]
            value = _coerce(name, value)
            (memory if kind == "memory" else sampler)[attr] = value
        return GenerationSettings(
            memory=dataclasses.replace(self.memory, **memory),
            sampler=dataclasses.replace(self.sampler, **sampler),
            geometry=self.geometry,
        )

    def as_dict(self) -> dict[str, Any]:
        """Every setting; `interactive` only where it is set (records written before it existed stay equal)."""
        data = dataclasses.asdict(self)
        if self.memory.interactive is None:
            del data["memory"]["interactive"]
        return data


# user-facing name -> (settings group, attribute); CLI options and YAML keys use these names
SETTING_NAMES: dict[str, tuple[str, str]] = {
    "memory": ("memory", "mode"),
    "window": ("memory", "window"),
    "sink": ("memory", "sink"),
    "bank_size": ("memory", "bank_size"),
    "record_interval": ("memory", "record_interval"),
    "sma": ("memory", "sma"),
    "sma_top_k": ("memory", "sma_top_k"),
    "interactive": ("memory", "interactive"),
    "steps": ("sampler", "steps"),
    "shift": ("sampler", "shift"),
}


def _check_range(name: str, value: float) -> None:
    """`value` lies in SETTING_RANGES[name], and is a finite number; raises SettingsError naming the field."""
    low, high = SETTING_RANGES[name]
    unit = f" {UNITS[name]}" if name in UNITS else ""
    if isinstance(value, float) and not math.isfinite(value):
        raise SettingsError(name, f"must be a finite number from {low:g} to {high:g}, got {value}")
    if value < low:
        raise SettingsError(name, f"must be at least {low:g}, got {preview(value)}")
    if value > high:
        raise SettingsError(name, f"must be at most {high:g}{unit}, got {preview(value)}")


def _coerce(name: str, value: Any) -> Any:
    """Check the type of one override value and normalise it."""
    if name == "memory":
        if not isinstance(value, str):
            raise SettingsError(name, f"must be one of {', '.join(MEMORY_MODES)}, got {preview(value)}")
        return value
    if name == "interactive" and value is None:  # the default: interactive when the story switches prompt
        return None
    if name in ("sma", "interactive"):
        if not isinstance(value, bool):
            also = ", or null for interactive when the story switches prompt" if name == "interactive" else ""
            raise SettingsError(name, f"must be true or false{also}, got {preview(value)}")
        return value
    if name == "shift":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(name, f"must be a number, got {preview(value)}")
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float
            raise SettingsError(name, f"must be at most {SETTING_RANGES[name][1]:g}, got {preview(value)}") from None
    if name == "steps":
        problem = f"must be a list of integers like [1000, 750, 500, 250], got {preview(value)}"
        if isinstance(value, str):
            words = re.split(r"\s*,\s*|\s+", value.strip())  # commas, spaces or both; `,,` leaves an empty step
            if not value.strip():
                raise SettingsError(name, "no steps given; write the steps like 1000,750,500,250")
            if "" in words:
                raise SettingsError(name, f"{preview(value)} has an empty step; write the steps like 1000,750,500,250")
            whole = [word.isascii() and word.isdigit() for word in words]
            if not words or not all(whole):
                bad = next((word for word, ok in zip(words, whole, strict=True) if not ok), value)
                raise SettingsError(
                    name, f"{preview(bad)} is not a whole number; write the steps like 1000,750,500,250"
                )
            if too_long := next((word for word in words if len(word) > 9), None):
                raise SettingsError(name, f"each step must be a timestep like 1000 or 250, got {preview(too_long)}")
            value = [int(word) for word in words]
        if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
            raise SettingsError(name, problem)
        return tuple(value)
    if not _is_int(value):
        raise SettingsError(name, f"must be an integer, got {preview(value)}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
