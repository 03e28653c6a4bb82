"""Narrative scripts: YAML or JSONL files -> a validated Story -> a Timeline on the chunk grid.

A story is a list of prompts, each starting at a time. The generator makes video in chunks of
`VideoGeometry.frames_per_chunk` latent frames, so every start snaps up to the next chunk boundary and
the prompt switches at most once per chunk; `Story.timeline` does that arithmetic.

Everything a script says is checked here, once. Any problem becomes one `ScriptError` naming the file,
the line, the field and the fix. Whatever a file holds, refusing it costs little: only regular files of a
bounded size are read, YAML is composed under limits on nesting and on values (aliases counted as what
they repeat), and messages show bounded previews of values (`preview.py`), never their whole `repr`.
"""

from __future__ import annotations

import bisect
import difflib
import itertools
import json
import math
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from memflow_cli.preview import WIDTH, cut, preview
from memflow_cli.settings import SETTING_NAMES, GenerationSettings, SettingsError, VideoGeometry
from memflow_cli.text import PROMPT_WHITESPACE, bidi_control, blank, lone_surrogate, one_line, plural, text_problem

YAML_SUFFIXES: tuple[str, ...] = (".yaml", ".yml")
JSONL_SUFFIXES: tuple[str, ...] = (".jsonl",)
STORY_KEYS: tuple[str, ...] = ("title", "seed", "duration", "segments", "settings")
SEGMENT_KEYS: tuple[str, ...] = ("start", "prompt")
JSONL_KEYS: tuple[str, ...] = ("prompts",)
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator accepts
MAX_TITLE_BYTES = 200  # a title names its video file: 255 bytes at most, less what memflow's temporary files add
# Limits that keep a hostile or mistaken script cheap to refuse: time and memory stay bounded whatever it holds.
MAX_YAML_BYTES = 2**18  # 256 KiB: 400 prompts of 100 words; PyYAML reads that in about 0.3 s on an idle core
MAX_JSONL_BYTES = 16 * 2**20  # 16 MiB: ten thousand stories of ten prompts
MAX_YAML_VALUES = 20_000  # values in one YAML story (an alias counts as the values it repeats)
MAX_YAML_TEXT = 4_000_000  # characters of text in one YAML story, an alias counting as the text it repeats
MAX_SEGMENTS = 2_000  # segments of one story: one every 10 s makes 5.5 hours
MAX_STORIES = 10_000  # stories of one JSONL file
MAX_JSONL_PROMPTS = 100_000  # prompts of one JSONL file, all stories together
MAX_NESTING = 32  # levels of lists and mappings in YAML; a story uses 4
MAX_TIME_CHARS = 40  # "1:02:03.5" is 9: anything longer is not a time, and is not matched against the patterns
MAX_DURATION_S = 24 * 3600.0  # the longest time a script, `--duration` or `live` may name: one day of video
SNAP_TOLERANCE = 1e-9  # in chunks: 10.5 s is chunk 14 exactly, not 15

TIME_HINT = "write it like 10s, 1m30s, 0:10 or 1:02.5"
TEXT_HINT = "write plain text: no lone \\ud800 escapes, no control characters (a prompt may hold tabs and newlines)"
SEGMENTS_HINT = "write segments as a list of `- start: 0s` / `  prompt: ...` entries"
JSONL_HINT = 'each line must look like {"prompts": ["first segment", "second segment"]}'

T = TypeVar("T")


class ScriptError(Exception):
    """A script cannot be used: where (file, line, field), what is wrong, and how to fix it."""

    def __init__(self, path: Path, line: int | None, field: str | None, message: str, hint: str = ""):
        super().__init__(path, line, field, message, hint)
        self.path = Path(path)
        self.line = line
        self.field = field
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        where = str(self.path) if self.line is None else f"{self.path}:{self.line}"
        text = ": ".join(part for part in (where, self.field, self.message) if part)
        return one_line(f"{text} — {self.hint}" if self.hint else text)  # a path, a key or a value may hold a newline


