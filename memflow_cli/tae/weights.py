"""The TAEHV decoder's weights: the released `taew2_1` layout read from `.pth` or `.safetensors`, checked, loaded.

The released file is a flat state dict of the reference's module: `decoder.<index>...` (the position of the
layer in its decoder sequence) and `encoder.<index>...` (ignored here). `released_names` maps our module's
names onto those; every problem (missing file, truncated file, a missing key, a wrong shape) is one
`WeightsError` line naming the file, the first mismatch and the fix.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..loading import DOWNLOAD_COMMAND, WeightsError, read_torch_file
from .model import TAEW2_1, TaehvConfig, TaehvDecoder

TAE_REPO = "madebyollin/taehv"
TAE_FILE = "taew2_1.pth"
TAE_DOWNLOAD_COMMAND = "memflow weights download --decoder tae"
TAE_TRUNCATED = f"truncated or corrupt: re-run `{TAE_DOWNLOAD_COMMAND}`"
DECODER_PREFIX, ENCODER_PREFIX = "decoder.", "encoder."
# the decoder's tensors in float16, the released dtype: a smaller file cannot hold them
TAEW2_1_DECODER_VALUES = 9_844_611
TAEW2_1_MIN_BYTES = 2 * TAEW2_1_DECODER_VALUES


def released_names(config: TaehvConfig = TAEW2_1) -> dict[str, str]:
    """Our parameter name -> its key in the released file (`decoder.<layer index>.<name in that layer>`).

    The reference's decoder is one sequence: [soft clamp, conv, ReLU], then per stage [memory blocks...,
    upsample, time-grow, conv], then [ReLU, conv]; only the convolutions hold parameters.
    """
    names = {"stem.weight": "decoder.1.weight", "stem.bias": "decoder.1.bias"}
    blocks = config.blocks_per_stage
    for stage in range(len(config.widths)):
        base = 3 + stage * (blocks + 3)
        for block in range(blocks):
            for conv in (0, 2, 4):
                for kind in ("weight", "bias"):
                    ours = f"stages.{stage}.blocks.{block}.conv.{conv}.{kind}"
                    names[ours] = f"decoder.{base + block}.conv.{conv}.{kind}"
        names[f"stages.{stage}.grow.conv.weight"] = f"decoder.{base + blocks + 1}.conv.weight"
        names[f"stages.{stage}.conv.weight"] = f"decoder.{base + blocks + 2}.weight"
    head = 3 + len(config.widths) * (blocks + 3) + 1
    names.update({"head.weight": f"decoder.{head}.weight", "head.bias": f"decoder.{head}.bias"})
    return names


def read_state(path: Path | str) -> dict[str, torch.Tensor]:
    """The flat state dict of a `.safetensors` file or a torch file (`.pth`, read safely and memory-mapped)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no such decoder weights file: run `{TAE_DOWNLOAD_COMMAND}` or give an existing file",
                           path)  # fmt: skip
    state = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError("not a TAEHV state dict (a flat map of names to tensors)", path)
    return state


def _read_torch(path: Path) -> object:
    try:
        return read_torch_file(path)
    except WeightsError as err:  # its fix names the model's download; this file has its own
        raise WeightsError(str(err).replace(f"re-run {DOWNLOAD_COMMAND}", f"re-run `{TAE_DOWNLOAD_COMMAND}`")) from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError...: a cut or foreign file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightsError(f"{TAE_TRUNCATED} ({reason})", path) from None


def checked_decoder_state(
    state: dict[str, torch.Tensor], path: Path | str, config: TaehvConfig = TAEW2_1
) -> dict[str, torch.Tensor]:
    """Our module's state dict from a released one; the first missing key, unknown decoder key or wrong shape
    is a WeightsError. Encoder keys are accepted and ignored."""
    expected = {name: tuple(shape) for name, shape in _shapes(config).items()}
    names = released_names(config)
    ours: dict[str, torch.Tensor] = {}
    for name, key in names.items():
        if key not in state:
            raise WeightsError(f"not a taew2_1 decoder: missing key {key} (re-run `{TAE_DOWNLOAD_COMMAND}`)", path)
        tensor = state[key]
        if tuple(tensor.shape) != expected[name]:
            raise WeightsError(f"not a taew2_1 decoder: {key} has shape {list(tensor.shape)}, expected "
                               f"{list(expected[name])}", path)  # fmt: skip
        if not tensor.is_floating_point():
            raise WeightsError(f"not a taew2_1 decoder: {key} holds {tensor.dtype}, not floating point", path)
        ours[name] = tensor
    known = set(names.values())
    for key in state:
        if key not in known and not key.startswith(ENCODER_PREFIX):
            raise WeightsError(f"not a taew2_1 decoder: unexpected key {key}", path)
    return ours


def _shapes(config: TaehvConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {name: p.shape for name, p in TaehvDecoder(config).state_dict().items()}


def load_taehv(
    path: Path | str, device: torch.device, dtype: torch.dtype, config: TaehvConfig = TAEW2_1
) -> TaehvDecoder:
    """The decoder with the file's weights, on `device` in `dtype`, channels-last, in eval mode."""
    state = checked_decoder_state(read_state(path), path, config)
    with torch.device("meta"):
        decoder = TaehvDecoder(config)
    decoder.load_state_dict(state, assign=True)
    return prepared(decoder, device, dtype)


def prepared(decoder: TaehvDecoder, device: torch.device, dtype: torch.dtype) -> TaehvDecoder:
    """On `device` in `dtype`, its convolutions' weights channels-last, no gradients."""
    decoder = decoder.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    return decoder.eval().requires_grad_(False)


def released_state(decoder: TaehvDecoder) -> dict[str, torch.Tensor]:
    """The decoder's weights in the released layout (the inverse of `checked_decoder_state`), e.g. to write a file."""
    names = released_names(decoder.config)
    return {names[name]: tensor.detach().contiguous() for name, tensor in decoder.state_dict().items()}
