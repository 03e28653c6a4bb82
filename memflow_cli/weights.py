"""Locate, download, verify and load the model's files.

The real model needs the files the official MemFlow inference loads:

- the MemFlow transformer checkpoints, `base.pt` and `lora.pt`, from the hub repo `KlingTeam/MemFlow`
  (parsed and merged by `checkpoint.py`, only located and checked here);
- from `Wan-AI/Wan2.1-T2V-1.3B`: the umT5-XXL encoder `models_t5_umt5-xxl-enc-bf16.pth`, its tokenizer
  folder `google/umt5-xxl/`, the VAE `Wan2.1_VAE.pth` and the small `config.json` (never the transformer
  weights, which `base.pt` replaces).

They are found in the Hugging Face cache (`--model` not given), in a local folder in the layout
`download(to=...)` writes (`base.pt`, `lora.pt`, `Wan2.1-T2V-1.3B/`), or in a checkout of the official
MemFlow code (`checkpoints/`, `wan_models/Wan2.1-T2V-1.3B/`). The original umT5 and VAE state dicts are
converted on load: the VAE by diffusers' own converter, the umT5 by the key map of spec §11.3. Folders and
caches in the layout of `Wan-AI/Wan2.1-T2V-1.3B-Diffusers` (`text_encoder/`, `tokenizer/`, `vae/`: what
memflow downloaded before) load too; the official files win where both are present.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors import safe_open
from transformers import UMT5Config, UMT5EncoderModel

from memflow_cli.settings import WAN_1_3B, SettingsError, TransformerConfig
from memflow_cli.text_encoder import DEFAULT_MAX_LENGTH, TextEncoder, load_tokenizer

# -- where the files live ---------------------------------------------------------------------------------

MEMFLOW_REPO = "KlingTeam/MemFlow"
BASE_FILE = "base.pt"
LORA_FILE = "lora.pt"

# the layout of the official MemFlow code
OFFICIAL_CHECKPOINTS_DIR = "checkpoints"
OFFICIAL_WAN_DIR = "wan_models/Wan2.1-T2V-1.3B"
OFFICIAL_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
OFFICIAL_VAE_FILE = "Wan2.1_VAE.pth"
OFFICIAL_TOKENIZER_DIR = "google/umt5-xxl"
OFFICIAL_CONFIG_FILE = "config.json"

WAN_REPO = "Wan-AI/Wan2.1-T2V-1.3B"  # the official release, what the official inference loads
WAN_DIR = "Wan2.1-T2V-1.3B"  # its folder inside a local weights folder
WAN_PATTERNS = (OFFICIAL_T5_FILE, OFFICIAL_VAE_FILE, OFFICIAL_CONFIG_FILE, f"{OFFICIAL_TOKENIZER_DIR}/*")

# The sizes in bytes of the released files of `Wan-AI/Wan2.1-T2V-1.3B` (revision 37ec5126, as the hub's file
# records list them), relative to its folder. base.pt and lora.pt have no published size: they are checked by
# reading their headers only.
RELEASE_BYTES: dict[str, int] = {
    OFFICIAL_T5_FILE: 11_361_920_418,
    OFFICIAL_VAE_FILE: 507_609_880,
    OFFICIAL_CONFIG_FILE: 249,
    f"{OFFICIAL_TOKENIZER_DIR}/spiece.model": 4_548_313,
    f"{OFFICIAL_TOKENIZER_DIR}/tokenizer.json": 16_837_417,
    f"{OFFICIAL_TOKENIZER_DIR}/tokenizer_config.json": 61_728,
    f"{OFFICIAL_TOKENIZER_DIR}/special_tokens_map.json": 6_623,
}

# the same components in the Diffusers layout, which memflow downloaded before 0.2 and still loads
WAN_DIFFUSERS_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
WAN_DIFFUSERS_DIR = "Wan2.1-T2V-1.3B-Diffusers"  # its folder inside a local weights folder
WAN_DIFFUSERS_PATTERNS = ("text_encoder/*", "tokenizer/*", "vae/*", "transformer/config.json")

# huggingface_hub >= 1.2 raises this for a cached snapshot that lacks some of the requested files; older
# versions hand the snapshot folder back as it is (its missing parts are checked after, either way).
_INCOMPLETE_SNAPSHOT: tuple[type[Exception], ...] = tuple(
    error for error in (getattr(hub_errors, "IncompleteSnapshotError", None),) if error is not None
)

DOWNLOAD_COMMAND = "memflow weights download"
TRUNCATED = f"truncated or corrupt: re-run {DOWNLOAD_COMMAND}"

# The Wan2.1 VAE (diffusers `AutoencoderKLWan` names); the original `Wan2.1_VAE.pth` has no config of its own.
WAN21_VAE_CONFIG: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "latents_mean": [
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    ],
    "latents_std": [
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    ],
}

_MIB = 1 << 20


class WeightsError(RuntimeError):
    """The model's files are missing, incomplete, unreadable or cannot be fetched."""


