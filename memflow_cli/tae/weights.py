"""The TAEHV decoder's weights: the released `taew2_1` layout read from `.pth` or `.safetensors`, checked, loaded.

The released file is a flat state dict of the reference's module: `decoder.<index>...` (the position of the
layer in its decoder sequence) and `encoder.<index>...` (ignored here). `released_shapes` lists its decoder
keys; `decoder_state` turns them into our module's final form (each stage's time-grow and 3x3 conv become one
2x2 phase kernel). Every problem (missing file, truncated file, a missing key, a wrong shape) is one
`WeightsError` line naming the file, the first mismatch and the fix.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..loading import DOWNLOAD_COMMAND, WeightsError, error_words, read_torch_file
from ..seeding import seeded
from .model import TAEW2_1, TaehvConfig, TaehvDecoder, cudnn_fusion_works, phase_kernel

TAE_REPO = "madebyollin/taehv"
TAE_FILE = "taew2_1.pth"
TAE_DOWNLOAD_COMMAND = "memflow weights download --decoder tae"
TAE_TRUNCATED = f"truncated or corrupt: re-run `{TAE_DOWNLOAD_COMMAND}`"
DECODER_PREFIX, ENCODER_PREFIX = "decoder.", "encoder."
# the decoder's tensors in float16, the released dtype: a smaller file cannot hold them
TAEW2_1_DECODER_VALUES = 9_844_611
TAEW2_1_MIN_BYTES = 2 * TAEW2_1_DECODER_VALUES


def released_shapes(config: TaehvConfig = TAEW2_1) -> dict[str, tuple[int, ...]]:
    """The decoder's keys in the released file and their shapes, in the reference's layer order.

    The reference's decoder is one sequence: [soft clamp, conv, ReLU], then per stage [memory blocks...,
    upsample, time-grow, conv], then [ReLU, conv]; only the convolutions hold parameters (weight, then bias).
    """
    widths, blocks = config.widths, config.blocks_per_stage
    shapes: dict[str, tuple[int, ...]] = {}
    _conv_shapes(shapes, "decoder.1", widths[0], config.latent_channels, 3, bias=True)
    for stage, (width, next_width, grows) in enumerate(_stage_widths(config)):
        base = 3 + stage * (blocks + 3)
        for block in range(blocks):
            for conv, channels_in in ((0, 2 * width), (2, width), (4, width)):
                _conv_shapes(shapes, f"decoder.{base + block}.conv.{conv}", width, channels_in, 3, bias=True)
        _conv_shapes(shapes, f"decoder.{base + blocks + 1}.conv", (2 if grows else 1) * width, width, 1, bias=False)
        _conv_shapes(shapes, f"decoder.{base + blocks + 2}", next_width, width, 3, bias=False)
    _conv_shapes(shapes, f"decoder.{_head_index(config)}", config.rgb_channels, widths[-1], 3, bias=True)
    return shapes


def _conv_shapes(shapes: dict, key: str, channels_out: int, channels_in: int, size: int, *, bias: bool) -> None:
    shapes[f"{key}.weight"] = (channels_out, channels_in, size, size)
    if bias:
        shapes[f"{key}.bias"] = (channels_out,)


def _stage_widths(config: TaehvConfig) -> list[tuple[int, int, bool]]:
    """(width, next width, grows in time) per stage; the last stage keeps its width."""
    widths = config.widths
    return list(zip(widths, (*widths[1:], widths[-1]), config.time_upscale, strict=True))


def _head_index(config: TaehvConfig) -> int:
    return 3 + len(config.widths) * (config.blocks_per_stage + 3) + 1


def decoder_state(released: dict[str, torch.Tensor], config: TaehvConfig = TAEW2_1) -> dict[str, torch.Tensor]:
    """Our module's state dict (float32) from the released decoder tensors: the stem, memory blocks and head
    as they are, each stage's time-grow and 3x3 conv folded into one 2x2 phase kernel (`model.phase_kernel`)."""
    blocks, head, kinds = config.blocks_per_stage, _head_index(config), ("weight", "bias")
    ours = {f"stem.{kind}": released[f"decoder.1.{kind}"] for kind in kinds}
    ours |= {f"head.{kind}": released[f"decoder.{head}.{kind}"] for kind in kinds}
    for stage in range(len(config.widths)):
        base = 3 + stage * (blocks + 3)
        for block in range(blocks):
            for name in (f"conv.{conv}.{kind}" for conv in (0, 2, 4) for kind in kinds):
                ours[f"stages.{stage}.blocks.{block}.{name}"] = released[f"decoder.{base + block}.{name}"]
        grow = released[f"decoder.{base + blocks + 1}.conv.weight"]
        ours[f"stages.{stage}.up.weight"] = phase_kernel(grow, released[f"decoder.{base + blocks + 2}.weight"])
    return {name: tensor.float() for name, tensor in ours.items()}