class InvalidValue(ValueError):
    """A value is wrong; whoever knows where it was written turns this into a ScriptError."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(f"{message} — {hint}" if hint else message)
        self.message = message
        self.hint = hint


# ---------------------------------------------------------------------------------------------------------------------
# Stories and their timelines


@dataclass(frozen=True)
class Segment:
    """One prompt and the time it starts, as written."""

    start_s: float
    prompt: str
    line: int | None = field(default=None, compare=False)  # where the start was written, for errors


@dataclass(frozen=True)
class TimelineSegment:
    """A segment placed on the chunk grid: where its prompt takes over, and for how long."""

    index: int
    prompt: str
    start_s: float  # as written
    start_chunk: int
    start_latent_frame: int
    start_video_frame: int
    snapped_start_s: float
    chunks: int
    video_frames: int


@dataclass(frozen=True)
class Timeline:
    """The chunks of one video and the prompt that drives each of them."""

    chunks: int
    latent_frames: int
    video_frames: int
    duration_s: float
    segments: tuple[TimelineSegment, ...]

    @property
    def switch_chunks(self) -> tuple[int, ...]:
        """Chunks at which the prompt changes (the starts of segments 1..n-1)."""
        return tuple(segment.start_chunk for segment in self.segments[1:])

    @property
    def prompts(self) -> tuple[str, ...]:
        return tuple(segment.prompt for segment in self.segments)

    def prompt_index_for_chunk(self, chunk: int) -> int:
        """Index of the segment whose prompt drives `chunk`."""
        if not 0 <= chunk < self.chunks:
            raise IndexError(f"chunk {chunk} is outside the timeline (0..{self.chunks - 1})")
        position = bisect.bisect_right(self.segments, chunk, key=lambda segment: segment.start_chunk) - 1
        return self.segments[position].index


@dataclass(frozen=True)
class Story:
    """A validated narrative: prompts with start times, a length, a seed and generation overrides."""

    path: Path
    title: str
    seed: int
    duration_s: float
    segments: tuple[Segment, ...]
    settings: dict[str, Any] = field(default_factory=dict)  # overrides, names from SETTING_NAMES
    line: int | None = None  # line of a JSONL story

    def __post_init__(self) -> None:
        _check_order(self)

    def timeline(self, geometry: VideoGeometry, duration_s: float | None = None) -> Timeline:
        """Snap the segments onto the chunk grid; `duration_s` cuts the video shorter (for previews)."""
        return _build_timeline(self, geometry, duration_s)


def _check_order(story: Story) -> None:
    """Segments start at 0, strictly increase, and all begin before the end of the story."""

    def fail(index: int, message: str, hint: str) -> ScriptError:
        segment = story.segments[index]
        return ScriptError(story.path, segment.line, f"segments[{index}].start", message, hint)

    if not story.segments:
        raise ScriptError(story.path, story.line, "segments", "a story needs at least one segment", SEGMENTS_HINT)
    if story.duration_s > MAX_DURATION_S:  # a default duration (a written one is checked as it is read)
        raise _too_long_by_default(story)
    first = story.segments[0].start_s
    if first != 0:
        message = f"the first segment starts at {format_seconds(first)}, not at 0s"
        raise fail(0, message, "start the first segment at 0s")
    pairs = itertools.pairwise(story.segments)
    for index, (before, segment) in enumerate(pairs, start=1):
        if segment.start_s <= before.start_s:
            relation = "the same time as" if segment.start_s == before.start_s else "before"
            message = (
                f"{format_seconds(segment.start_s)} is {relation} segments[{index - 1}] "
                f"({format_seconds(before.start_s)})"
            )
            raise fail(index, message, "starts must increase strictly: reorder the segments or fix the times")
    for index, segment in enumerate(story.segments):
        if segment.start_s >= story.duration_s:
            message = (
                f"{format_seconds(segment.start_s)} is at or after the end of the story "
                f"(duration {format_seconds(story.duration_s)})"
            )
            raise fail(index, message, "make the duration longer or remove this segment")


def _too_long_by_default(story: Story) -> ScriptError:
    """A story longer than a day by its default length: a JSONL story's prompts of `segment_seconds` each, or a YAML
    story's last start and one more segment."""
    ends = f"{format_seconds(story.duration_s)}, more than 24h, the longest video memflow makes"
    if story.line is not None:  # a JSONL story
        each = format_seconds(story.duration_s / len(story.segments))
        message = f"{plural(len(story.segments), 'prompt')} of {each} each last {ends}"
        return ScriptError(
            story.path, story.line, "prompts", message, "give fewer prompts or a shorter --segment-seconds"
        )
    index, last = len(story.segments) - 1, story.segments[-1]
    message = (
        f"without a duration the story ends a segment's length ({format_seconds(story.duration_s - last.start_s)}) "
        f"after its last start, at {ends}"
    )
    return ScriptError(
        story.path, last.line, f"segments[{index}].start", message, "give the story a duration of 24h or less"
    )


def chunk_for(seconds: float, geometry: VideoGeometry) -> int:
    """The first chunk starting at or after `seconds`."""
    return max(0, math.ceil(seconds / geometry.chunk_seconds - SNAP_TOLERANCE))


def _build_timeline(story: Story, geometry: VideoGeometry, limit_s: float | None) -> Timeline:
    # 1. snap every start onto the grid of the whole story, and check no two share a chunk
    story_chunks = chunk_for(story.duration_s, geometry)
    starts = [chunk_for(segment.start_s, geometry) for segment in story.segments]
    _check_grid(story, starts, story_chunks, geometry)

    # 2. cut to the preview length: segments starting at or after the cut are dropped
    chunks = story_chunks if limit_s is None else min(story_chunks, chunk_for(_check_limit(limit_s), geometry))
    kept = [start for start in starts if start < chunks]
    ends = [*kept[1:], chunks]

    # 3. frames: 3 latent frames per chunk, 4N-3 video frames for N latent frames
    latent_frames = geometry.frames_per_chunk * chunks
    video_frames = geometry.video_frames(latent_frames)
    segments = tuple(
        _place(index, story.segments[index], start, end, geometry)
        for index, (start, end) in enumerate(zip(kept, ends, strict=True))
    )
    return Timeline(chunks, latent_frames, video_frames, video_frames / geometry.fps, segments)