@dataclass(frozen=True)
class ModelFiles:
    """Paths of everything the real model loads.

    `text_encoder_dir` and `vae` are diffusers folders (`text_encoder/`, `vae/`) or, in the official
    layout, the original single files (`models_t5_umt5-xxl-enc-bf16.pth`, `Wan2.1_VAE.pth`).
    """

    base: Path
    lora: Path
    text_encoder_dir: Path
    tokenizer_dir: Path
    vae: Path
    transformer_config: Path | None = None

    @property
    def layout(self) -> str:
        """'diffusers' (Wan2.1 Diffusers folders) or 'official' (the original Wan `.pth` files)."""
        return "official" if self.text_encoder_dir.suffix == ".pth" else "diffusers"

    def components(self) -> dict[str, Path]:
        """Role -> path, for every file or folder that is part of the model."""
        parts = {
            "base": self.base,
            "lora": self.lora,
            "transformer_config": self.transformer_config,
            "text_encoder": self.text_encoder_dir,
            "tokenizer": self.tokenizer_dir,
            "vae": self.vae,
        }
        return {role: path for role, path in parts.items() if path is not None}


# -- resolve ----------------------------------------------------------------------------------------------


def resolve_model(model: str | Path | None = None) -> ModelFiles:
    """Find the model's files: `None` = the Hugging Face cache, else a local weights folder.

    Raises WeightsError naming every missing file and the command that fetches them.
    """
    if model is None:
        return _resolve_cache()
    return _resolve_folder(Path(model).expanduser())


