"""The files of one output, compared as a case-insensitive file system compares them: by their names in lower
case (`Straße` and `Strasse` are two names, `X.MP4` and `x.mp4` one).

A video `X.mp4` comes with companions: its sidecar `X.json`, its lock `.X.mp4.lock`, its hidden partial
`.X.partial.mp4` and, for `live`, its replay script `X.yaml`. The extension check ignores case, so `X.MP4`
and `X.mp4` share the sidecar and the replay script; on a case-insensitive file system (macOS, Windows
shares) `x.mp4` and `X.mp4` are one file altogether. So outputs are compared by their names in lower case on
every file system: two outputs whose names fold to one are one output, and a second spelling of an output
already on disk is refused instead of clobbering the first one's companions.
"""

from __future__ import annotations

import os
from pathlib import Path


def output_key(target: Path) -> tuple[str, str]:
    """What makes two outputs one: the folder as written, and the file name in lower case."""
    return str(target.parent), target.name.lower()


def one_file(first: Path, second: Path) -> bool:
    """Whether two existing paths are one file, or would be on a case-insensitive file system."""
    try:
        if first.samefile(second):
            return True
    except OSError:  # one of them is missing
        return False
    return str(first.resolve()).lower() == str(second.resolve()).lower()


def other_spelling(target: Path, *companions: Path) -> str | None:
    """The name of a file in `target`'s folder that is `target`, or one of its `companions` in that folder,
    spelled in other case (`X.MP4` for `x.mp4`, `.X.partial.mp4` for `.x.partial.mp4`)."""
    wanted = {path.name.lower(): path.name for path in (target, *companions)}
    try:
        with os.scandir(target.parent) as entries:
            for entry in entries:
                written = wanted.get(entry.name.lower())
                if written is not None and entry.name != written:
                    return entry.name
    except OSError:  # a missing or unreadable folder: the folder checks say so
        return None
    return None


def spelling_problem(target: Path, *companions: Path) -> tuple[str, str] | None:
    """A message and a hint when the folder holds `target`, or one of its `companions` (its partial file),
    spelled otherwise; None when it does not."""
    twin = other_spelling(target, *companions)
    if twin is None:
        return None
    if twin.lower() != target.name.lower():  # a companion: another spelling's render left or is writing it
        message = (
            f"cannot write {target}: {target.parent / twin} is there, the partial video of an output whose name "
            f"differs from {target.name} only in case, and the two names are one output; nothing was rendered"
        )
        return message, "render to that output's name (watch or move its partial file first), or choose another name"
    message = (
        f"cannot write {target}: {target.parent / twin} is there, and the two names are one output (its metadata "
        f"{target.with_suffix('.json').name} and partial file would be shared); nothing was rendered"
    )
    return message, f"name the output {twin} (with --overwrite to replace it), or choose another name"
