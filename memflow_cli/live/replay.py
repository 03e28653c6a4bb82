"""The replay script of a live session: a story that `memflow render` turns into the same video.

It holds the seed, every setting (the memory's recording policy included, `interactive`), and every
segment with its start on the chunk grid, written so that it snaps back to the same chunk, and a
duration of exactly the chunks that were made. The first line marks it as memflow's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .. import __version__
from ..output import written_atomically
from ..script import Story, load_scripts
from ..settings import SETTING_NAMES, GenerationSettings, VideoGeometry
from ..text import plural

MARKER = "# memflow live session"  # the first line of every replay script memflow writes


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


def replay_text(
    *, title: str, seed: int, settings: GenerationSettings, segments: Sequence[ReplaySegment], chunks: int,
    video: Path, options: str = "",
) -> str:  # fmt: skip
    """The replay script of a session that made `chunks` chunks; `options`: the render options it needs."""
    geometry = settings.geometry
    story = {
        "title": title,
        "seed": seed,
        "duration": chunks * geometry.chunk_seconds,
        "settings": setting_values(settings),
        "segments": [
            {"start": segment.start_chunk * geometry.chunk_seconds, "prompt": segment.prompt} for segment in segments
        ],
    }
    body = yaml.safe_dump(story, sort_keys=False, allow_unicode=True, width=2**31 - 1)
    header = (
        f"{MARKER} (memflow {__version__}), {plural(chunks, 'chunk')} of {geometry.chunk_seconds:g} s: {video.name}\n"
        f"# replay on the same kind of device: memflow render {video.with_suffix('.yaml').name} -o replay.mp4"
        f"{options and ' ' + options}\n"
    )
    return header + body


def write_replay(path: Path, text: str) -> None:
    """Write the script atomically (`output.written_atomically`)."""
    with written_atomically(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def read_back(path: Path, geometry: VideoGeometry, chunks: int, starts: Sequence[int]) -> Story:
    """The written script as `render` reads it; raises AssertionError if it would not replay the session."""
    story = load_scripts(path, geometry=geometry)[0]
    timeline = story.timeline(geometry)
    if timeline.chunks != chunks or [s.start_chunk for s in timeline.segments] != list(starts):
        raise AssertionError(f"{path} does not replay the session: {timeline.chunks} chunks, starts "
                             f"{[s.start_chunk for s in timeline.segments]} instead of {chunks}, {list(starts)}")
    return story
