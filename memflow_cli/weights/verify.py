"""Check every file of the model without loading tensor data: present, non-empty, header readable."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..loading import (
    CONFIG_MAX_BYTES,
    DOWNLOAD_COMMAND,
    NOT_A_FILE_FIX,
    TOKENIZER_JSON_MAX_BYTES,
    TRUNCATED,
    WeightsError,
    not_a_file,
    read_json_file,
    read_torch_file,
)
from .locate import RELEASE_BYTES, ModelFiles, tokenizer_missing, weight_files


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
    if not result.ok and not result.detail.startswith(("missing", "empty")):  # what its contents say, then its size
        detail = f"{result.detail.removesuffix(f': {TRUNCATED}')}; {detail}"
    return CheckResult(result.name, result.path, False, detail)




def _present(name: str, path: Path) -> CheckResult | None:
    """A failed result when the file is absent, no regular file (a folder, a FIFO, a device) or empty, else None."""
    if kind := not_a_file(path):
        return CheckResult(name, path, False, f"{kind}: {NOT_A_FILE_FIX}")
    if not path.is_file():
        return CheckResult(name, path, False, f"missing: run `{DOWNLOAD_COMMAND}`")
    if path.stat().st_size == 0:
        return CheckResult(name, path, False, f"empty file: {TRUNCATED}")
    return None


def _check_torch_file(name: str, path: Path) -> CheckResult:
    if failed := _present(name, path):
        return failed
    try:
        content = read_torch_file(path)
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
    try:  # a tokenizer's tokenizer.json is MiBs; every other JSON of the model a config of KiBs
        read_json_file(path, TOKENIZER_JSON_MAX_BYTES if name.startswith("tokenizer/") else CONFIG_MAX_BYTES)
    except WeightsError as err:
        return CheckResult(name, path, False, str(err).removeprefix(f"{path}: "))
    return CheckResult(name, path, True, "valid JSON")


def _check_model_dir(role: str, folder: Path, stem: str) -> list[CheckResult]:
    results = [_check_json(f"{role}/config.json", folder / "config.json")]
    try:
        weights = weight_files(folder, stem)
    except WeightsError as err:
        index = folder / f"{stem}.safetensors.index.json"
        detail = str(err).removeprefix(f"{index}: ")
        return results + [CheckResult(f"{role}/{index.name}", index, False, detail)]
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
        for item in tokenizer_missing(folder.parent, folder.name)
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
