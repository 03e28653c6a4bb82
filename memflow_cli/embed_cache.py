"""The prompt-embedding cache on disk: a prompt encoded once is read back, not encoded again.

One file per prompt and text encoder, `<sha256 of the key>.safetensors` in `embeddings/` of the user's
cache folder (`cache_root`). The key is the prompt's text and the encoder's identity (which weights,
dtype, device kind, text length); the file carries its key and a format version in its safetensors
header, so a file that is truncated, corrupt, of another version or of another key is ignored with one
warning and the prompt is encoded again. Files are written to a temporary name and renamed, so a reader
never sees half a file. The folder is kept under a size bound by evicting the least recently used files
(a hit touches its file's mtime). A folder that cannot be written costs one warning and the render goes on.

Only the rows up to the last non-zero one are stored (umT5 pads a prompt's ~100 tokens with zero rows up
to 512), in the encoder's dtype: the float32 embeddings it returns are exact in that dtype.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from .cache_dir import STALE_TEMPORARY_S, TEMPORARY_PREFIX, cache_file_written, cache_root, touch
from .loading import error_words, read_regular_file

log = logging.getLogger(__name__)

FORMAT = "memflow-prompt-embedding"
VERSION = 1
SUFFIX = ".safetensors"
DEFAULT_GIB = 2.0
MAX_GIB = 2.0**20  # a PiB: more than any disk; a larger bound is no size (and 1e308 GiB no whole number of bytes)
SIZE_ENV = "MEMFLOW_EMBED_CACHE_GIB"
_TENSOR = "embeds"
MAX_FILE_BYTES = 64 << 20  # the real model's file is 4 MiB at most (512 x 4096 bf16 values)


@dataclass(frozen=True)
class EmbedCacheSettings:
    """Where the prompt-embedding cache lives and how large it may grow (0 bytes: no cache)."""

    folder: Path
    max_bytes: int = int(DEFAULT_GIB * 2**30)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> EmbedCacheSettings:
        """`embeddings/` of `cache_root()`, bounded by `$MEMFLOW_EMBED_CACHE_GIB` (default 2; 0 turns it off)."""
        folder = cache_root(environ) / "embeddings"
        raw = environ.get(SIZE_ENV, "").strip()
        if not raw:
            return cls(folder)
        try:  # the digits 0-9 only: float() would also read `1_0` and other scripts' digits
            gib = float(raw) if raw.isascii() and "_" not in raw else math.nan
        except ValueError:
            gib = math.nan
        if not math.isfinite(gib) or not 0 <= gib <= MAX_GIB:
            log.warning(
                "%s=%r is not a size in GiB (like 2 or 0.5, at most 2**20; 0 turns the cache off): the "
                "prompt-embedding cache keeps its default of %g GiB", SIZE_ENV, raw, DEFAULT_GIB,
            )  # fmt: skip
            return cls(folder)
        return cls(folder, int(gib * 2**30))


def encoder_key(**identity: Any) -> str:
    """The canonical text of a text encoder's identity (sorted JSON): what its cached files are keyed by."""
    return json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)


