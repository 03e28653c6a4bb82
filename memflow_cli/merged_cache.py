"""State dicts kept on disk so that a load does its work once: the merged transformer (`base.pt` with
`lora.pt` merged in) and the converted VAE (`Wan2.1_VAE.pth` in diffusers' names).

Merging the LoRA is most of a load (a float32 `B @ A` and an add for every adapted Linear, on the CPU). The
merged state dict, in the dtype the model runs (bf16 on CUDA, float32 on the CPU), is written once as
safetensors and read back straight to the device by later loads:

    $MEMFLOW_CACHE_DIR (else $XDG_CACHE_HOME/memflow, else ~/.cache/memflow)
        merged/<sha256 of the key>.safetensors     the merged transformer (`MergeKey`)
        vae/<sha256 of the key>.safetensors        the converted VAE (`ConvertKey`)

The key (`MergeKey`) is what the merged values depend on: the fingerprints of `base.pt` and `lora.pt`
(`weights.identity.file_fingerprint`: size, first and last MiB), the LoRA settings, the dtype and the
version of memflow's merge. Each file carries its key and format in its safetensors header. A file that is
cut short, of another format or key, or whose tensors are not the transformer's is ignored with one
warning and written again; a folder that cannot be written costs one warning and the load goes on. Files
are written to a temporary name and renamed, and only the `keep` most recently used stay (about 2.6 GiB
each for the 1.3B model in bf16). Deleting the folder is always safe: the next load merges again.

The original `Wan2.1_VAE.pth` is kept the same way, converted by diffusers' converter and cast to the
model's dtype (0.25 GiB in bf16): a later load reads it without the pickle, the conversion or the cast.
Its key (`ConvertKey`) is the file's fingerprint, the VAE's configuration, the dtype and the converter's
version (diffusers'); its folder keeps as many files as the merged transformer's (one setting, `CachedKind`
says which folder and format).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .cache_dir import STALE_TEMPORARY_S, TEMPORARY_PREFIX, cache_file_written, cache_root, touch
from .loading import error_words
from .text import ascii_int

log = logging.getLogger(__name__)

# memflow's merge: W + (alpha / rank) * (B @ A) in float32, rounded to the base's dtype, then to the model's.
# A change to that arithmetic must change this number, so that no earlier file is read.
MERGE_VERSION = 1
# memflow's conversion of the original VAE: diffusers' converter, then a cast to the model's dtype.
CONVERT_VERSION = 1
SUFFIX = ".safetensors"
KEEP_ENV = "MEMFLOW_MERGED_CACHE_FILES"
DEFAULT_KEEP = 2
MAX_KEEP = 1000  # files of GiBs each: more is no bound


@dataclass(frozen=True)
class CachedKind:
    """One kind of state dict the cache keeps: its folder, its files' format and what a load does without it."""

    folder: str  # under `cache_root()`
    format: str  # in every file's header
    label: str  # for messages: "merged-transformer"
    remade: str  # what a load does when the file is not usable: "the LoRA is merged"


MERGED_TRANSFORMER = CachedKind("merged", "memflow-merged-transformer", "merged-transformer", "the LoRA is merged")
CONVERTED_VAE = CachedKind("vae", "memflow-converted-vae", "converted-VAE", "the VAE file is converted")


class _Key:
    """A key's text (stored in its file's header) and its file's name (the text's sha256)."""

    @property
    def text(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @property
    def file_name(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest() + SUFFIX


@dataclass(frozen=True)
class MergeKey(_Key):
    """What the merged weights depend on; two loads with equal keys merge to the same values."""

    base: str  # fingerprint of base.pt
    lora: str  # fingerprint of lora.pt
    rank: int | None  # the LoRA settings (None: the file's rank)
    alpha: float
    dtype: str  # e.g. "bfloat16"
    merge: int = MERGE_VERSION


@dataclass(frozen=True)
class ConvertKey(_Key):
    """What the converted VAE depends on; two loads with equal keys convert to the same values."""

    vae: str  # fingerprint of Wan2.1_VAE.pth
    config: str  # the AutoencoderKLWan arguments, as JSON
    dtype: str  # e.g. "bfloat16"
    converter: str  # diffusers' version: its converter names the tensors
    convert: int = CONVERT_VERSION


@dataclass(frozen=True)
class MergedCacheSettings:
    """Where a kind of state dict is kept and how many files at most (0: none, the work is done every load)."""

    folder: Path
    keep: int = DEFAULT_KEEP
    kind: CachedKind = MERGED_TRANSFORMER

    @property
    def enabled(self) -> bool:
        return self.keep > 0

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] = os.environ, kind: CachedKind = MERGED_TRANSFORMER
    ) -> MergedCacheSettings:
        """`kind`'s folder of `cache_root()` (`merged/`), keeping `$MEMFLOW_MERGED_CACHE_FILES` files (default 2;
        0 turns it off)."""
        folder = cache_root(environ) / kind.folder
        raw = environ.get(KEEP_ENV, "").strip()
        if not raw:
            return cls(folder, kind=kind)
        keep = ascii_int(raw) if len(raw) <= len(str(MAX_KEEP)) else None
        if keep is None or not 0 <= keep <= MAX_KEEP:
            log.warning(
                "%s=%r is not a whole number of files (like 2, at most %d; 0 turns the cache off): the %s "
                "cache keeps its default of %d files", KEEP_ENV, raw, MAX_KEEP, kind.label, DEFAULT_KEEP,
            )  # fmt: skip
            return cls(folder, kind=kind)
        return cls(folder, keep, kind)


