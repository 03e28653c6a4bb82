"""memflow's cache folder, shared by the caches kept in it (prompt embeddings, compiled kernels)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

CACHE_DIR_ENV = "MEMFLOW_CACHE_DIR"


def cache_root(environ: Mapping[str, str] = os.environ) -> Path:
    """memflow's cache folder: `$MEMFLOW_CACHE_DIR`, else `$XDG_CACHE_HOME/memflow`, else `~/.cache/memflow`."""
    if folder := environ.get(CACHE_DIR_ENV):
        return Path(folder).expanduser()
    if xdg := environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "memflow"
    return Path.home() / ".cache" / "memflow"
