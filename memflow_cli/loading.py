"""Reading model files: the one torch-file loader, the one transformer-config reader, and their error.

Every problem with a model file, whichever part of the model it holds, is a `WeightsError` that names the
file and says what to do.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import stat
import warnings
import zipfile
from pathlib import Path
from typing import Any

from .settings import WAN_1_3B, SettingsError, TransformerConfig

DOWNLOAD_COMMAND = "memflow weights download"
TRUNCATED = f"truncated or corrupt: re-run {DOWNLOAD_COMMAND}"
NOT_A_FILE_FIX = f"put the released file there (`{DOWNLOAD_COMMAND}`)"
# A model's config.json is a few hundred bytes and a shard index some KiB; the tokenizer's tokenizer.json is the
# largest JSON of the release (16 MiB). Reading stops there: a file past its bound is no file of the release.
CONFIG_MAX_BYTES = 1 << 20
TOKENIZER_JSON_MAX_BYTES = 64 << 20


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
        kind = not_a_file(path)
        raise WeightsError(f"{kind}: {NOT_A_FILE_FIX}" if kind else f"file not found: run `{DOWNLOAD_COMMAND}`", path)
    try:
        with warnings.catch_warnings():  # torch warns of a plain pickle's protocol before refusing it: memflow
            warnings.simplefilter("ignore")  # says what is wrong with a file in its own one line
            return torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _unpickler_reason(err)
        if not reason.startswith("Unsupported global"):  # random bytes, a cut or foreign file: no pickle at all
            raise WeightsError(f"not a torch checkpoint ({reason}): {TRUNCATED}", path) from None
        # intact, but holds objects that safe loading refuses
        raise WeightsError(f"holds objects that weights_only loading refuses ({reason})", path) from None
    except Exception as err:  # a cut zip has no central directory: RuntimeError; else EOFError, ValueError...
        raise WeightsError(f"{TRUNCATED} ({_load_failure(err)})", path) from None


def _load_failure(err: Exception) -> str:
    """What torch.load's exception says about the file, in words."""
    if isinstance(err, EOFError):
        return "the file ends early"
    if isinstance(err, KeyError):  # torch's legacy reader looks the first byte up as a pickle opcode
        return "torch cannot read it: it starts with no pickle nor zip header"
    return f"torch cannot read it: {error_words(err)}"


def error_words(err: BaseException) -> str:
    """What a library's exception says, in words: the first sentence of its message (at most 160 characters), or
    what its kind means where it says nothing."""
    first = str(err).strip().split("\n")[0].split(". ")[0].strip()
    if first and not isinstance(err, KeyError):  # a KeyError's message is the bare key
        return first[:160]
    if isinstance(err, MemoryError):
        return "its sizes claim more memory than there is"
    if isinstance(err, (EOFError, KeyError, IndexError)):
        return "it ends early or lacks a part it names"
    return f"an unexpected {type(err).__name__}"


def not_a_file(path: Path | str) -> str | None:
    """What is at `path` when it is there but no regular file (`a folder`, `a named pipe (FIFO)`, `a device`...),
    following links; None for a regular file or nothing at all (a link to nothing is said so)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "a link to nothing" if path.is_symlink() else None
    except OSError as err:
        return f"unreadable ({err.strerror or type(err).__name__})"
    return None if stat.S_ISREG(mode) else _kind(mode)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO), not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device, not a file"
    if stat.S_ISSOCK(mode):
        return "a socket, not a file"
    return "not a regular file"


class NotARegularFile(ValueError):
    """What `read_regular_file` found is no regular file, or larger than asked; the message says which."""


class FileTooLarge(NotARegularFile):
    """`read_regular_file` found a regular file larger than asked."""


def read_regular_file(path: Path | str, max_bytes: int) -> bytes:
    """The bytes of the regular file at `path`, of at most `max_bytes`, read in bounded time and memory: opened
    without blocking (a FIFO is never waited on) and checked once open (no device is read, whatever a link
    names). OSError where it cannot be opened (FileNotFoundError where it is not there); NotARegularFile where it is
    no regular file, or holds more than `max_bytes`."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(_kind(mode))
        with os.fdopen(os.dup(descriptor), "rb") as file:
            data = file.read(max_bytes + 1)
    finally:
        os.close(descriptor)
    if len(data) > max_bytes:
        raise FileTooLarge(f"larger than {max_bytes:,} bytes")
    return data


