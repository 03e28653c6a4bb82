"""Which decoder turns latent chunks into frames: the Wan VAE (the default) or the TAEHV preview decoder.

`DecoderRequest` is what the commands resolve `--decoder` and `--decoder-weights` into, once, at the edge;
the engine builds the decoder it names. torch is not imported here: the commands check the options first.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path


class DecoderChoice(enum.Enum):
    WAN = "wan"  # the official Wan2.1 VAE: the full quality
    TAE = "tae"  # TAEHV `taew2_1`: a tiny preview decoder, several times faster, not the VAE's quality

    @property
    def description(self) -> str:
        if self is DecoderChoice.WAN:
            return "wan (the Wan2.1 VAE, full quality)"
        return "tae (the TAEHV taew2_1 preview decoder: fast, below the VAE's quality)"


@dataclass(frozen=True)
class DecoderRequest:
    """The decoder asked for, and for TAEHV where its weights are (None: the model folder, then the hub cache)."""

    choice: DecoderChoice = DecoderChoice.WAN
    weights: Path | None = None  # --decoder-weights

    @property
    def is_tae(self) -> bool:
        return self.choice is DecoderChoice.TAE

    def options(self) -> list[str]:
        """This request as `memflow render` options (nothing for the default)."""
        if not self.is_tae:
            return []
        return ["--decoder", "tae", *([] if self.weights is None else ["--decoder-weights", str(self.weights)])]


WAN_DECODER = DecoderRequest()