def hub_cache_dir() -> Path:
    """The hub cache, read from the environment at call time (HF_HUB_CACHE, then HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(hub_constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE forbids downloads (read at call time, as huggingface_hub parses it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"} or hub_constants.HF_HUB_OFFLINE


def _missing_error(missing: list[str], where: str, command: str = DOWNLOAD_COMMAND) -> WeightsError:
    listing = "\n".join(f"  - {item}" for item in missing)
    offline = " (HF_HUB_OFFLINE is set: unset it to download)" if hub_offline() else ""
    return WeightsError(f"model files missing from {where}:\n{listing}\nrun `{command}` to fetch them{offline}")


def _resolve_cache() -> ModelFiles:
    cache_dir = hub_cache_dir()
    base = _cached_file(MEMFLOW_REPO, BASE_FILE, cache_dir)
    lora = _cached_file(MEMFLOW_REPO, LORA_FILE, cache_dir)
    missing = [f"{MEMFLOW_REPO}: {name}" for name, path in ((BASE_FILE, base), (LORA_FILE, lora)) if path is None]
    wan_root = _cached_snapshot(WAN_REPO, WAN_PATTERNS, cache_dir)
    wan_missing = list(WAN_PATTERNS) if wan_root is None else _official_missing(wan_root)
    diffusers_root = _cached_snapshot(WAN_DIFFUSERS_REPO, WAN_DIFFUSERS_PATTERNS, cache_dir) if wan_missing else None
    if diffusers_root is not None and not _diffusers_missing(diffusers_root):
        wan_missing = []  # an earlier download in the Diffusers layout serves as well
    missing += [f"{WAN_REPO}: {item}" for item in wan_missing]
    if missing or base is None or lora is None:
        raise _missing_error(missing, f"the Hugging Face cache ({cache_dir})")
    if wan_root is not None and not _official_missing(wan_root):
        return _official_files(base, lora, wan_root)
    assert diffusers_root is not None
    return _diffusers_files(base, lora, diffusers_root)


def _cached_file(repo: str, name: str, cache_dir: Path) -> Path | None:
    try:
        return Path(hf_hub_download(repo, name, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def _cached_snapshot(repo: str, patterns: tuple[str, ...], cache_dir: Path) -> Path | None:
    """The cached snapshot folder of `repo`, even an incomplete one (its missing parts are checked after)."""
    try:
        folder = snapshot_download(repo, allow_patterns=list(patterns), cache_dir=cache_dir, local_files_only=True)
        return Path(folder)
    except _INCOMPLETE_SNAPSHOT as err:
        snapshot_path = getattr(err, "snapshot_path", None)
        return Path(snapshot_path) if snapshot_path else None
    except LocalEntryNotFoundError:
        return None


def _resolve_folder(root: Path) -> ModelFiles:
    if not root.is_dir():
        raise WeightsError(f"{root}: no such weights folder; run `{DOWNLOAD_COMMAND}` or pass an existing folder")
    checkpoints = root / OFFICIAL_CHECKPOINTS_DIR if (root / OFFICIAL_CHECKPOINTS_DIR).is_dir() else root
    base, lora = checkpoints / BASE_FILE, checkpoints / LORA_FILE
    missing = [str(p) for p in (base, lora) if not p.is_file()]
    layout, wan_root = _find_wan_root(root)
    parts_missing = _diffusers_missing(wan_root) if layout == "diffusers" else _official_missing(wan_root)
    missing += [str(wan_root / item) for item in parts_missing]
    if missing:
        raise _missing_error(missing, str(root), f"{DOWNLOAD_COMMAND} --to {root}")
    if layout == "diffusers":
        return _diffusers_files(base, lora, wan_root)
    return _official_files(base, lora, wan_root)


def _find_wan_root(root: Path) -> tuple[str, Path]:
    """Which Wan2.1 layout the folder holds, and where: the official files first, then the Diffusers folders;
    the official folder `download(to=root)` writes when there is neither."""
    for candidate in (root / WAN_DIR, root / OFFICIAL_WAN_DIR):
        if candidate.is_dir():
            return "official", candidate
    for candidate in (root / WAN_DIFFUSERS_DIR, root / "wan_models" / WAN_DIFFUSERS_DIR, root):
        if (candidate / "text_encoder").is_dir() or (candidate / "vae").is_dir():
            return "diffusers", candidate
    return "official", root / WAN_DIR


def _diffusers_missing(wan_root: Path) -> list[str]:
    """Required parts of a Wan2.1 Diffusers folder that are absent, relative to it."""
    missing = _tokenizer_missing(wan_root, "tokenizer")
    missing += _model_dir_missing(wan_root, "text_encoder", "model")
    missing += _model_dir_missing(wan_root, "vae", "diffusion_pytorch_model")
    return missing


def _official_missing(wan_dir: Path) -> list[str]:
    missing = [name for name in (OFFICIAL_T5_FILE, OFFICIAL_VAE_FILE) if not (wan_dir / name).is_file()]
    return missing + _tokenizer_missing(wan_dir, OFFICIAL_TOKENIZER_DIR)


def _tokenizer_missing(root: Path, folder: str) -> list[str]:
    vocab = [root / folder / name for name in ("tokenizer.json", "spiece.model")]
    missing = [] if any(p.is_file() for p in vocab) else [f"{folder}/tokenizer.json (or spiece.model)"]
    if not (root / folder / "tokenizer_config.json").is_file():
        missing.append(f"{folder}/tokenizer_config.json")
    return missing


def _model_dir_missing(root: Path, folder: str, stem: str) -> list[str]:
    """A transformers/diffusers model folder: config.json and one safetensors file or an index and its shards."""
    missing = [] if (root / folder / "config.json").is_file() else [f"{folder}/config.json"]
    try:
        weights = _weight_files(root / folder, stem)
    except WeightsError:
        return missing  # an unreadable index is reported by verify()
    if not weights:
        missing.append(f"{folder}/{stem}.safetensors")
    missing += [f"{folder}/{p.name}" for p in weights if not p.is_file()]
    return missing


def _weight_files(folder: Path, stem: str) -> list[Path]:
    """The safetensors files of a model folder: the single file, or the shards its index lists."""
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return [single]
    if not index.is_file():
        return []
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, AttributeError) as err:
        raise WeightsError(f"{index}: {TRUNCATED} ({err})") from None
    return [index] + [folder / name for name in shards]


def _diffusers_files(base: Path, lora: Path, wan_root: Path) -> ModelFiles:
    config = wan_root / "transformer" / "config.json"
    return ModelFiles(
        base=base,
        lora=lora,
        text_encoder_dir=wan_root / "text_encoder",
        tokenizer_dir=wan_root / "tokenizer",
        vae=wan_root / "vae",
        transformer_config=config if config.is_file() else None,
    )


def _official_files(base: Path, lora: Path, wan_dir: Path) -> ModelFiles:
    config = wan_dir / OFFICIAL_CONFIG_FILE
    return ModelFiles(
        base=base,
        lora=lora,
        text_encoder_dir=wan_dir / OFFICIAL_T5_FILE,
        tokenizer_dir=wan_dir / OFFICIAL_TOKENIZER_DIR,
        vae=wan_dir / OFFICIAL_VAE_FILE,
        transformer_config=config if config.is_file() else None,
    )


# -- download ---------------------------------------------------------------------------------------------


def download(to: Path | None = None) -> ModelFiles:
    """Fetch whatever is missing into the hub cache, or into the folder `to`; returns the resolved files.

    Under HF_HUB_OFFLINE nothing is fetched: the files are returned if all are present, else WeightsError
    says so and lists what is missing.
    """
    if hub_offline():
        try:
            return resolve_model(to)
        except WeightsError as err:
            raise WeightsError(f"HF_HUB_OFFLINE is set, so nothing can be downloaded.\n{err}") from None
    cache_dir = None if to is not None else hub_cache_dir()
    wan_dir = None if to is None else Path(to) / WAN_DIR
    for name in (BASE_FILE, LORA_FILE):
        fetch_file = partial(hf_hub_download, MEMFLOW_REPO, name, cache_dir=cache_dir, local_dir=to)
        _fetch(f"{MEMFLOW_REPO}/{name}", fetch_file)
    fetch_wan = partial(snapshot_download, WAN_REPO, allow_patterns=list(WAN_PATTERNS), cache_dir=cache_dir)
    _fetch(WAN_REPO, partial(fetch_wan, local_dir=wan_dir))
    return resolve_model(to)


def _fetch(what: str, fetch: Callable[[], Any]) -> None:
    try:
        fetch()
    except (HfHubHTTPError, OSError) as err:  # LocalEntryNotFoundError (no network) is an OSError
        raise WeightsError(
            f"could not download {what}: {err}\ncheck the network (and HF_TOKEN if the repo needs one), "
            f"then run `{DOWNLOAD_COMMAND}` again"
        ) from None


# -- verify -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """One file checked by `verify`: present, non-empty, header readable, size consistent."""

    name: str
    path: Path
    ok: bool
    detail: str

    def __str__(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.detail} ({self.path})"


def verify(files: ModelFiles, release_bytes: dict[str, int] = RELEASE_BYTES) -> list[CheckResult]:
    """Check every file of the model without loading tensor data (torch files are memory-mapped).

    In the official layout each file of the Wan release must also have its released size (`release_bytes`,
    relative to the Wan folder), and each of them must be there.
    """
    results: list[CheckResult] = []
    for role, path in files.components().items():
        if role == "tokenizer":
            results += _check_tokenizer(role, path)
        elif role == "transformer_config":
            results.append(_check_json(role, path))
        elif path.suffix in (".pt", ".pth"):
            results.append(_check_torch_file(role, path))
        else:
            stem = "model" if role == "text_encoder" else "diffusion_pytorch_model"
            results += _check_model_dir(role, path, stem)
    official = files.layout == "official"
    sizes = {files.vae.parent / name: size for name, size in release_bytes.items()} if official else {}
    checked = {result.path for result in results}
    results += [_present(name, path) for name, path in _release_names(files, sizes) if path not in checked]
    return [_against_release(result, sizes.get(result.path)) for result in results if result is not None]


def _release_names(files: ModelFiles, sizes: dict[Path, int]) -> list[tuple[str, Path]]:
    """(name for reports, path) of each released file, named after its role where it has one."""
    roles = {path: role for role, path in files.components().items()}
    names = []
    for path in sizes:
        folder_role = roles.get(path.parent)
        names.append((roles.get(path) or (f"{folder_role}/{path.name}" if folder_role else path.name), path))
    return names


def _against_release(result: CheckResult, expected_bytes: int | None) -> CheckResult:
    """The result, failed if the file's size is not the released one."""
    if expected_bytes is None or not result.path.is_file():
        return result
    actual = result.path.stat().st_size
    if actual < expected_bytes:
        detail = f"short: {actual:,} of {expected_bytes:,} bytes: {TRUNCATED}"
    elif actual > expected_bytes:
        detail = f"{actual:,} bytes where the release has {expected_bytes:,}: not the released file: {TRUNCATED}"
    else:
        return replace(result, detail=f"{result.detail}; size as released") if result.ok else result
    return CheckResult(result.name, result.path, False, detail)


