"""Load MemFlow's transformer checkpoints: `base.pt`, `lora.pt` and a Wan `config.json`.

`base.pt` is a `torch.save` dict whose "generator" (or "generator_ema", or "model",
which the official single-prompt inference also accepts) entry holds the
original-Wan-named transformer weights under a `model.` prefix.
`lora.pt` is a PEFT adapter state dict (optionally under "generator_lora") for
every Linear inside the blocks; it is merged into the weights at load time.

Both files are read at once, memory-mapped where the format allows (`loading.read_torch_file`), and the
tensors are copied to the device by a few threads: a copy from a mapped file waits on the disk, not on
Python.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from .loading import WeightsError, read_torch_file, read_transformer_config
from .merged_cache import MergedCache, MergeKey
from .model.build import build_transformer
from .model.transformer import PLAIN_KERNELS, CausalWanTransformer, Kernels
from .settings import LoraSettings, TransformerConfig
from .weights.identity import file_fingerprint

BASE_KEYS = ("generator", "generator_ema", "model")  # the first one present is read
LORA_KEY = "generator_lora"
WRAPPER_PREFIX = "model."
PEFT_PREFIX = "base_model.model."
FSDP_WRAPPER = "_fsdp_wrapped_module."
COPY_THREADS = 4  # tensors copied to the device at once


def _tensor_dict(path: Path, value: object, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(value, dict) or not all(isinstance(v, torch.Tensor) for v in value.values()):
        raise WeightsError(f"expected {what} to be a state dict of tensors", path)
    return value


def read_base_state(path: Path) -> dict[str, torch.Tensor]:
    """Original-Wan-named transformer weights from `base.pt` (prefixes stripped)."""
    data = read_torch_file(path)
    if not isinstance(data, dict):
        raise WeightsError("expected a dict with a 'generator' state dict", path)
    key = next((k for k in BASE_KEYS if k in data), None)
    if key is None:
        found = ", ".join(sorted(map(str, data))[:8]) or "nothing"
        raise WeightsError(f"expected a 'generator', 'generator_ema' or 'model' entry, found: {found}", path)
    state = _tensor_dict(path, data[key], f"'{key}'")
    cleaned = {}
    for name, tensor in state.items():
        name = name.replace(FSDP_WRAPPER, "")
        cleaned[name.removeprefix(WRAPPER_PREFIX)] = tensor
    return cleaned


def read_lora_state(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT LoRA pairs from `lora.pt`: module path -> (A [r, in], B [out, r])."""
    data = read_torch_file(path)
    if isinstance(data, dict) and LORA_KEY in data:
        data = data[LORA_KEY]
    state = _tensor_dict(path, data, "the LoRA state dict")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        module, sep, rest = name.removeprefix(PEFT_PREFIX).partition(".lora_")
        if not sep or rest.split(".")[0] not in ("A", "B"):
            expected = "expected '<module>.lora_A.weight' / 'lora_B.weight'"
            raise WeightsError(f"unexpected key {name!r}: {expected}", path)
        pairs.setdefault(module, {})[rest.split(".")[0]] = tensor
    result = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise WeightsError(f"module {module!r} has lora_{next(iter(pair))} but not its partner", path)
        result[module] = (pair["A"], pair["B"])
    if not result:
        raise WeightsError("no LoRA weights found", path)
    return result


def merge_lora(
    state: dict[str, torch.Tensor],
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
    settings: LoraSettings,
    source: Path | str = "lora.pt",
) -> dict[str, torch.Tensor]:
    """Return weights with W + (alpha / rank) * B @ A merged into every adapted Linear (computed in float32)."""
    for module, (a, b) in lora.items():
        _check_lora_pair(state, module, a, b, settings, source)
    merged = dict(state)
    for module, (a, b) in lora.items():
        key = f"{module}.weight"
        merged[key] = _merged_weight(state[key], a, b, settings.alpha)
    return merged


def _check_lora_pair(
    state: dict[str, torch.Tensor], module: str, a: torch.Tensor, b: torch.Tensor, settings: LoraSettings, source
) -> None:
    rank = a.shape[0]
    if settings.rank is not None and rank != settings.rank:
        message = f"LoRA rank is {rank} in the file but {settings.rank} in the settings; use matching --lora-rank"
        raise WeightsError(message, source)
    key = f"{module}.weight"
    if key not in state:
        raise WeightsError(f"LoRA targets {module!r}, which the transformer does not have", source)
    weight = state[key]
    if b.shape[1] != rank or (b.shape[0], a.shape[1]) != tuple(weight.shape):
        raise WeightsError(
            f"LoRA for {module!r} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
            f"which do not fit its weight {tuple(weight.shape)}",
            source,
        )


