"""Reading model files: the one torch-file loader, the one transformer-config reader, and their error.

Every problem with a model file, whichever part of the model it holds, is a `WeightsError` that names the
file and says what to do.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

from .settings import WAN_1_3B, SettingsError, TransformerConfig

DOWNLOAD_COMMAND = "memflow weights download"
TRUNCATED = f"truncated or corrupt: re-run {DOWNLOAD_COMMAND}"


class WeightsError(RuntimeError):
    """The model's files are missing, incomplete, unreadable, do not fit the model or cannot be fetched.

    `path` is the file at fault, where there is one (the message then starts with it).
    """

    def __init__(self, message: str, path: Path | str | None = None):
        super().__init__(message if path is None else f"{path}: {message}")
        self.path = None if path is None else Path(path)


def read_torch_file(path: Path | str) -> Any:
    """torch.load, safely (weights_only) and memory-mapped: tensors are mapped from the file, not read."""
    import torch  # here, not with the module: `WeightsError` costs no torch import

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"file not found: run `{DOWNLOAD_COMMAND}`", path)
    try:
        return torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _unpickler_reason(err)
        if not reason.startswith("Unsupported global"):  # random bytes, a cut or foreign file: no pickle at all
            raise WeightsError(f"not a torch checkpoint ({reason}): {TRUNCATED}", path) from None
        # intact, but holds objects that safe loading refuses
        raise WeightsError(f"holds objects that weights_only loading refuses ({reason})", path) from None
    except Exception as err:  # a cut zip has no central directory: RuntimeError; else EOFError, ValueError...
        raise WeightsError(f"{TRUNCATED} ({type(err).__name__})", path) from None


def prefetch_files(*paths: Path | str | None) -> None:
    """Ask the kernel to read these files (or folders' files) into the page cache in the background.

    Loading maps checkpoints rather than reading them, so their pages are read as tensors are copied;
    read-ahead started early lets the disk work while Python imports and builds modules. Best effort:
    where the system has no `posix_fadvise`, or a file cannot be opened, nothing happens.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        for file in sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]:
            try:
                descriptor = os.open(file, os.O_RDONLY)
            except OSError:
                continue
            try:
                advise(descriptor, 0, 0, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(descriptor)


def _unpickler_reason(err: pickle.UnpicklingError) -> str:
    """The one informative line of torch's long weights_only message."""
    match = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(?:\. Please|\n|$)", str(err))
    return match.group(1) if match else type(err).__name__


def read_json_config(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a config file; a WeightsError naming the file if it is missing, unreadable or not an
    object (`what` it should hold, for the message)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError("config file not found", path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"not a readable JSON config ({err})", path) from None
    if not isinstance(data, dict):
        raise WeightsError(f"expected a JSON object with {what}", path)
    return data


def read_transformer_config(path: Path | str | None) -> TransformerConfig:
    """The transformer's shape from a Wan `config.json` (original or diffusers naming); Wan2.1 1.3B if None."""
    if path is None:
        return WAN_1_3B
    path = Path(path)
    data = read_json_config(path, "the Wan transformer config")
    try:
        if data.get("_class_name") == "WanTransformer3DModel":
            data = _wan_config_from_diffusers(data)
        return TransformerConfig.from_wan_config(data)
    except (SettingsError, TypeError, ValueError, KeyError) as err:
        raise WeightsError(f"unusable transformer config: {err}", path) from None


def _wan_config_from_diffusers(config: dict[str, Any]) -> dict[str, Any]:
    """diffusers `WanTransformer3DModel` config -> original Wan config.json names."""
    heads = config["num_attention_heads"]
    return {
        "model_type": "t2v" if config.get("image_dim") is None else "i2v",
        "dim": heads * config["attention_head_dim"],
        "ffn_dim": config["ffn_dim"],
        "num_heads": heads,
        "num_layers": config["num_layers"],
        "freq_dim": config["freq_dim"],
        "text_dim": config["text_dim"],
        "in_dim": config["in_channels"],
        "out_dim": config["out_channels"],
        "patch_size": config["patch_size"],
        "eps": config["eps"],
        "qk_norm": bool(config.get("qk_norm")),
        "cross_attn_norm": config["cross_attn_norm"],
    }
