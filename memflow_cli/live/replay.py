"""The replay script of a live session: a story that `memflow render` turns into the same video.

It holds the seed, every setting (the memory's recording policy included, `interactive`), and every
segment with its start on the chunk grid, written so that it snaps back to the same chunk, and a
duration of exactly the chunks that were made. The first line marks it as memflow's. Every text (the title, the
prompts, a setting's word) is written double-quoted, so that memflow's reader gives it back as it was, however it
looks: `1e5`, `1:30`, `yes`, `null`, `#` and `: ` stay text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .. import __version__
from ..output import written_atomically
from ..script import ScriptError, Segment, Story, load_scripts
from ..settings import SETTING_NAMES, GenerationSettings, VideoGeometry
from ..text import plural

MARKER = "# memflow live session"  # the first line of every replay script memflow writes


class ReplayError(Exception):
    """The replay script could not be written, or would not replay the session: one line for the user."""


class _Text(str):
    """Text the replay script writes double-quoted (escapes for tabs, newlines and the like), never as a number."""


class _ReplayDumper(yaml.SafeDumper):
    """PyYAML's safe dumper that writes `_Text` double-quoted."""


_ReplayDumper.add_representer(
    _Text, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", str(text), style='"')
)


def _quoted(value: Any) -> Any:
    """`value` with every text in it (inside lists too) written double-quoted."""
    if isinstance(value, str):
        return _Text(value)
    if isinstance(value, list):
        return [_quoted(item) for item in value]
    return value


@dataclass(frozen=True)
class ReplaySegment:
    start_chunk: int
    prompt: str


def is_replay_script(path: Path) -> bool:
    """Whether `path` is a replay script memflow wrote (its first line is the marker)."""
    try:
        with path.open("rb") as f:
            return f.readline().decode("utf-8", errors="replace").startswith(MARKER)
    except OSError:
        return False


def setting_values(settings: GenerationSettings) -> dict[str, Any]:
    """Every user-facing setting (names as in `SETTING_NAMES`) with its value, as YAML writes it."""
    values: dict[str, Any] = {}
    for name, (group, attribute) in SETTING_NAMES.items():
        value = getattr(getattr(settings, group), attribute)
        if value is None:
            continue
        values[name] = list(value) if isinstance(value, tuple) else value
    return values


def replay_story(
    *, path: Path, title: str, seed: int, settings: GenerationSettings, segments: Sequence[ReplaySegment], chunks: int
) -> Story:  # fmt: skip
    """The story the replay script of a session that made `chunks` chunks holds (`replay_text` writes it)."""
    chunk_s = settings.geometry.chunk_seconds
    return Story(path=path, title=title, seed=seed, duration_s=chunks * chunk_s,
                 segments=tuple(Segment(s.start_chunk * chunk_s, s.prompt) for s in segments),
                 settings=setting_values(settings))  # fmt: skip


def replay_text(
    *, title: str, seed: int, settings: GenerationSettings, segments: Sequence[ReplaySegment], chunks: int,
    video: Path, options: str = "",
) -> str:  # fmt: skip
    """The replay script of a session that made `chunks` chunks; `options`: the render options it needs."""
    geometry = settings.geometry
    story = {
        "title": _Text(title),
        "seed": seed,
        "duration": chunks * geometry.chunk_seconds,
        "settings": {name: _quoted(value) for name, value in setting_values(settings).items()},
        "segments": [
            {"start": segment.start_chunk * geometry.chunk_seconds, "prompt": _Text(segment.prompt)}
            for segment in segments
        ],
    }
    body = yaml.dump(story, Dumper=_ReplayDumper, sort_keys=False, allow_unicode=True, width=2**31 - 1)
    header = (
        f"{MARKER} (memflow {__version__}), {plural(chunks, 'chunk')} of {geometry.chunk_seconds:g} s: {video.name}\n"
        f"# replay on the same kind of device: memflow render {video.with_suffix('.yaml').name} -o replay.mp4"
        f"{options and ' ' + options}\n"
    )
    return header + body


def write_replay(path: Path, text: str, expected: Story, geometry: VideoGeometry) -> Story:
    """Write the script atomically (`output.written_atomically`) and read it back as `render` reads it.

    Raises ReplayError where it cannot be written (a folder in its place, a full disk: nothing is left at
    `path`), or where it would not replay `expected` (then it is removed).
    """
    try:
        with written_atomically(path) as temporary:
            temporary.write_text(text, encoding="utf-8")
    except OSError as error:
        raise ReplayError(f"cannot write the replay script {path}: {error.strerror or error}") from None
    try:
        return read_back(path, expected, geometry)
    except ReplayError:
        path.unlink(missing_ok=True)
        raise


def read_back(path: Path, expected: Story, geometry: VideoGeometry) -> Story:
    """The written script as `render` reads it; raises ReplayError if it would not replay `expected`."""
    try:
        story = load_scripts(path, geometry=geometry)[0]
    except ScriptError as error:
        raise ReplayError(f"the replay script {path} would not replay the session: {error}") from None
    wanted = (expected.title, expected.seed, expected.timeline(geometry), expected.settings)
    if (story.title, story.seed, story.timeline(geometry), story.settings) != wanted:
        raise ReplayError(f"the replay script {path} would not replay the session: it reads back as another story")
    return story
