"""The typed request: which model, and the generation options, as values resolved once at the edge.

`ModelSource` is what `--model` names, resolved here and nowhere else: the demo model, full-size random
weights, or the real weights (a folder, or the Hugging Face cache). `CompileMode` is `--compile` /
`--no-compile` / neither. `GenerationOptions` gathers every option that decides how a video is made
(model, devices, generation settings, LoRA scale, compile, FP8, decoder) and writes itself back as the
command-line flags that reproduce it. Nothing here imports torch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .decoders import WAN_DECODER, DecoderRequest
from .settings import SETTING_NAMES, GenerationSettings, LoraSettings


class ModelKind(enum.Enum):
    DEMO = "demo"  # the tiny random model (`demo.py`): every step of a real render, in seconds on a CPU
    RANDOM = "random"  # the full-size 1.3B transformer and Wan2.1 VAE with random weights (for speed)
    WEIGHTS = "weights"  # the real weights: a folder, or the Hugging Face cache


@dataclass(frozen=True)
class ModelSource:
    """The model a command runs, as `--model` names it."""

    kind: ModelKind = ModelKind.WEIGHTS
    folder: str | None = None  # WEIGHTS: the folder given (None: the Hugging Face cache)

    @classmethod
    def parse(cls, model: ModelSource | str | None) -> ModelSource:
        """`--model`'s value: 'demo', 'random', a weights folder, or None (the Hugging Face cache)."""
        if isinstance(model, ModelSource):
            return model
        for kind in (ModelKind.DEMO, ModelKind.RANDOM):
            if model == kind.value:
                return cls(kind)
        return cls(ModelKind.WEIGHTS, model)

    @property
    def is_demo(self) -> bool:
        return self.kind is ModelKind.DEMO

    @property
    def is_random(self) -> bool:
        return self.kind is ModelKind.RANDOM

    @property
    def built_in(self) -> bool:
        """The demo or the random model: built with random weights, nothing read from files."""
        return self.kind is not ModelKind.WEIGHTS

    @property
    def option(self) -> str | None:
        """The value of `--model` that names this source (None: leave the option out)."""
        return self.folder if self.kind is ModelKind.WEIGHTS else self.kind.value

    @property
    def label(self) -> str:
        """For messages: 'demo', 'random', the folder, or 'weights' (the Hugging Face cache)."""
        return self.option or "weights"

    @property
    def architecture(self) -> str:
        """The transformer's shape, which decides the graphs a compiled run builds."""
        return "demo" if self.is_demo else "wan2.1-t2v-1.3b"

    def flags(self) -> list[str]:
        return [] if self.option is None else ["--model", self.option]


class CompileMode(enum.Enum):
    """`--compile` (ALWAYS), `--no-compile` (NEVER) or neither (AUTO: the command decides, `speed.compile_cache`)."""

    AUTO = None
    ALWAYS = True
    NEVER = False

    @classmethod
    def from_option(cls, compile: bool | None) -> CompileMode:
        return cls(compile)

    def flags(self) -> list[str]:
        return {CompileMode.AUTO: [], CompileMode.ALWAYS: ["--compile"], CompileMode.NEVER: ["--no-compile"]}[self]


RELEASED_LORA = LoraSettings()  # the released lora.pt's rank and alpha


@dataclass(frozen=True)
class GenerationOptions:
    """How a command was asked to make its videos. A setting left None was not given (the script's or the
    default applies); `flags()` writes the options back as the command line that gives them."""

    model: ModelSource = field(default_factory=ModelSource)
    device: str | None = None
    decode_device: str | None = None
    memory: str | None = None
    window: int | None = None
    sink: int | None = None
    bank_size: int | None = None
    record_interval: int | None = None
    sma: bool | None = None
    steps: str | None = None  # as typed: "1000,750,500,250"
    lora: LoraSettings = RELEASED_LORA
    compile: CompileMode = CompileMode.AUTO
    fp8: bool = False
    decoder: DecoderRequest = WAN_DECODER  # --decoder, --decoder-weights

    def settings(self) -> dict[str, Any]:
        """The generation settings given (names as in `settings.SETTING_NAMES`)."""
        return {name: getattr(self, name) for name in _SETTING_OPTIONS if getattr(self, name) is not None}

    def with_settings(self, settings: GenerationSettings) -> GenerationOptions:
        """These options with every generation setting given as `settings` has it."""
        memory, steps = settings.memory, settings.sampler.steps
        return replace(
            self, memory=memory.mode, window=memory.window, sink=memory.sink, bank_size=memory.bank_size,
            record_interval=memory.record_interval, sma=memory.sma, steps=",".join(map(str, steps)),
        )  # fmt: skip

    def without_settings(self) -> GenerationOptions:
        """These options with no generation setting given (a script that holds them all says them)."""
        return replace(self, **dict.fromkeys(_SETTING_OPTIONS))

    def flags(self) -> list[str]:
        """The command-line flags that give these options."""
        flags = self.model.flags()
        flags += [] if self.device is None else ["--device", self.device]
        flags += [] if self.decode_device is None else ["--decode-device", self.decode_device]
        for name, value in self.settings().items():
            option = f"--{name.replace('_', '-')}"
            flags += [option if value else f"--no-{option[2:]}"] if isinstance(value, bool) else [option, str(value)]
        flags += self.compile.flags()
        flags += ["--fp8"] if self.fp8 else []
        flags += self.decoder.options()
        if self.lora != RELEASED_LORA:
            flags += ["--lora-rank", str(self.lora.rank), "--lora-alpha", repr(self.lora.alpha)]
        return flags


_SETTING_OPTIONS = tuple(name for name in (f.name for f in fields(GenerationOptions)) if name in SETTING_NAMES)
