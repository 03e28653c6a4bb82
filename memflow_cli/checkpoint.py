"""Load MemFlow's transformer checkpoints: `base.pt`, `lora.pt` and a Wan `config.json`.

`base.pt` is a `torch.save` dict whose "generator" (or "generator_ema", or "model",
which the official single-prompt inference also accepts) entry holds the
original-Wan-named transformer weights under a `model.` prefix.
`lora.pt` is a PEFT adapter state dict (optionally under "generator_lora") for
every Linear inside the blocks; it is merged into the weights at load time.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch

from .model.transformer import PLAIN_KERNELS, CausalWanTransformer, Kernels
from .settings import WAN_1_3B, LoraSettings, SettingsError, TransformerConfig

BASE_KEYS = ("generator", "generator_ema", "model")  # the first one present is read
LORA_KEY = "generator_lora"
WRAPPER_PREFIX = "model."
PEFT_PREFIX = "base_model.model."
FSDP_WRAPPER = "_fsdp_wrapped_module."


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or does not match the model; names the file."""

    def __init__(self, path: Path | str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = Path(path)


def read_config(path: Path | None) -> TransformerConfig:
    """The transformer shape from a Wan `config.json`, or the Wan2.1-T2V-1.3B preset."""
    if path is None:
        return WAN_1_3B
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(path, "config file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(path, f"not a readable JSON config ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, "expected a JSON object with the Wan transformer config")
    try:
        return TransformerConfig.from_wan_config(data)
    except (SettingsError, TypeError, ValueError) as err:
        raise CheckpointError(path, f"unusable transformer config: {err}") from None


def _torch_load(path: Path) -> object:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(
            path, f"cannot read this checkpoint: it is truncated, corrupt or not a torch.save file ({err})"
        ) from None


def _tensor_dict(path: Path, value: object, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(value, dict) or not all(isinstance(v, torch.Tensor) for v in value.values()):
        raise CheckpointError(path, f"expected {what} to be a state dict of tensors")
    return value


def read_base_state(path: Path) -> dict[str, torch.Tensor]:
    """Original-Wan-named transformer weights from `base.pt` (prefixes stripped)."""
    data = _torch_load(path)
    if not isinstance(data, dict):
        raise CheckpointError(path, "expected a dict with a 'generator' state dict")
    key = next((k for k in BASE_KEYS if k in data), None)
    if key is None:
        found = ", ".join(sorted(map(str, data))[:8]) or "nothing"
        raise CheckpointError(path, f"expected a 'generator', 'generator_ema' or 'model' entry, found: {found}")
    state = _tensor_dict(path, data[key], f"'{key}'")
    cleaned = {}
    for name, tensor in state.items():
        name = name.replace(FSDP_WRAPPER, "")
        cleaned[name.removeprefix(WRAPPER_PREFIX)] = tensor
    return cleaned


def read_lora_state(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT LoRA pairs from `lora.pt`: module path -> (A [r, in], B [out, r])."""
    data = _torch_load(path)
    if isinstance(data, dict) and LORA_KEY in data:
        data = data[LORA_KEY]
    state = _tensor_dict(path, data, "the LoRA state dict")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        module, sep, rest = name.removeprefix(PEFT_PREFIX).partition(".lora_")
        if not sep or rest.split(".")[0] not in ("A", "B"):
            raise CheckpointError(path, f"unexpected key {name!r}: expected '<module>.lora_A.weight' / 'lora_B.weight'")
        pairs.setdefault(module, {})[rest.split(".")[0]] = tensor
    result = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise CheckpointError(path, f"module {module!r} has lora_{next(iter(pair))} but not its partner")
        result[module] = (pair["A"], pair["B"])
    if not result:
        raise CheckpointError(path, "no LoRA weights found")
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
            raise CheckpointError(
                source, f"LoRA rank is {rank} in the file but {settings.rank} in the settings; use matching --lora-rank"
            )
        key = f"{module}.weight"
        if key not in merged:
            raise CheckpointError(source, f"LoRA targets {module!r}, which the transformer does not have")
        weight = merged[key]
        if b.shape[1] != rank or (b.shape[0], a.shape[1]) != tuple(weight.shape):
            raise CheckpointError(
                source,
                f"LoRA for {module!r} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                f"which do not fit its weight {tuple(weight.shape)}",
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
    model_config = config if isinstance(config, TransformerConfig) else read_config(config)
    state = read_base_state(Path(base))
    if lora is not None:
        state = merge_lora(state, read_lora_state(Path(lora)), lora_settings or LoraSettings(), lora)
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
        raise CheckpointError(base, f"does not match the transformer config: {'; '.join(parts)}")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                base,
                f"tensor {name!r} has shape {tuple(state[name].shape)}, the config expects {tuple(tensor.shape)} "
                "(is config.json the one these weights were trained with?)",
            )
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    return model.eval().requires_grad_(False)
