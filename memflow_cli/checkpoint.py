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
from pathlib import Path

import torch

from .loading import WeightsError, read_torch_file, read_transformer_config
from .model.transformer import PLAIN_KERNELS, CausalWanTransformer, Kernels
from .settings import LoraSettings, TransformerConfig

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
    merged = dict(state)
    for module, (a, b) in lora.items():
        rank = a.shape[0]
        if settings.rank is not None and rank != settings.rank:
            message = f"LoRA rank is {rank} in the file but {settings.rank} in the settings; use matching --lora-rank"
            raise WeightsError(message, source)
        key = f"{module}.weight"
        if key not in merged:
            raise WeightsError(f"LoRA targets {module!r}, which the transformer does not have", source)
        weight = merged[key]
        if b.shape[1] != rank or (b.shape[0], a.shape[1]) != tuple(weight.shape):
            raise WeightsError(
                f"LoRA for {module!r} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                f"which do not fit its weight {tuple(weight.shape)}",
                source,
            )
        delta = (b.float() @ a.float()) * (settings.alpha / rank)
        merged[key] = (weight.float() + delta).to(weight.dtype)
    return merged


def load_transformer(
    base: Path,
    lora: Path | None = None,
    config: Path | TransformerConfig | None = None,
    lora_settings: LoraSettings | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    kernels: Kernels = PLAIN_KERNELS,
) -> CausalWanTransformer:
    """Build the causal transformer from MemFlow checkpoints, LoRA merged, on `device` in `dtype`, with `kernels`."""
    model_config = config if isinstance(config, TransformerConfig) else read_transformer_config(config)
    with ThreadPoolExecutor(1, thread_name_prefix="memflow-lora") as pool:
        lora_state = pool.submit(read_lora_state, Path(lora)) if lora is not None else None
        state = read_base_state(Path(base))
        if lora_state is not None:
            state = merge_lora(state, lora_state.result(), lora_settings or LoraSettings(), lora)
    with torch.device("meta"):
        model = CausalWanTransformer(model_config, kernels)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
        raise WeightsError(f"does not match the transformer config: {'; '.join(parts)}", base)
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise WeightsError(
                f"tensor {name!r} has shape {tuple(state[name].shape)}, the config expects {tuple(tensor.shape)} "
                "(is config.json the one these weights were trained with?)",
                base,
            )
    model.load_state_dict(_to_device(state, torch.device(device), dtype), assign=True)
    return model.eval().requires_grad_(False)


def _to_device(state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of `state` on `device` in `dtype`, `COPY_THREADS` at a time."""
    with ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="memflow-copy") as pool:
        moved = pool.map(lambda tensor: tensor.to(device=device, dtype=dtype), state.values())
        return dict(zip(state, moved, strict=True))
