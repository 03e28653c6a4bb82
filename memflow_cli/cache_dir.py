"""memflow's cache folder, shared by the caches kept in it (prompt embeddings, merged transformers, compiled
kernels), and the file habits of the caches that evict: files written whole under a temporary name, and their
use recorded in their modification time."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

CACHE_DIR_ENV = "MEMFLOW_CACHE_DIR"
TEMPORARY_PREFIX = ".tmp-"  # a cache file being written; eviction leaves it alone until it is stale
STALE_TEMPORARY_S = 3600  # a temporary file this old was left by a process that died while writing it


def cache_root(environ: Mapping[str, str] = os.environ) -> Path:
    """memflow's cache folder: `$MEMFLOW_CACHE_DIR`, else `$XDG_CACHE_HOME/memflow`, else `~/.cache/memflow`."""
    if folder := environ.get(CACHE_DIR_ENV):
        return Path(folder).expanduser()
    if xdg := environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "memflow"
    return Path.home() / ".cache" / "memflow"


@contextmanager
def cache_file_written(target: Path) -> Iterator[Path]:
    """A temporary file (`TEMPORARY_PREFIX`) in `target`'s folder to write; it replaces `target` once the block
    ends without error, else it is removed: a reader sees the whole file or none."""
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=TEMPORARY_PREFIX, suffix=target.suffix)
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def touch(path: Path) -> None:
    """Record that a cache file was used now (it is evicted last); a read-only cache still serves its files."""
    try:
        os.utime(path)
    except OSError:
        pass