def _present(name: str, path: Path) -> CheckResult | None:
    """A failed result when the file is absent or empty, else None."""
    if not path.is_file():
        return CheckResult(name, path, False, f"missing: run `{DOWNLOAD_COMMAND}`")
    if path.stat().st_size == 0:
        return CheckResult(name, path, False, f"empty file: {TRUNCATED}")
    return None


def _check_torch_file(name: str, path: Path) -> CheckResult:
    if failed := _present(name, path):
        return failed
    try:
        content = _torch_load(path)
    except WeightsError as err:
        return CheckResult(name, path, False, str(err).removeprefix(f"{path}: "))
    tensors = sum(1 for _ in _tensors(content))
    keys = ", ".join(list(content)[:4]) if isinstance(content, dict) else type(content).__name__
    return CheckResult(name, path, True, f"{_size(path)}, {tensors} tensors (top level: {keys})")


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _check_safetensors(name: str, path: Path) -> CheckResult:
    if failed := _present(name, path):
        return failed
    try:
        # safetensors checks that the header's offsets cover the file exactly: a cut file fails here
        with safe_open(str(path), framework="pt") as handle:
            tensors = len(list(handle.keys()))
    except Exception as err:  # SafetensorError for a bad header or a size mismatch
        return CheckResult(name, path, False, f"{TRUNCATED} ({err})")
    return CheckResult(name, path, True, f"{_size(path)}, {tensors} tensors")