class EmbeddingCache:
    """Prompt -> embeddings [text_len, dim] float32 on disk, for one text encoder (`encoder` is its key)."""

    def __init__(self, settings: EmbedCacheSettings, encoder: str, dtype: torch.dtype = torch.float32):
        self.folder = settings.folder
        self.max_bytes = settings.max_bytes
        self.encoder = encoder
        self.dtype = dtype  # stored in this dtype: the encoder's, in which its output is exact
        self._writable = True

    def _key(self, prompt: str) -> str:
        return json.dumps({"encoder": self.encoder, "prompt": prompt}, sort_keys=True, separators=(",", ":"))

    def path(self, prompt: str) -> Path:
        """The file that holds (or would hold) `prompt`'s embeddings."""
        return self.folder / (hashlib.sha256(self._key(prompt).encode("utf-8")).hexdigest() + SUFFIX)

    # -- reading ---------------------------------------------------------------------------------------

    def get(self, prompt: str) -> torch.Tensor | None:
        """The cached embeddings of `prompt` (float32 on the CPU), or None: not cached, or not usable (warned)."""
        path = self.path(prompt)
        try:
            embeds = self._decode(_file_bytes(path), prompt)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:
            log.warning("cannot read the cached prompt embedding %s (%s): the prompt is encoded again", path, error)
            return None
        except ValueError as problem:
            log.warning("ignored the cached prompt embedding %s (%s): the prompt is encoded again", path, problem)
            return None
        touch(path)  # recently used: evicted last
        return embeds

    def _decode(self, data: bytes, prompt: str) -> torch.Tensor:
        """The embeddings in a cache file's bytes; ValueError says why they cannot be used."""
        metadata = _header_metadata(data)
        if metadata.get("format") != FORMAT:
            raise ValueError("not a memflow prompt-embedding file")
        if metadata.get("version") != str(VERSION):
            raise ValueError(f"format version {metadata.get('version')}, this memflow reads {VERSION}")
        if metadata.get("key") != self._key(prompt):
            raise ValueError("made for another prompt or text encoder")
        try:
            rows = load(data)[_TENSOR]
            text_len, dim = int(metadata["text_len"]), int(metadata["dim"])
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for a cut file
            raise ValueError(f"unreadable: {error_words(error)}") from None
        if rows.dim() != 2 or rows.shape[0] > text_len or rows.shape[1] != dim:
            raise ValueError(f"holds a tensor of shape {tuple(rows.shape)}, not up to [{text_len}, {dim}]")
        if rows.dtype != self.dtype:  # the file is written in the encoder's dtype: another one was not written so
            raise ValueError(f"holds {rows.dtype} values where the text encoder's are {self.dtype}")
        if not torch.isfinite(rows).all():  # a render from such embeddings is a black video
            raise ValueError("holds values that are not finite (NaN or infinity)")
        embeds = torch.zeros(text_len, dim, dtype=torch.float32)
        embeds[: rows.shape[0]] = rows.float()
        return embeds

    # -- writing ---------------------------------------------------------------------------------------

    def put_many(self, items: Mapping[str, torch.Tensor]) -> None:
        """Store each prompt's embeddings [text_len, dim], then evict the least recently used files over the bound."""
        if not self._writable or not items:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for prompt, embeds in items.items():
                self._write(self.path(prompt), self._encode(prompt, embeds))
            self._evict()
        except OSError as error:
            self._writable = False  # one warning per cache, not one per prompt
            log.warning(
                "cannot write the prompt-embedding cache in %s (%s): prompts are encoded without it",
                self.folder, error.strerror or error,
            )  # fmt: skip

    def _encode(self, prompt: str, embeds: torch.Tensor) -> bytes:
        text_len, dim = embeds.shape
        used = embeds.abs().sum(dim=1).nonzero()
        rows = int(used[-1]) + 1 if len(used) else 0  # rows past the last non-zero one are zero
        metadata = {
            "format": FORMAT, "version": str(VERSION), "key": self._key(prompt),
            "text_len": str(text_len), "dim": str(dim),
        }  # fmt: skip
        return save({_TENSOR: embeds[:rows].to(self.dtype).contiguous()}, metadata=metadata)

    def _write(self, path: Path, data: bytes) -> None:
        """`data` to `path` atomically (`cache_dir.cache_file_written`)."""
        with cache_file_written(path) as temporary:
            temporary.write_bytes(data)

    def _evict(self) -> None:
        """Delete the least recently used files until the folder holds at most `max_bytes`.

        Another process's file being written is left alone; one left by a process that died is deleted first.
        """
        files = []
        now = time.time()
        for path in self.folder.glob("*" + SUFFIX):
            try:
                stat = path.stat()
            except FileNotFoundError:  # another process evicted it
                continue
            if path.name.startswith(TEMPORARY_PREFIX):
                if now - stat.st_mtime < STALE_TEMPORARY_S:
                    continue
                files.append((0, stat.st_size, path))
            else:
                files.append((stat.st_mtime_ns, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size

    def size_bytes(self) -> int:
        """Bytes the cache's files take now."""
        return sum(path.stat().st_size for path in self.folder.glob("*" + SUFFIX)) if self.folder.is_dir() else 0


def _file_bytes(path: Path) -> bytes:
    """A cache file's bytes: OSError where it cannot be read (FileNotFoundError where it is not there), ValueError
    where it is no regular file (a FIFO is not waited on, a device not read) or larger than any cache file."""
    return read_regular_file(path, MAX_FILE_BYTES)


def _header_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header (8-byte little-endian length, then JSON)."""
    if len(data) < 8:
        raise ValueError("truncated")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise ValueError("truncated")
    try:
        header = json.loads(data[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError("not a safetensors file") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}