class MergedCache:
    """State dicts of one kind (the merged transformer, the converted VAE) on disk, one file per key."""

    def __init__(self, settings: MergedCacheSettings):
        self.folder = settings.folder
        self.keep = settings.keep
        self.kind = settings.kind

    def path(self, key: MergeKey | ConvertKey) -> Path:
        return self.folder / key.file_name

    def get(
        self,
        key: MergeKey | ConvertKey,
        shapes: Mapping[str, tuple[int, ...]],
        device: torch.device,
        unread: tuple[str, ...] = (),
    ) -> dict[str, torch.Tensor] | None:
        """The state dict of `key` on `device`, or None: not cached, or not usable (warned).

        `shapes` are the model's tensors (name -> shape): a file that holds anything else is not used, except
        tensors whose names start with one of `unread`, which are left unread (the VAE's encoder).
        """
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            state = self._read(path, key, shapes, device, unread)
        except ValueError as problem:
            kind = self.kind
            log.warning("ignored the cached %s file %s (%s): %s again", kind.label, path, problem, kind.remade)
            return None
        touch(path)  # recently used: evicted last
        return state

    def _read(
        self,
        path: Path,
        key: MergeKey | ConvertKey,
        shapes: Mapping[str, tuple[int, ...]],
        device: torch.device,
        unread: tuple[str, ...],
    ) -> dict[str, torch.Tensor]:
        try:
            with safe_open(path, framework="pt", device=str(device)) as file:
                metadata = file.metadata() or {}
                if metadata.get("format") != self.kind.format:
                    raise ValueError(f"not a memflow {self.kind.label} file")
                if metadata.get("key") != key.text:
                    raise ValueError("made from other files or settings")
                names = {name for name in file.keys() if not name.startswith(unread)}  # noqa: SIM118
                if names != set(shapes):
                    raise ValueError(f"holds {len(names)} tensors that are not the model's {len(shapes)}")
                state = {name: file.get_tensor(name) for name in shapes}
        except ValueError:
            raise
        except (OSError, SafetensorError) as error:  # a cut or garbled file (not an out-of-memory: that is raised)
            raise ValueError(f"unreadable: {error_words(error)}") from None
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(shapes[name]) or tensor.dtype != _dtype(key):
                raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}")
        return state

    def put(self, key: MergeKey | ConvertKey, state: Mapping[str, torch.Tensor]) -> bool:
        """Store `state` (CPU tensors in the key's dtype) under `key`, then evict the least recently used
        files past `keep`; False (warned) where the folder cannot be written."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with cache_file_written(self.path(key)) as temporary:
                save_file(_own_storage(state), temporary, metadata={"format": self.kind.format, "key": key.text})
            self._evict()
        except OSError as error:
            log.warning(
                "cannot write the %s cache in %s (%s): %s at every load",
                self.kind.label, self.folder, error.strerror or error, self.kind.remade,
            )  # fmt: skip
            return False
        return True

    def _evict(self) -> None:
        """Delete all but the `keep` most recently used files (and temporary files left by dead processes)."""
        files = []
        now = time.time()
        for path in self.folder.glob("*" + SUFFIX):
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:  # another process evicted it
                continue
            if path.name.startswith(TEMPORARY_PREFIX):
                if now - mtime >= STALE_TEMPORARY_S:
                    path.unlink(missing_ok=True)
                continue
            files.append((mtime, path))
        for _, path in sorted(files, reverse=True)[self.keep :]:
            path.unlink(missing_ok=True)


def _own_storage(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every tensor contiguous and in a storage of its own (what safetensors writes): a tensor
    whose storage an earlier one shares (a checkpoint of views) is copied."""
    tensors, storages = {}, set()
    for name, tensor in state.items():
        tensor = tensor.contiguous()
        storage = tensor.untyped_storage().data_ptr()
        tensors[name] = tensor.clone() if storage in storages else tensor
        storages.add(storage)
    return tensors


def _dtype(key: MergeKey | ConvertKey) -> torch.dtype:
    return getattr(torch, key.dtype)