def taehv_from_released(released: dict[str, torch.Tensor], config: TaehvConfig = TAEW2_1) -> TaehvDecoder:
    """The decoder (float32, CPU, eval mode) with the weights of a released-layout state."""
    with torch.device("meta"):
        decoder = TaehvDecoder(config)
    decoder.load_state_dict(decoder_state(released, config), assign=True)
    return decoder.eval().requires_grad_(False)


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
        raise WeightsError(f"{TAE_TRUNCATED} ({error_words(err)})", path) from None


def checked_decoder_state(
    state: dict[str, torch.Tensor], path: Path | str, config: TaehvConfig = TAEW2_1
) -> dict[str, torch.Tensor]:
    """The decoder's tensors of a released state dict, checked: the first missing key, unknown decoder key or
    wrong shape is a WeightsError. Encoder keys are accepted and ignored."""
    expected = released_shapes(config)
    decoder: dict[str, torch.Tensor] = {}
    for key, shape in expected.items():
        if key not in state:
            raise WeightsError(f"not a taew2_1 decoder: missing key {key} (re-run `{TAE_DOWNLOAD_COMMAND}`)", path)
        tensor = state[key]
        if tuple(tensor.shape) != shape:
            raise WeightsError(f"not a taew2_1 decoder: {key} has shape {list(tensor.shape)}, expected "
                               f"{list(shape)}", path)  # fmt: skip
        if not tensor.is_floating_point():
            raise WeightsError(f"not a taew2_1 decoder: {key} holds {tensor.dtype}, not floating point", path)
        decoder[key] = tensor
    for key in state:
        if key not in expected and not key.startswith(ENCODER_PREFIX):
            raise WeightsError(f"not a taew2_1 decoder: unexpected key {key}", path)
    return decoder


def load_taehv(
    path: Path | str, device: torch.device, dtype: torch.dtype, config: TaehvConfig = TAEW2_1
) -> TaehvDecoder:
    """The decoder with the file's weights, on `device` in `dtype`, channels-last, in eval mode."""
    released = checked_decoder_state(read_state(path), path, config)
    return prepared(taehv_from_released(released, config), device, dtype)


def prepared(decoder: TaehvDecoder, device: torch.device, dtype: torch.dtype) -> TaehvDecoder:
    """On `device` in `dtype`, its convolutions' weights channels-last, no gradients; built with cuDNN's fused
    memory-block convolutions where they work on that device and dtype (`model.cudnn_fusion_works`)."""
    fused = cudnn_fusion_works(device, dtype, decoder.config.widths)
    if fused != decoder.fused_cuda:
        decoder = _rebuilt(decoder, fused)
    decoder = decoder.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    return decoder.eval().requires_grad_(False)


def _rebuilt(decoder: TaehvDecoder, fused_cuda: bool) -> TaehvDecoder:
    """The same decoder and weights, built with or without the fused memory-block convolutions."""
    with torch.device("meta"):
        rebuilt = TaehvDecoder(decoder.config, fused_cuda=fused_cuda)
    rebuilt.load_state_dict(decoder.state_dict(), assign=True)
    return rebuilt


# -- random weights -----------------------------------------------------------------------------------------

# gains of the fixtures' random weights (std = gain / sqrt(fan_in)): activations stay O(1) through the decoder
_GAIN_RELU, _GAIN_BLOCK_LAST, _GAIN_1X1, _GAIN_RGB = 2.0**0.5, 0.6, 1.0, 0.12
_BIAS_STD, _RGB_BIAS = 0.05, 0.5


def random_released_state(config: TaehvConfig = TAEW2_1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random decoder weights in the released layout (float32), whose frames are a plausible image range
    (mean ~0.5, in [0, 1]) rather than a constant: what `random_taehv` loads, and what tests write to files."""
    generator = seeded(seed)
    head = f"decoder.{_head_index(config)}."
    state: dict[str, torch.Tensor] = {}
    for key, shape in released_shapes(config).items():
        tensor = torch.empty(shape)
        if key.endswith(".weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            tensor.normal_(0.0, _gain(key, shape, head) / fan_in**0.5, generator=generator)
            if key.startswith(head):
                tensor -= tensor.mean(dim=(1, 2, 3), keepdim=True)
        else:
            tensor.normal_(0.0, _BIAS_STD, generator=generator)
            if key.startswith(head):
                tensor += _RGB_BIAS
        state[key] = tensor
    return state


def random_taehv(config: TaehvConfig = TAEW2_1, seed: int = 0) -> TaehvDecoder:
    """A decoder with `random_released_state`'s weights (float32, CPU, eval mode): the demo model's and the
    random-weights model's decoder."""
    return taehv_from_released(random_released_state(config, seed), config)


def _gain(key: str, shape: tuple[int, ...], head: str) -> float:
    if key.startswith(head):
        return _GAIN_RGB
    if ".conv.4." in key:
        return _GAIN_BLOCK_LAST
    return _GAIN_1X1 if shape[2:] == (1, 1) else _GAIN_RELU
