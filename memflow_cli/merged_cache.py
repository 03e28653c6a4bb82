"""The merged-transformer cache on disk: `base.pt` with `lora.pt` merged in, kept so that the merge runs once.

Merging the LoRA is most of a load (a float32 `B @ A` and an add for every adapted Linear, on the CPU). The
merged state dict, in the dtype the model runs (bf16 on CUDA, float32 on the CPU), is written once as
safetensors and read back straight to the device by later loads:

    $MEMFLOW_CACHE_DIR (else $XDG_CACHE_HOME/memflow, else ~/.cache/memflow)
        merged/<sha256 of the key>.safetensors

The key (`MergeKey`) is what the merged values depend on: the fingerprints of `base.pt` and `lora.pt`
(`weights.identity.file_fingerprint`: size, first and last MiB), the LoRA settings, the dtype and the
version of memflow's merge. Each file carries its key and format in its safetensors header. A file that is
cut short, of another format or key, or whose tensors are not the transformer's is ignored with one
warning and written again; a folder that cannot be written costs one warning and the load goes on. Files
are written to a temporary name and renamed, and only the `keep` most recently used stay (about 2.6 GiB
each for the 1.3B model in bf16). Deleting the folder is always safe: the next load merges again.
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
from safetensors import safe_open
from safetensors.torch import save_file

from .cache_dir import STALE_TEMPORARY_S, TEMPORARY_PREFIX, cache_file_written, cache_root, touch

log = logging.getLogger(__name__)

FORMAT = "memflow-merged-transformer"
# memflow's merge: W + (alpha / rank) * (B @ A) in float32, rounded to the base's dtype, then to the model's.
# A change to that arithmetic must change this number, so that no earlier file is read.
MERGE_VERSION = 1
SUFFIX = ".safetensors"
KEEP_ENV = "MEMFLOW_MERGED_CACHE_FILES"
DEFAULT_KEEP = 2


@dataclass(frozen=True)
class MergeKey:
    """What the merged weights depend on; two loads with equal keys merge to the same values."""

    base: str  # fingerprint of base.pt
    lora: str  # fingerprint of lora.pt
    rank: int | None  # the LoRA settings (None: the file's rank)
    alpha: float
    dtype: str  # e.g. "bfloat16"
    merge: int = MERGE_VERSION

    @property
    def text(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @property
    def file_name(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest() + SUFFIX


@dataclass(frozen=True)
class MergedCacheSettings:
    """Where merged transformers are kept and how many files at most (0: none, the merge runs every load)."""

    folder: Path
    keep: int = DEFAULT_KEEP

    @property
    def enabled(self) -> bool:
        return self.keep > 0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> MergedCacheSettings:
        """`merged/` of `cache_root()`, keeping `$MEMFLOW_MERGED_CACHE_FILES` files (default 2; 0 turns it off)."""
        folder = cache_root(environ) / "merged"
        raw = environ.get(KEEP_ENV, "").strip()
        if not raw:
            return cls(folder)
        if not raw.isdigit():
            log.warning(
                "%s=%r is not a whole number of files (like 2; 0 turns the cache off): the merged-transformer "
                "cache keeps its default of %d files", KEEP_ENV, raw, DEFAULT_KEEP,
            )  # fmt: skip
            return cls(folder)
        return cls(folder, int(raw))


class MergedCache:
    """Merged transformer state dicts on disk, one file per `MergeKey`."""

    def __init__(self, settings: MergedCacheSettings):
        self.folder = settings.folder
        self.keep = settings.keep

    def path(self, key: MergeKey) -> Path:
        return self.folder / key.file_name

    def get(
        self, key: MergeKey, shapes: Mapping[str, tuple[int, ...]], device: torch.device
    ) -> dict[str, torch.Tensor] | None:
        """The merged state dict of `key` on `device`, or None: not cached, or not usable (warned).

        `shapes` are the transformer's tensors (name -> shape): a file that holds anything else is not used.
        """
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            state = self._read(path, key, shapes, device)
        except ValueError as problem:
            log.warning("ignored the cached merged transformer %s (%s): the LoRA is merged again", path, problem)
            return None
        touch(path)  # recently used: evicted last
        return state

    def _read(
        self, path: Path, key: MergeKey, shapes: Mapping[str, tuple[int, ...]], device: torch.device
    ) -> dict[str, torch.Tensor]:
        try:
            with safe_open(path, framework="pt", device=str(device)) as file:
                metadata = file.metadata() or {}
                if metadata.get("format") != FORMAT:
                    raise ValueError("not a memflow merged-transformer file")
                if metadata.get("key") != key.text:
                    raise ValueError("made from other files or settings")
                names = set(file.keys())
                if names != set(shapes):
                    raise ValueError(f"holds {len(names)} tensors that are not the transformer's {len(shapes)}")
                state = {name: file.get_tensor(name) for name in shapes}
        except ValueError:
            raise
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for a cut file
            raise ValueError(f"unreadable: {type(error).__name__}") from None
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(shapes[name]) or tensor.dtype != _dtype(key):
                raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}")
        return state

    def put(self, key: MergeKey, state: Mapping[str, torch.Tensor]) -> bool:
        """Store `state` (CPU tensors in the key's dtype) under `key`, then evict the least recently used
        files past `keep`; False (warned) where the folder cannot be written."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with cache_file_written(self.path(key)) as temporary:
                save_file(_own_storage(state), temporary, metadata={"format": FORMAT, "key": key.text})
            self._evict()
        except OSError as error:
            log.warning(
                "cannot write the merged-transformer cache in %s (%s): the LoRA is merged at every load",
                self.folder, error.strerror or error,
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


def _dtype(key: MergeKey) -> torch.dtype:
    return getattr(torch, key.dtype)