def _merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """W + (alpha / rank) * B @ A, in float32, rounded to W's dtype.

    In place in the product's buffer, with no float32 copy of W: W's values are exact in float32 and a float
    sum does not depend on its order, and a scale of 1 (the release's alpha = rank) changes no value, so the
    result is bit for bit that of `(W.float() + (B @ A) * scale).to(W.dtype)`, with fewer passes over memory.
    """
    delta = b.float() @ a.float()
    scale = alpha / a.shape[0]
    if scale != 1.0:
        delta.mul_(scale)
    exact = weight if weight.dtype != torch.float64 else weight.float()  # float64 rounds first, as before
    return delta.add_(exact).to(weight.dtype)


class MergeSource(str, Enum):
    """Where a load's transformer weights came from, as the sidecar reports it (`weights.lora_merge`)."""

    NO_LORA = "no LoRA"
    CACHED = "cached"  # the merged weights read from the merged-transformer cache (`merged_cache.py`)
    MERGED = "merged"  # merged at this load, no cache to keep them in
    MERGED_AND_CACHED = "merged, cached for the next load"


@dataclass(frozen=True)
class LoadedTransformer:
    model: CausalWanTransformer
    merge: MergeSource


def load_transformer(
    base: Path,
    lora: Path | None = None,
    config: Path | TransformerConfig | None = None,
    lora_settings: LoraSettings | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    kernels: Kernels = PLAIN_KERNELS,
    cache: MergedCache | None = None,
) -> CausalWanTransformer:
    """Build the causal transformer from MemFlow checkpoints, LoRA merged, on `device` in `dtype`, with `kernels`.

    With `cache`, merged weights are read from it where they are there, else merged and written to it.
    """
    return read_transformer(
        base, lora, config, lora_settings, device=device, dtype=dtype, kernels=kernels, cache=cache
    ).model


def read_transformer(
    base: Path,
    lora: Path | None = None,
    config: Path | TransformerConfig | None = None,
    lora_settings: LoraSettings | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    kernels: Kernels = PLAIN_KERNELS,
    cache: MergedCache | None = None,
) -> LoadedTransformer:
    """`load_transformer`, and where its weights came from."""
    model_config = config if isinstance(config, TransformerConfig) else read_transformer_config(config)
    settings = lora_settings or LoraSettings()
    device = torch.device(device)
    shapes = checkpoint_shapes(model_config)
    key = merge_key(base, lora, settings, dtype) if lora is not None and cache is not None else None
    state = cache.get(key, shapes, device) if key is not None else None
    if state is not None:
        return LoadedTransformer(build_transformer(model_config, state, kernels), MergeSource.CACHED)
    state = _read_merged(Path(base), None if lora is None else Path(lora), settings)
    _check_names_and_shapes(state, shapes, base)
    if key is None:
        merge = MergeSource.NO_LORA if lora is None else MergeSource.MERGED
        return LoadedTransformer(build_transformer(model_config, _to_device(state, device, dtype), kernels), merge)
    # the cache holds the weights in the model's dtype; this load copies the same values to the device
    state = _to_device(state, torch.device("cpu"), dtype)
    with ThreadPoolExecutor(1, thread_name_prefix="memflow-merged-cache") as pool:
        written = pool.submit(cache.put, key, state)
        state = _to_device(state, device, dtype)
        merge = MergeSource.MERGED_AND_CACHED if written.result() else MergeSource.MERGED
    return LoadedTransformer(build_transformer(model_config, state, kernels), merge)


def merge_key(base: Path, lora: Path, settings: LoraSettings | None, dtype: torch.dtype) -> MergeKey | None:
    """The merged-transformer cache's key for these files, LoRA settings (None: the default) and model dtype;
    None where a file is missing (reading it says so)."""
    if not (Path(base).is_file() and Path(lora).is_file()):
        return None
    settings = settings or LoraSettings()
    return MergeKey(
        base=file_fingerprint(base), lora=file_fingerprint(lora), rank=settings.rank, alpha=float(settings.alpha),
        dtype=str(dtype).removeprefix("torch."),
    )  # fmt: skip


def checkpoint_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a checkpoint of `config` (the plain model's state dict)."""
    with torch.device("meta"):
        model = CausalWanTransformer(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _read_merged(base: Path, lora: Path | None, settings: LoraSettings) -> dict[str, torch.Tensor]:
    """The base weights with the LoRA merged in, on the CPU (both files read at once)."""
    with ThreadPoolExecutor(1, thread_name_prefix="memflow-lora") as pool:
        lora_state = pool.submit(read_lora_state, lora) if lora is not None else None
        state = read_base_state(base)
        if lora_state is not None:
            state = merge_lora(state, lora_state.result(), settings, lora)
    return state


def _check_names_and_shapes(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], base: Path) -> None:
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
        raise WeightsError(f"does not match the transformer config: {'; '.join(parts)}", base)
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape:
            raise WeightsError(
                f"tensor {name!r} has shape {tuple(state[name].shape)}, the config expects {shape} "
                "(is config.json the one these weights were trained with?)",
                base,
            )


def _to_device(state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of `state` on `device` in `dtype`, `COPY_THREADS` at a time."""
    with ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="memflow-copy") as pool:
        moved = pool.map(lambda tensor: tensor.to(device=device, dtype=dtype), state.values())
        return dict(zip(state, moved, strict=True))