def _check_json(name: str, path: Path) -> CheckResult:
    if failed := _present(name, path):
        return failed
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        return CheckResult(name, path, False, f"{TRUNCATED} (bad JSON: {err})")
    return CheckResult(name, path, True, "valid JSON")


def _check_model_dir(role: str, folder: Path, stem: str) -> list[CheckResult]:
    results = [_check_json(f"{role}/config.json", folder / "config.json")]
    try:
        weights = _weight_files(folder, stem)
    except WeightsError:
        index = folder / f"{stem}.safetensors.index.json"
        return results + [CheckResult(f"{role}/{index.name}", index, False, f"{TRUNCATED} (unreadable shard index)")]
    if not weights:
        single = folder / f"{stem}.safetensors"
        return results + [CheckResult(f"{role}/{single.name}", single, False, f"missing: run `{DOWNLOAD_COMMAND}`")]
    for path in weights:
        check = _check_json if path.name.endswith(".json") else _check_safetensors
        results.append(check(f"{role}/{path.name}", path))
    return results


def _check_tokenizer(role: str, folder: Path) -> list[CheckResult]:
    results = [
        CheckResult(f"{role}/{Path(item).name}", folder / Path(item).name, False, f"missing: run `{DOWNLOAD_COMMAND}`")
        for item in _tokenizer_missing(folder.parent, folder.name)
    ]
    for path in sorted(folder.glob("*.json")):
        results.append(_check_json(f"{role}/{path.name}", path))
    spiece, name = folder / "spiece.model", f"{role}/spiece.model"
    if spiece.exists():
        results.append(_present(name, spiece) or CheckResult(name, spiece, True, _size(spiece)))
    return results


def _size(path: Path) -> str:
    size, unit = float(path.stat().st_size), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"


# -- identity ---------------------------------------------------------------------------------------------