def read_json_file(path: Path | str, max_bytes: int = CONFIG_MAX_BYTES) -> Any:
    """The JSON value of a small file memflow reads from a weights folder or cache; a WeightsError naming the file
    if it is missing, no regular file (a FIFO is never waited on, a device never read), larger than `max_bytes`,
    or no JSON (nesting too deep for Python's parser included)."""
    path = Path(path)
    try:
        raw = read_regular_file(path, max_bytes)
    except FileNotFoundError:
        raise WeightsError("file not found", path) from None
    except OSError as err:
        raise WeightsError(f"{not_a_file(path) or 'cannot be opened'} ({err.strerror or err})", path) from None
    except FileTooLarge as found:
        raise WeightsError(f"{found}, more than such a JSON file holds: {TRUNCATED}", path) from None
    except NotARegularFile as found:
        raise WeightsError(f"{found}: {NOT_A_FILE_FIX}", path) from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise WeightsError(f"not valid JSON (not UTF-8 text at byte {err.start}): {TRUNCATED}", path) from None
    except json.JSONDecodeError as err:
        raise WeightsError(f"not valid JSON ({err}): {TRUNCATED}", path) from None
    except (RecursionError, MemoryError):
        raise WeightsError(f"not valid JSON (nested too deeply to read): {TRUNCATED}", path) from None


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
                descriptor = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO is not waited on
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
    if blocked := re.search(r"unsupported GLOBAL (\S+?) whose module", str(err)):  # a blocked module's function
        return f"Unsupported global: {blocked.group(1)}"
    match = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(?:\. Please|\n|$)", str(err))
    return match.group(1) if match else "no pickle torch can read"


def read_json_config(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a config file; a WeightsError naming the file if it is missing, unreadable or not an
    object (`what` it should hold, for the message)."""
    data = read_json_file(path)
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
    except KeyError as err:
        raise WeightsError(f"unusable transformer config: the field {err} is missing", path) from None
    except TypeError as err:
        raise WeightsError(f"unusable transformer config: {err}", path) from None
    if problem := _config_problem(data):
        raise WeightsError(f"unusable transformer config: {problem}", path)
    try:
        return TransformerConfig.from_wan_config(data)
    except (SettingsError, TypeError, ValueError) as err:
        raise WeightsError(f"unusable transformer config: {err}", path) from None


# The largest value each size of a Wan config may take: far above any released model (Wan2.1 14B: dim 5120, ffn
# 13824, 40 heads and layers), low enough that the model's shapes stay computable (the model is built on the meta
# device and its checkpoint's shapes compared after).
_CONFIG_MAX = {
    "dim": 65536, "ffn_dim": 262144, "num_heads": 1024, "num_layers": 1024, "freq_dim": 65536, "text_dim": 65536,
    "text_len": 65536, "in_dim": 1024, "out_dim": 1024,
}  # fmt: skip
_PATCH_MAX = 64


def _config_problem(config: dict[str, Any]) -> str | None:
    """Why a Wan config's sizes cannot make a model (the field and what it must be), or None."""
    from .preview import preview

    for name, high in _CONFIG_MAX.items():
        value = config.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            return f"the field {name!r} is {preview(value)}: it must be a whole number from 1 to {high:,}"
    patch = config.get("patch_size", [1, 1, 1])
    sides = patch if isinstance(patch, list) and len(patch) == 3 else [0]
    if not all(isinstance(side, int) and not isinstance(side, bool) and 1 <= side <= _PATCH_MAX for side in sides):
        return f"the field 'patch_size' is {preview(patch)}: it must be 3 whole numbers from 1 to {_PATCH_MAX}"
    eps = config.get("eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:  # NaN fails here too
        return f"the field 'eps' is {preview(eps)}: it must be a number between 0 and 1, like 1e-06"
    for name in ("qk_norm", "cross_attn_norm"):
        if not isinstance(config.get(name, True), bool):
            return f"the field {name!r} is {preview(config[name])}: it must be true or false"
    return None


def _wan_config_from_diffusers(config: dict[str, Any]) -> dict[str, Any]:
    """diffusers `WanTransformer3DModel` config -> original Wan config.json names."""
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    if not all(isinstance(size, int) and not isinstance(size, bool) for size in (heads, head_dim)):
        raise TypeError("the fields 'num_attention_heads' and 'attention_head_dim' must be whole numbers")
    return {
        "model_type": "t2v" if config.get("image_dim") is None else "i2v",
        "dim": heads * head_dim,
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
