"""Which model files a video was made with: names, sizes, mtimes and cheap fingerprints."""

from __future__ import annotations

import functools
import hashlib
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .locate import ModelFiles

_MIB = 1 << 20


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
    """sha256 of (size, first MiB, last MiB), hex. Read once per process for a file that has not changed since
    (a load asks it of each file for the sidecar's identity and for the keys of the caches); a file written in
    the last few seconds is read every time, as its modification time may not show a write within the same
    tick of the file system's clock."""
    stat = path.stat()
    recent = time.time_ns() - stat.st_mtime_ns < _RECENT_NS
    return (_read_fingerprint if recent else _remembered_fingerprint)(path, stat.st_size, stat.st_mtime_ns, stat.st_ino)


def _read_fingerprint(path: Path, size: int, mtime_ns: int, inode: int) -> str:
    """The fingerprint of `path`, read; (size, mtime_ns, inode) say which version of the file it is."""
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    with path.open("rb") as handle:
        digest.update(handle.read(_MIB))
        if size > _MIB:
            handle.seek(max(size - _MIB, _MIB))
            digest.update(handle.read(_MIB))
    return digest.hexdigest()


_RECENT_NS = 5 * 10**9  # files written this recently are fingerprinted at every ask
_remembered_fingerprint = functools.lru_cache(maxsize=64)(_read_fingerprint)