def _place(index: int, segment: Segment, start: int, end: int, geometry: VideoGeometry) -> TimelineSegment:
    start_latent = geometry.frames_per_chunk * start
    end_latent = geometry.frames_per_chunk * end
    start_video = geometry.video_frames(start_latent)
    return TimelineSegment(
        index=index,
        prompt=segment.prompt,
        start_s=segment.start_s,
        start_chunk=start,
        start_latent_frame=start_latent,
        start_video_frame=start_video,
        snapped_start_s=start * geometry.chunk_seconds,
        chunks=end - start,
        video_frames=geometry.video_frames(end_latent) - start_video,
    )


def _check_grid(story: Story, starts: list[int], chunks: int, geometry: VideoGeometry) -> None:
    """At most one prompt switch per chunk, and every segment keeps at least one chunk."""
    spacing = format_seconds(geometry.chunk_seconds)
    if chunks == 0:  # a duration that snaps to no chunk at all
        message = f"the duration ({story.duration_s:g}s) is too short for one chunk of video ({spacing})"
        raise ScriptError(story.path, story.line, "duration", message, "give a longer duration, such as 1s")
    for index in range(1, len(starts)):
        if starts[index] == starts[index - 1]:
            segment, before = story.segments[index], story.segments[index - 1]
            message = (
                f"{format_seconds(segment.start_s)} snaps to chunk {starts[index]}, the same chunk as "
                f"segments[{index - 1}] ({format_seconds(before.start_s)})"
            )
            hint = f"space starts at least {geometry.chunk_seconds:g} s apart: the prompt switches at most once a chunk"
            raise ScriptError(story.path, segment.line, f"segments[{index}].start", message, hint)
    for index, start in enumerate(starts):
        if start >= chunks:
            segment = story.segments[index]
            last = format_seconds((chunks - 1) * geometry.chunk_seconds)
            message = (
                f"{format_seconds(segment.start_s)} snaps to the {spacing} chunk grid at "
                f"{format_seconds(start * geometry.chunk_seconds)}, the end of the video"
            )
            hint = f"start it at {last} or earlier, or make the duration longer"
            raise ScriptError(story.path, segment.line, f"segments[{index}].start", message, hint)


def _check_limit(limit_s: float) -> float:
    if isinstance(limit_s, bool) or not isinstance(limit_s, (int, float)) or not 0 < limit_s < math.inf:
        raise ValueError(f"a duration limit must be a positive number of seconds, got {limit_s!r}")
    return float(limit_s)


# ---------------------------------------------------------------------------------------------------------------------
# Times

_NUMBER = r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+"  # ASCII digits only: "١s" and "５s" are not times
_PLAIN_RE = re.compile(_NUMBER)
_UNITS_RE = re.compile(rf"(?:(?P<h>{_NUMBER})h)?(?:(?P<m>{_NUMBER})m)?(?:(?P<s>{_NUMBER})s)?")
_CLOCK_RE = re.compile(r"(?:(?P<h>[0-9]+):)?(?P<m>[0-9]+):(?P<s>[0-9]+(?:\.[0-9]*)?)")


def parse_time(value: str | float) -> float:
    """Seconds from a time as written: "10s", "1m30s", "1h", "0:10", "1:02.5", "1:00:00", "90" or a number.

    Only these forms, with ASCII digits and no spaces inside, and at most `MAX_DURATION_S`.
    """
    seconds = _signed_seconds(value)
    if not math.isfinite(seconds):
        raise InvalidValue(f"{preview(value)} is not a finite time", TIME_HINT)
    if seconds < 0:
        raise InvalidValue(f"{preview(value)} is negative", "times count from the start of the video: use 0s or later")
    if seconds > MAX_DURATION_S:
        message = f"{preview(value)} is longer than 24h, the longest video memflow makes"
        raise InvalidValue(message, "give a time of at most 24h (86400s)")
    return seconds + 0.0  # no -0.0


def format_seconds(seconds: float) -> str:
    """A time for messages: 10s, 10.2s, 0.75s, 5.0004s (to the microsecond: two times a message tells apart never
    read alike)."""
    return f"{seconds:.6f}".rstrip("0").rstrip(".") + "s"


def _signed_seconds(value: Any) -> float:
    if value is None:
        raise InvalidValue("no time given", TIME_HINT)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidValue(f"{preview(value)} is not a time", TIME_HINT)
    if not isinstance(value, str):
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float
            return math.copysign(math.inf, value)
    text = value.strip().lower()
    if len(text) > MAX_TIME_CHARS:
        raise InvalidValue(f"{preview(value)} is not a time", TIME_HINT)
    seconds = _unsigned_seconds(text.removeprefix("-"))
    if seconds is None:
        raise InvalidValue(f"{preview(value)} is not a time", TIME_HINT)
    return -seconds if text.startswith("-") else seconds