def weights_identity(files: ModelFiles) -> dict[str, Any]:
    """Names, sizes, mtimes and cheap fingerprints of every model file, for the render sidecar.

    The fingerprint is sha256 over the size and the first and last MiB: it tells two downloads apart
    without reading gigabytes.
    """
    entries = []
    for role, path in files.components().items():
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file() and not file.name.startswith("."):
                entries.append({"role": role, "name": file.relative_to(path.parent).as_posix(), **_identity(file)})
    return {"layout": files.layout, "files": entries}


def _identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {
        "path": str(path),
        "size": stat.st_size,
        "mtime": datetime.fromtimestamp(stat.st_mtime, tz=timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": file_fingerprint(path),
    }


def file_fingerprint(path: Path) -> str:
    """sha256 of (size, first MiB, last MiB), hex."""
    size = path.stat().st_size
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    with path.open("rb") as handle:
        digest.update(handle.read(_MIB))
        if size > _MIB:
            handle.seek(max(size - _MIB, _MIB))
            digest.update(handle.read(_MIB))
    return digest.hexdigest()


# -- load -------------------------------------------------------------------------------------------------


def load_vae(
    path: Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: dict[str, Any] | None = None,
) -> AutoencoderKLWan:
    """A diffusers `vae/` folder, or an original `Wan2.1_VAE.pth` converted by diffusers' Wan VAE converter.

    `config` (diffusers `AutoencoderKLWan` arguments) applies to a single file only; default: Wan2.1.
    """
    path = Path(path)
    if path.is_dir():
        vae = AutoencoderKLWan.from_pretrained(str(path), torch_dtype=dtype)
    else:
        vae = _vae_from_original(path, config or WAN21_VAE_CONFIG, dtype)
    # dtype is already right: diffusers' `to(dtype=...)` warns about fp32 modules even when there are none
    return vae.to(device).eval().requires_grad_(False)


def _vae_from_original(path: Path, config: dict[str, Any], dtype: torch.dtype) -> AutoencoderKLWan:
    """What `AutoencoderKLWan.from_single_file` does, offline, and strict about missing keys."""
    checkpoint = _torch_load(path)
    while "state_dict" in checkpoint:  # some exports nest the weights, as diffusers allows
        checkpoint = checkpoint["state_dict"]
    state = {key: tensor.to(dtype) for key, tensor in convert_wan_vae_to_diffusers(checkpoint).items()}
    with torch.device("meta"):  # the converted tensors become the parameters: no random init, no copy
        vae = AutoencoderKLWan(**copy.deepcopy(config))
    _load_strict(vae, state, path, assign=True)
    return vae


def load_text_encoder(
    files: ModelFiles,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> TextEncoder:
    """The tokenizer and umT5 encoder of either layout, on `device` in `dtype`."""
    if files.layout == "diffusers":
        return TextEncoder.from_folders(files.tokenizer_dir, files.text_encoder_dir, device, dtype, max_length)
    tokenizer = load_tokenizer(files.tokenizer_dir)
    return TextEncoder(tokenizer, load_wan_t5(files.text_encoder_dir, device, dtype), max_length)


def load_wan_t5(
    path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16
) -> UMT5EncoderModel:
    """The original Wan `models_t5_umt5-xxl-enc-bf16.pth` as a transformers `UMT5EncoderModel`."""
    original = _torch_load(path)
    config = umt5_config_from_wan_t5(original)
    with torch.device("meta"):  # no second copy of the weights: the loaded tensors are assigned
        encoder = UMT5EncoderModel(config)
    _load_strict(encoder, convert_wan_t5_to_umt5(original), path, assign=True, tied=_UMT5_TIED)
    encoder.tie_weights()  # the stack's input embedding is `shared`, one tensor (2 GB at XXL size)
    return encoder.to(device=device, dtype=dtype).eval()


_UMT5_TIED = frozenset({"encoder.embed_tokens.weight"})  # tied to shared.weight

# Wan umT5 encoder key -> transformers UMT5EncoderModel key (spec §11.3)
_T5_KEY_MAP: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^token_embedding\.weight$", "shared.weight"),
        (r"^blocks\.(\d+)\.attn\.([qkvo])\.weight$", r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
        (
            r"^blocks\.(\d+)\.pos_embedding\.embedding\.weight$",
            r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight",
        ),
        (r"^blocks\.(\d+)\.norm1\.weight$", r"encoder.block.\1.layer.0.layer_norm.weight"),
        (r"^blocks\.(\d+)\.ffn\.gate\.0\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
        (r"^blocks\.(\d+)\.ffn\.fc1\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
        (r"^blocks\.(\d+)\.ffn\.fc2\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
        (r"^blocks\.(\d+)\.norm2\.weight$", r"encoder.block.\1.layer.1.layer_norm.weight"),
        (r"^norm\.weight$", "encoder.final_layer_norm.weight"),
    )
)


def convert_wan_t5_to_umt5(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Wan umT5 encoder state dict to transformers' UMT5EncoderModel names."""
    converted = {}
    for key, tensor in state.items():
        for pattern, replacement in _T5_KEY_MAP:
            new_key, count = pattern.subn(replacement, key)
            if count:
                converted[new_key] = tensor
                break
        else:
            raise WeightsError(f"unexpected key {key!r} in the Wan umT5 checkpoint")
    return converted


def umt5_config_from_wan_t5(state: dict[str, torch.Tensor]) -> UMT5Config:
    """The UMT5 config of a Wan umT5 encoder state dict, read from its tensor shapes."""
    try:
        vocab_size, d_model = state["token_embedding.weight"].shape
        num_buckets, num_heads = state["blocks.0.pos_embedding.embedding.weight"].shape
        inner_dim = state["blocks.0.attn.q.weight"].shape[0]
        d_ff = state["blocks.0.ffn.fc1.weight"].shape[0]
    except KeyError as err:
        raise WeightsError(f"not a Wan umT5 encoder checkpoint: no {err.args[0]!r}") from None
    num_layers = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    return UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=inner_dim // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=128,  # Wan's T5RelativeEmbedding max_dist; not in the state dict
        feed_forward_proj="gated-gelu",  # gelu with the tanh approximation, as Wan's GELU
        layer_norm_epsilon=1e-6,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def _torch_load(path: Path) -> Any:
    """torch.load, safely (weights_only) and memory-mapped: tensors are mapped from the file, not read."""
    try:
        return torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: missing: run `{DOWNLOAD_COMMAND}`") from None
    except pickle.UnpicklingError as err:
        reason = _unpickler_reason(err)
        if not reason.startswith("Unsupported global"):  # random bytes, a cut or foreign file: no pickle at all
            raise WeightsError(f"{path}: not a torch checkpoint ({reason}): {TRUNCATED}") from None
        # intact, but holds objects that safe loading refuses
        raise WeightsError(f"{path}: holds objects that weights_only loading refuses ({reason})") from None
    except Exception as err:  # a cut zip has no central directory: RuntimeError; else EOFError, ValueError...
        raise WeightsError(f"{path}: {TRUNCATED} ({type(err).__name__})") from None


def _unpickler_reason(err: pickle.UnpicklingError) -> str:
    """The one informative line of torch's long weights_only message."""
    match = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(?:\. Please|\n|$)", str(err))
    return match.group(1) if match else type(err).__name__


def _load_strict(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    path: Path,
    assign: bool = False,
    tied: frozenset[str] = frozenset(),
) -> None:
    """load_state_dict that names missing and unexpected keys in one WeightsError; `tied` may be missing."""
    missing, unexpected = module.load_state_dict(state, strict=False, assign=assign)
    missing = [key for key in missing if key not in tied]
    if missing or unexpected:
        problems = [f"missing {k}" for k in missing[:5]] + [f"unexpected {k}" for k in unexpected[:5]]
        raise WeightsError(
            f"{path}: does not match {type(module).__name__} "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys: {', '.join(problems)})"
        )


def load_transformer_config(files: ModelFiles) -> TransformerConfig:
    """The DiT shape from the located config.json (original Wan or diffusers naming); Wan2.1 1.3B if none."""
    if files.transformer_config is None:
        return WAN_1_3B
    try:
        config = json.loads(files.transformer_config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise WeightsError(f"{files.transformer_config}: {TRUNCATED} ({err})") from None
    if config.get("_class_name") == "WanTransformer3DModel":
        config = _wan_config_from_diffusers(config)
    try:
        return TransformerConfig.from_wan_config(config)
    except SettingsError as err:
        raise WeightsError(f"{files.transformer_config}: {err}") from None


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
