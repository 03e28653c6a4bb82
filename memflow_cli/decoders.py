"""Which decoder turns latent chunks into frames: the Wan VAE (the default) or the TAEHV preview decoder.

`DecoderRequest` is what the commands resolve `--decoder` and `--decoder-weights` into, once, at the edge;
the engine builds the decoder it names. torch is not imported here: the commands check the options first.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .request import ModelSource

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


def decoder_request(model: ModelSource | str | None, name: str | None, weights: Path | None,
                    default: DecoderChoice = DecoderChoice.WAN) -> DecoderRequest:  # fmt: skip
    """`--decoder` and `--decoder-weights` for `--model`, checked before the model loads: a bad option, or a
    TAEHV file that is missing, cut or of another layout, is a PlanError (one line, exit 2)."""
    from .plan import PlanError
    from .request import ModelSource

    source = ModelSource.parse(model)

    if name is None:
        choice = default
    else:
        try:
            choice = DecoderChoice(name.strip().lower())
        except ValueError:
            raise PlanError(f"--decoder {name}: not a decoder", "choose --decoder wan or --decoder tae") from None
    if weights is not None and choice is not DecoderChoice.TAE:
        raise PlanError("--decoder-weights is the TAEHV decoder's file", "add --decoder tae, or leave it out")
    request = DecoderRequest(choice, weights)
    if request.is_tae and source.built_in:
        if weights is not None:
            raise PlanError(f"--decoder-weights: the {source.label} model decodes with random TAEHV weights of its own",
                            "leave out --decoder-weights")  # fmt: skip
        return request
    if request.is_tae:
        check_tae_file(request, source.folder)
    return request


def check_tae_file(request: DecoderRequest, model: str | None) -> Path:
    """The TAEHV file the engine will load for `model`, read and checked now (it is small)."""
    from .loading import WeightsError
    from .plan import PlanError
    from .tae.files import tae_weights
    from .tae.weights import TAE_DOWNLOAD_COMMAND, checked_decoder_state, read_state

    try:
        path = tae_weights(request.weights, Path(model).expanduser() if model is not None else None)
        checked_decoder_state(read_state(path), path)
    except WeightsError as error:
        hint = None if TAE_DOWNLOAD_COMMAND in str(error) else f"the released file: {TAE_DOWNLOAD_COMMAND}"
        raise PlanError(str(error), hint) from None
    return path