def _unsigned_seconds(text: str) -> float | None:
    if _PLAIN_RE.fullmatch(text):
        return float(text)
    units = _UNITS_RE.fullmatch(text)
    if units and any(units.groups()):
        return sum(float(units[name] or 0) * scale for name, scale in (("h", 3600), ("m", 60), ("s", 1)))
    clock = _CLOCK_RE.fullmatch(text)
    if clock and float(clock["s"]) < 60 and (clock["h"] is None or float(clock["m"]) < 60):
        return float(clock["h"] or 0) * 3600 + float(clock["m"]) * 60 + float(clock["s"])
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Values shared by both formats


def _check_title(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # `title: 2024` is a number to YAML
        raise InvalidValue(f"the title must be text, got the number {preview(value)}", f'quote it: title: "{value}"')
    if not isinstance(value, str) or blank(value):
        raise InvalidValue(f"the title must be non-blank text, got {preview(value)}", "write a short name in quotes")
    if problem := text_problem(value.strip()):
        raise InvalidValue(f"the title {problem}", "write the title on one line, without control characters")
    if control := bidi_control(value):
        message = f"the title holds \\u{ord(control):04x}, which reorders the text after it: the file name misleads"
        raise InvalidValue(message, "remove it from the title")
    size = len(value.strip().encode("utf-8", "surrogatepass"))
    if size > MAX_TITLE_BYTES:
        message = f"the title is {size} bytes long in UTF-8, at most {MAX_TITLE_BYTES} fit in a file name"
        raise InvalidValue(message, "shorten the title: it names the video file")
    return value.strip()


def _check_seed(value: Any) -> int:
    hint = "use a whole number from 0 up, such as 0 or 42"
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValue(f"the seed must be a whole number, got {preview(value)}", hint)
    if not 0 <= value <= MAX_SEED:
        raise InvalidValue(f"the seed must be between 0 and 2**64-1, got {preview(value)}", hint)
    return value


def _check_duration(value: Any) -> float:
    seconds = parse_time(value)
    if seconds == 0:
        raise InvalidValue("the duration must be longer than 0s", "give the video length, like 60s or 1m")
    return seconds


def _check_prompt(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidValue(f"the prompt must be text, got {preview(value)}", "write the prompt as text, quoted")
    if blank(value):
        raise InvalidValue("the prompt is blank", "describe what happens in this segment")
    if problem := text_problem(value, PROMPT_WHITESPACE):
        raise InvalidValue(f"the prompt {problem}", TEXT_HINT)
    return value.strip()


def _strings(value: Any, field_name: str) -> Iterator[tuple[str, str]]:
    """Every text inside a value read from a script (keys included), with the field it is in, in order.

    A loop over a stack, not a recursion: a JSON line may nest as deep as its parser allows.
    """
    stack = [(field_name, value)]
    while stack:
        name, item = stack.pop()
        if isinstance(item, str):
            yield name, item
        elif isinstance(item, dict):
            entries: list[tuple[str, Any]] = []
            for key, part in item.items():
                entries += [(name, key), (f"{name}.{cut(str(key))}" if name else cut(str(key)), part)]
            stack.extend(reversed(entries))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed([(f"{name}[{index}]", part) for index, part in enumerate(item)]))


def _check_text(path: Path, line: int | None, value: Any, field_name: str) -> None:
    """Every text of a value holds only what UTF-8 can write, and no control character but tab and newline.

    Checked once for each value as it is read, so no text field (a prompt, a title, a key, a setting) reaches
    the tokenizer, a file name, a sidecar or the terminal with a lone surrogate or an escape sequence.
    """
    for name, text in _strings(value, field_name):
        if problem := text_problem(text, PROMPT_WHITESPACE):
            raise ScriptError(path, line, name or None, f"the text {problem}", TEXT_HINT)


def _suggest(name: str, known: Iterable[str], label: str) -> str:
    known = tuple(known)
    listing = f"known {label}: {', '.join(known)}"
    match = difflib.get_close_matches(name, known, n=1) if len(name) <= 2 * WIDTH else None
    return f"did you mean {match[0]!r}? {listing}" if match else listing


@contextmanager
def _located(path: Path, line: int | None, field_name: str | None) -> Iterator[None]:
    """Turn an InvalidValue raised inside into a ScriptError at this place."""
    try:
        yield
    except InvalidValue as exc:
        raise ScriptError(path, line, field_name, exc.message, exc.hint) from None


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def load_scripts(path: Path | str, segment_seconds: float = 10.0, geometry: VideoGeometry | None = None) -> list[Story]:
    """Stories of one script: a .yaml/.yml story, or a .jsonl prompt file (one story per line).

    `segment_seconds` is the length of every JSONL segment, and of the last YAML segment when the story
    gives no duration. Stories are checked against the chunk grid of `geometry` (default: the released one).
    """
    path = Path(path)
    geometry = geometry or VideoGeometry()
    _check_path_text(path)
    load, limit = _loader_for(path)
    _check_segment_seconds(path, segment_seconds, geometry)
    stories = load(path, _read_text(path, limit), float(segment_seconds))
    for story in stories:
        story.timeline(geometry)  # raises if two segments snap onto one chunk
    return stories


def _check_path_text(path: Path) -> None:
    """The script's path is text: its bytes are UTF-8 (the sidecar records it)."""
    if lone_surrogate(str(path)) is not None:
        raise ScriptError(path, None, None, "the path is not UTF-8 text", "rename the file with UTF-8 characters")


def _default_title(path: Path) -> str:
    """The file name as the title of a story that gives none: it must be a title too (it names the video)."""
    if problem := text_problem(path.stem):
        message = f"the file name {problem}; it names the video of a story without a title"
        raise ScriptError(path, None, None, message, "rename the file without control characters, or give a title")
    if control := bidi_control(path.stem):
        message = f"the file name holds \\u{ord(control):04x}, which reorders the text after it (it names the video)"
        raise ScriptError(path, None, None, message, "rename the file without it, or give a title")
    return path.stem


def _loader_for(path: Path) -> tuple[Callable[[Path, str, float], list[Story]], int]:
    """How to read a script of this name, and the most bytes it may have."""
    suffix = path.suffix.lower()
    if suffix in YAML_SUFFIXES:
        return _load_yaml, MAX_YAML_BYTES
    if suffix in JSONL_SUFFIXES:
        return _load_jsonl, MAX_JSONL_BYTES
    kind = f"'{path.suffix}' files" if path.suffix else "files without an extension"
    accepted = ", ".join((*YAML_SUFFIXES, *JSONL_SUFFIXES))
    raise ScriptError(path, None, None, f"cannot read {kind}", f"give a story script ending in {accepted}")


def _check_segment_seconds(path: Path, value: float, geometry: VideoGeometry) -> None:
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if not number or not geometry.chunk_seconds <= value < math.inf:
        message = f"must be a number of seconds no shorter than one chunk, got {preview(value)}"
        hint = f"use at least {geometry.chunk_seconds:g} s, such as 10"
        raise ScriptError(path, None, "segment_seconds", message, hint)
    if value > MAX_DURATION_S:
        message = f"must be at most 24h, the longest video memflow makes, got {preview(value)}"
        hint = "use a shorter segment, such as 10"
        raise ScriptError(path, None, "segment_seconds", message, hint)


def _read_text(path: Path, limit: int) -> str:
    """The text of a regular file of at most `limit` bytes; anything else is refused before it is read.

    Opening never blocks (a FIFO would wait for a writer) and at most `limit` + 1 bytes are read, so a
    device such as /dev/zero, a pipe or a file of gigabytes costs nothing.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ScriptError(path, None, None, "no such file", "check the path and the file name") from None
    except OSError as exc:
        message = f"cannot read the file: {exc.strerror or exc}"
        raise ScriptError(path, None, None, message, "check that the file exists and is readable") from None
    try:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISDIR(mode):
            raise ScriptError(path, None, None, "is a folder, not a script", "give one script file")
        if not stat.S_ISREG(mode):
            message = f"is {_file_kind(mode)}, not a regular file"
            raise ScriptError(path, None, None, message, "save the script as a file and give its path")
        with open(descriptor, "rb", closefd=False) as file:  # buffered: reads until limit + 1 bytes or the end
            data = file.read(limit + 1)
    except OSError as exc:
        message = f"cannot read the file: {exc.strerror or exc}"
        raise ScriptError(path, None, None, message, "check that the file is readable") from None
    finally:
        os.close(descriptor)
    if len(data) > limit:
        message = f"the file is larger than {_size(limit)}, the most a {path.suffix} script may hold"
        hint = "check that this is the script you meant; split a longer one into several files"
        raise ScriptError(path, None, None, message, hint)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ScriptError(path, None, None, f"not UTF-8 text (byte {exc.start})", "save the file as UTF-8") from None


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a disk"), (stat.S_ISFIFO, "a pipe")):
        if test(mode):
            return kind
    return "a socket" if stat.S_ISSOCK(mode) else "not a file"


def _size(size: int) -> str:
    return f"{size / 2**20:g} MiB" if size >= 2**20 else f"{size / 2**10:g} KiB"


# ---------------------------------------------------------------------------------------------------------------------
# YAML: one story per file, with the line of every value kept for errors


def _load_yaml(path: Path, text: str, segment_seconds: float) -> list[Story]:
    reader = _YamlReader(path)
    root = reader.compose(text)
    entries = reader.mapping(root, "", STORY_KEYS, "keys")
    if "segments" not in entries:
        raise reader.error(root, "segments", "the story has no segments", SEGMENTS_HINT)
    segments = reader.segments(entries["segments"])
    title = reader.read(entries["title"], "title", _check_title) if "title" in entries else _default_title(path)
    seed = reader.optional(entries, "seed", _check_seed, 0)
    duration = reader.optional(entries, "duration", _check_duration, segments[-1].start_s + segment_seconds)
    settings = reader.settings(entries["settings"]) if "settings" in entries else {}
    return [Story(path, title, seed, duration, segments, settings)]


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# Numbers as a person means them (YAML 1.2's core schema): decimal digits only. YAML 1.1 reads `010` as 8,
# `0x10` as 16, `1_000` as 1000 and `1:30` as 90; here the first is 10 and the others are text, which a time,
# a seed or a setting then reads or refuses by its own rules.
_INT_RE = re.compile(r"[-+]?[0-9]+\Z", re.ASCII)
_FLOAT_RE = re.compile(
    r"(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))\Z",
    re.ASCII,
)


def _plain_number_resolvers() -> dict[str, list[tuple[str, re.Pattern]]]:
    """SafeLoader's implicit types, with its YAML 1.1 int and float forms replaced by decimal ones."""
    resolvers = {
        first: [(tag, pattern) for tag, pattern in entries if tag not in (_INT_TAG, _FLOAT_TAG)]
        for first, entries in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    for tag, pattern, firsts in ((_INT_TAG, _INT_RE, "-+0123456789"), (_FLOAT_TAG, _FLOAT_RE, "-+0123456789.")):
        for first in firsts:
            resolvers.setdefault(first, []).append((tag, pattern))
    return resolvers


def _decimal_int(constructor: yaml.constructor.SafeConstructor, node: yaml.ScalarNode) -> int:
    return int(constructor.construct_scalar(node))  # decimal, leading zeros and all: `010` is 10, never 8


class _Constructor(yaml.constructor.SafeConstructor):
    """SafeConstructor that reads an int in decimal."""

    yaml_constructors = {**yaml.constructor.SafeConstructor.yaml_constructors, _INT_TAG: _decimal_int}


class _TooBig(yaml.YAMLError):
    """A YAML document nests too deep or holds too many values once its aliases are expanded."""

    def __init__(self, mark: yaml.Mark, message: str, hint: str):
        super().__init__(message)
        self.mark = mark
        self.message = message
        self.hint = hint


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, whose composer stops at `MAX_NESTING` levels, `MAX_YAML_VALUES` values and
    `MAX_YAML_TEXT` characters of text.

    Aliases are allowed, but each counts as every value and character it repeats: nine lists of nine aliases
    to the list before ("billion laughs") hold 9**9 values, and a long prompt repeated by a thousand aliases
    holds a thousand times its text; both stop here after a few thousand events instead of expanding in
    whatever reads, checks or prints them later. An alias to a value that contains it is refused.
    The composer recurses once per level, so the depth limit also keeps Python's stack safe.
    Plain numbers are decimal (`_plain_number_resolvers`).
    """

    yaml_implicit_resolvers = _plain_number_resolvers()

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._values = self._text = 0
        self._anchored: dict[str, tuple[int, int]] = {}  # values and characters under each finished anchor

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self.anchors and event.anchor not in self._anchored:
                message = f"the alias *{event.anchor[:WIDTH]} repeats a value that contains it"
                raise _TooBig(event.start_mark, message, "write the value out instead of an alias")
            self._count(*self._anchored.get(event.anchor, (1, 0)), event.start_mark)  # unknown: PyYAML says so
            return super().compose_node(parent, index)
        if self._depth >= MAX_NESTING:
            message = f"lists and mappings nest more than {MAX_NESTING} levels deep here"
            raise _TooBig(event.start_mark, message, "a story nests four levels: story, segments, segment, value")
        before = self._values, self._text
        self._count(1, len(event.value) if isinstance(event, yaml.ScalarEvent) else 0, event.start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if event.anchor is not None:
            self._anchored[event.anchor] = (self._values - before[0], self._text - before[1])
        return node

    def _count(self, values: int, text: int, mark: yaml.Mark) -> None:
        self._values += values
        self._text += text
        hint = "write a shorter story, or split it into several scripts"
        if self._values > MAX_YAML_VALUES:
            message = f"the story holds more than {MAX_YAML_VALUES} values (aliases count as what they repeat)"
            raise _TooBig(mark, message, hint)
        if self._text > MAX_YAML_TEXT:
            message = f"the story holds more than {MAX_YAML_TEXT} characters (aliases count as what they repeat)"
            raise _TooBig(mark, message, hint)


def _codepoint(character: str | int) -> str:
    """`U+0000` for a character or its code."""
    return f"U+{character if isinstance(character, int) else ord(character):04X}"


class _YamlReader:
    """Reads a composed YAML document node by node, so that every error can name its line."""

    def __init__(self, path: Path):
        self.path = path
        self._constructor = _Constructor()

    def error(self, node: yaml.Node, field_name: str | None, message: str, hint: str = "") -> ScriptError:
        return ScriptError(self.path, _line(node), field_name or None, message, hint)

    def compose(self, text: str) -> yaml.Node:
        try:
            root = yaml.compose(text, Loader=_BoundedLoader)
        except _TooBig as exc:
            raise ScriptError(self.path, exc.mark.line + 1, None, exc.message, exc.hint) from None
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else None
            detail = ", ".join(part for part in (exc.context, exc.problem) if part)
            message = f"not valid YAML: {detail}"
            raise ScriptError(self.path, line, None, message, "check the indentation and quoting here") from None
        except yaml.reader.ReaderError as exc:  # a character YAML does not allow: its line, and the character
            line = text.count("\n", 0, exc.position) + 1
            message = f"not valid YAML: the character {_codepoint(exc.character)} is not allowed in a YAML file"
            raise ScriptError(self.path, line, None, message, "remove it") from None
        except yaml.YAMLError as exc:
            raise ScriptError(self.path, None, None, f"not valid YAML: {exc}", "save the file as plain text") from None
        if root is None:
            raise ScriptError(self.path, None, None, "the file is empty", "a story needs at least `segments:`")
        return root

    def value(self, node: yaml.Node, field_name: str) -> Any:
        value = self._construct(node, field_name)
        _check_text(self.path, _line(node), value, field_name)
        return value

    def _construct(self, node: yaml.Node, field_name: str) -> Any:
        try:
            return self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            message = f"cannot read this value: {getattr(exc, 'problem', None) or exc}"
            raise self.error(node, field_name, message, "write plain YAML values") from None
        except ValueError as exc:  # a date like 2024-13-45, an integer of more than 4300 digits
            problem = "a number too long to read" if "integer string conversion" in str(exc) else cut(str(exc))
            message = f"cannot read this value: {problem}"
            raise self.error(node, field_name, message, "write plain YAML values") from None

    def read(self, node: yaml.Node, field_name: str, check: Callable[[Any], T]) -> T:
        with _located(self.path, _line(node), field_name):
            return check(self.value(node, field_name))

    def optional(self, entries: dict[str, yaml.Node], key: str, check: Callable[[Any], T], default: T) -> T:
        return self.read(entries[key], key, check) if key in entries else default

    def mapping(self, node: yaml.Node, field_name: str, known: tuple[str, ...], label: str) -> dict[str, yaml.Node]:
        """Value nodes of a mapping by key; rejects other nodes, unknown keys and repeated keys."""
        if not isinstance(node, yaml.MappingNode):
            message = f"expected a mapping, got {preview(self.value(node, field_name))}"
            raise self.error(node, field_name, message, f"write `key: value` lines; known {label}: {', '.join(known)}")
        entries: dict[str, yaml.Node] = {}
        key_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                message = "a key must be a plain word, not a list or a mapping"
                raise self.error(key_node, field_name, message, f"known {label}: {', '.join(known)}")
            if key_node.tag == _MERGE_TAG:
                message = "merge keys (`<<: *name`) are not read in scripts"
                raise self.error(key_node, field_name or None, message, "write the keys out in full instead")
            value = self.value(key_node, field_name)
            key = value if isinstance(value, str) else key_node.value  # `~`, `1`, `yes` as written, not None or 1
            name = f"{field_name}.{key}" if field_name else key
            if key not in known:
                name = f"{field_name}.{cut(key)}" if field_name else cut(key)
                raise self.error(key_node, name, f"unknown key {preview(key)}", _suggest(key, known, label))
            if key in entries:
                raise self.error(key_node, name, f"{key!r} is given twice (first on line {key_lines[key]})", "keep one")
            entries[key] = value_node
            key_lines[key] = _line(key_node)
        return entries

    def segments(self, node: yaml.Node) -> tuple[Segment, ...]:
        if not isinstance(node, yaml.SequenceNode):
            shown = preview(self.value(node, "segments"))
            raise self.error(node, "segments", f"expected a list, got {shown}", SEGMENTS_HINT)
        if not node.value:
            raise self.error(node, "segments", "the list of segments is empty", SEGMENTS_HINT)
        if len(node.value) > MAX_SEGMENTS:
            message = f"the story has {len(node.value)} segments, more than the {MAX_SEGMENTS} one story may have"
            raise self.error(node, "segments", message, "split the story into several scripts")
        return tuple(self.segment(item, f"segments[{index}]") for index, item in enumerate(node.value))

    def segment(self, node: yaml.Node, field_name: str) -> Segment:
        entries = self.mapping(node, field_name, SEGMENT_KEYS, "keys")
        for key, example in (("start", "start: 10s"), ("prompt", "prompt: what happens next")):
            if key not in entries:
                raise self.error(node, field_name, f"the segment has no {key!r}", f"add `{example}`")
        start_node = entries["start"]
        start = self.read(start_node, f"{field_name}.start", parse_time)
        prompt = self.read(entries["prompt"], f"{field_name}.prompt", _check_prompt)
        return Segment(start, prompt, _line(start_node))

    def settings(self, node: yaml.Node) -> dict[str, Any]:
        """Generation overrides, checked by GenerationSettings itself."""
        if isinstance(node, yaml.ScalarNode) and self.value(node, "settings") is None:
            return {}  # `settings:` with everything commented out
        entries = self.mapping(node, "settings", tuple(SETTING_NAMES), "settings")
        overrides = {name: self.value(value_node, f"settings.{name}") for name, value_node in entries.items()}
        try:
            GenerationSettings().with_overrides(overrides)
        except SettingsError as exc:
            blamed = next((name for name in (exc.field, *exc.related) if name in entries), exc.field)
            written = blamed in entries
            where = entries[blamed] if written else node
            raise self.error(where, f"settings.{blamed}", exc.message, _setting_hint(blamed, written)) from None
        return overrides


def _setting_hint(name: str, written: bool) -> str:
    if name not in SETTING_NAMES:
        return "fix the settings or remove them to keep the defaults"
    group, attribute = SETTING_NAMES[name]
    default = getattr(getattr(GenerationSettings(), group), attribute)
    shown = json.dumps(list(default) if isinstance(default, tuple) else default)
    if not written:
        return f"the default `{name}` ({shown}) does not fit the other settings: set `{name}` too"
    return f"fix the value, or remove `{name}` to keep the default ({shown})"


# ---------------------------------------------------------------------------------------------------------------------
# JSONL: the official MemFlow prompt files, one story per line, equal-length segments


_JSONL_LINE_END = re.compile(r"\r\n|\r|\n")  # Unix, Windows and old Mac files (not str.splitlines: U+2028 is text)


def _load_jsonl(path: Path, text: str, segment_seconds: float) -> list[Story]:
    stories: list[Story] = []
    prompts_in_file = 0
    for number, raw in enumerate(_JSONL_LINE_END.split(text), start=1):  # a JSON text holds no raw CR or LF
        if not raw.strip():
            continue
        if len(stories) == MAX_STORIES:
            message = f"the file holds more than {MAX_STORIES} stories"
            raise ScriptError(path, number, None, message, "split it into several files of at most that many lines")
        prompts = _jsonl_prompts(path, number, raw)
        prompts_in_file += len(prompts)
        if prompts_in_file > MAX_JSONL_PROMPTS:
            message = f"the file holds more than {MAX_JSONL_PROMPTS} prompts"
            raise ScriptError(path, number, None, message, "split it into several files")
        if stories and len(prompts) != len(stories[0].segments):
            first = stories[0]
            counts = f"{len(prompts)} prompts here, {len(first.segments)} on line {first.line}"
            message = f"stories of one file must have as many segments each: {counts}"
            hint = "split the file so that each one holds stories of one length"
            raise ScriptError(path, number, "prompts", message, hint)
        stories.append(_jsonl_story(path, number, prompts, segment_seconds))
    if not stories:
        raise ScriptError(path, None, None, "the file is empty", JSONL_HINT)
    return stories


def _jsonl_prompts(path: Path, number: int, raw: str) -> list[str]:
    try:
        record = json.loads(raw, object_pairs_hook=_unique_keys)
    except _RepeatedKey as exc:
        message = f"the key {preview(exc.key)} is given twice"
        raise ScriptError(path, number, cut(exc.key), message, "keep one of them") from None
    except json.JSONDecodeError as exc:
        raise ScriptError(path, number, None, f"not valid JSON: {exc.msg} (column {exc.colno})", JSONL_HINT) from None
    except RecursionError:
        message = "not valid here: lists and objects nest too deep for a prompt line"
        raise ScriptError(path, number, None, message, JSONL_HINT) from None
    except ValueError:  # json turns an integer of more than 4300 digits into a ValueError of its own
        raise ScriptError(path, number, None, "not valid here: a number too long to read", JSONL_HINT) from None
    _check_text(path, number, record, "")
    if not isinstance(record, dict):
        raise ScriptError(path, number, None, f"a line must be a JSON object, got {preview(record)}", JSONL_HINT)
    for key in record:
        if key not in JSONL_KEYS:
            message = f"unknown key {preview(key)}"
            raise ScriptError(path, number, cut(key), message, _suggest(key, JSONL_KEYS, "keys"))
    prompts = record.get("prompts")
    if not isinstance(prompts, list) or not prompts:
        message = f"needs a non-empty list of prompts, got {preview(prompts)}"
        raise ScriptError(path, number, "prompts", message, JSONL_HINT)
    if len(prompts) > MAX_SEGMENTS:
        message = f"{len(prompts)} prompts, more than the {MAX_SEGMENTS} one story may have"
        raise ScriptError(path, number, "prompts", message, "split the story into several lines")
    checked = []
    for index, prompt in enumerate(prompts):
        with _located(path, number, f"prompts[{index}]"):
            checked.append(_check_prompt(prompt))
    return checked


class _RepeatedKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different (json keeps the last of a repeated key; YAML refuses it)."""
    record = dict(pairs)
    if len(record) != len(pairs):
        seen: set[str] = set()
        raise _RepeatedKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return record


def _jsonl_story(path: Path, number: int, prompts: list[str], segment_seconds: float) -> Story:
    segments = tuple(Segment(index * segment_seconds, prompt, number) for index, prompt in enumerate(prompts))
    title = f"{_default_title(path)}-{number:03d}"
    return Story(path, title, 0, len(prompts) * segment_seconds, segments, {}, number)
