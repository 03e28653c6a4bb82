"""Narrative scripts: loading, time formats, the chunk grid, and one clear error per bad input."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from memflow_cli.script import (
    InvalidValue,
    ScriptError,
    Segment,
    Story,
    Timeline,
    load_scripts,
    parse_time,
)
from memflow_cli.settings import GenerationSettings, VideoGeometry

from .scripts import NO_SHARED, SHARED, SHARED_STORIES


def load_many(paths, segment_seconds: float = 10.0) -> list[Story]:
    """Stories of several scripts, in order, as `memflow render a.yaml b.jsonl` reads them."""
    return [story for path in paths for story in load_scripts(path, segment_seconds)]


GEOMETRY = VideoGeometry()

TWO_SEGMENTS = """\
segments:
  - start: 0s
    prompt: A lighthouse keeper climbs the stairs.
  - start: 10s
    prompt: He lights the lamp at dusk.
"""


@pytest.fixture
def write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write a script in a fresh folder and return its relative path, so messages read `story.yaml:3: ...`."""
    monkeypatch.chdir(tmp_path)

    def write_script(text: str, name: str = "story.yaml") -> Path:
        path = Path(name)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write_script


def load_one(path: Path, **kwargs) -> Story:
    stories = load_scripts(path, **kwargs)
    assert len(stories) == 1
    return stories[0]


def error_of(path: Path, **kwargs) -> ScriptError:
    with pytest.raises(ScriptError) as caught:
        load_scripts(path, **kwargs)
    return caught.value


def story_of(*starts: float, duration_s: float = 60.0) -> Story:
    segments = tuple(Segment(start, f"prompt {index}") for index, start in enumerate(starts))
    return Story(Path("story.yaml"), "story", 0, duration_s, segments)


# ---------------------------------------------------------------------------------------------------------------------
# The shared stories


@pytest.mark.parametrize("path", SHARED_STORIES or [NO_SHARED], ids=lambda path: path.name if path else "none")
def test_shared_story_loads_with_a_sensible_timeline(path: Path) -> None:
    stories = load_scripts(path)
    assert stories
    for story in stories:
        timeline = story.timeline(GEOMETRY)
        assert timeline.segments[0].start_chunk == 0
        assert len(timeline.segments) == len(story.segments)
        assert all(segment.prompt.strip() for segment in timeline.segments)
        assert list(timeline.switch_chunks) == sorted(set(timeline.switch_chunks))
        assert sum(segment.chunks for segment in timeline.segments) == timeline.chunks
        assert sum(segment.video_frames for segment in timeline.segments) == timeline.video_frames
        assert timeline.video_frames == 4 * timeline.latent_frames - 3
        assert abs(timeline.duration_s - story.duration_s) < GEOMETRY.chunk_seconds


def test_shared_sixty_second_story_has_the_official_switch_points() -> None:
    path = SHARED / "stories" / "bench-000.yaml"
    if not path.exists():
        pytest.skip(f"no {path}")
    story = load_one(path)
    assert (story.title, story.seed, story.duration_s) == ("bench-000", 0, 60.0)
    timeline = story.timeline(GEOMETRY)
    assert (timeline.chunks, timeline.latent_frames, timeline.video_frames) == (80, 240, 957)
    assert timeline.switch_chunks == (14, 27, 40, 54, 67)
    assert [segment.start_latent_frame for segment in timeline.segments] == [0, 42, 81, 120, 162, 201]


def test_shared_yaml_examples_match_the_official_prompt_file() -> None:
    jsonl = SHARED / "stories" / "examples.jsonl"
    if not jsonl.exists():
        pytest.skip(f"no {jsonl}")
    official = load_scripts(jsonl)
    for index, story in enumerate(official[:3]):
        yaml_story = load_one(SHARED / "stories" / f"example-{index:03d}.yaml")
        assert [s.prompt for s in yaml_story.segments] == [s.prompt for s in story.segments]
        assert [s.start_s for s in yaml_story.segments] == [s.start_s for s in story.segments]
        assert yaml_story.duration_s == story.duration_s


# ---------------------------------------------------------------------------------------------------------------------
# Times


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("10s", 10.0),
        ("2.5s", 2.5),
        ("1m30s", 90.0),
        ("1.5m", 90.0),
        ("1h", 3600.0),
        ("1h2m3s", 3723.0),
        ("0:10", 10.0),
        ("1:02.5", 62.5),
        ("1:00:00", 3600.0),
        ("90", 90.0),
        (" 10S ", 10.0),
        ("0", 0.0),
        (90, 90.0),
        (0.75, 0.75),
    ],
)
def test_parse_time_reads_every_format(written: str | float, seconds: float) -> None:
    assert parse_time(written) == seconds


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("1:75", "'1:75' is not a time — write it like 10s, 1m30s, 0:10 or 1:02.5"),
        ("1:75:00", "'1:75:00' is not a time — write it like 10s, 1m30s, 0:10 or 1:02.5"),
        ("ten", "'ten' is not a time — write it like 10s, 1m30s, 0:10 or 1:02.5"),
        ("", "'' is not a time — write it like 10s, 1m30s, 0:10 or 1:02.5"),
        ("10x", "'10x' is not a time — write it like 10s, 1m30s, 0:10 or 1:02.5"),
        ("1m30", "'1m30' is not a time — write it like 10s, 1m30s, 0:10 or 1:02.5"),
        (True, "true is not a time — write it like 10s, 1m30s, 0:10 or 1:02.5"),
        ([10], "[10] is not a time — write it like 10s, 1m30s, 0:10 or 1:02.5"),
        (None, "no time given — write it like 10s, 1m30s, 0:10 or 1:02.5"),
        (float("inf"), "inf is not a finite time — write it like 10s, 1m30s, 0:10 or 1:02.5"),
        ("-5s", "'-5s' is negative — times count from the start of the video: use 0s or later"),
        (-2, "-2 is negative — times count from the start of the video: use 0s or later"),
    ],
)
def test_parse_time_rejects_what_is_not_a_time(written: object, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_time(written)  # type: ignore[arg-type]
    assert isinstance(caught.value, InvalidValue)
    assert str(caught.value) == message


# ---------------------------------------------------------------------------------------------------------------------
# The chunk grid


@pytest.mark.parametrize(
    ("start_s", "chunk"),
    [(0.0, 0), (0.75, 1), (0.8, 2), (1.5, 2), (10.0, 14), (10.5, 14), (10.51, 15), (30.0, 40)],
)
def test_start_snaps_up_to_the_next_chunk(start_s: float, chunk: int) -> None:
    segment = story_of(*sorted({0.0, start_s})).timeline(GEOMETRY).segments[-1]
    assert segment.start_chunk == chunk
    assert segment.start_latent_frame == 3 * chunk
    assert segment.snapped_start_s == pytest.approx(chunk * 0.75)
    assert segment.snapped_start_s >= start_s - 1e-9


def test_ten_seconds_is_latent_frame_42_like_the_official_switch() -> None:
    segment = story_of(0.0, 10.0).timeline(GEOMETRY).segments[1]
    assert (segment.start_s, segment.start_chunk, segment.start_latent_frame) == (10.0, 14, 42)
    assert segment.start_video_frame == 4 * 42 - 3
    assert segment.snapped_start_s == 10.5


def test_video_frames_are_four_per_latent_frame_after_the_first() -> None:
    timeline = story_of(0.0, 10.0, duration_s=20.0).timeline(GEOMETRY)
    assert (timeline.chunks, timeline.latent_frames) == (27, 81)
    assert timeline.video_frames == 4 * 81 - 3
    assert timeline.duration_s == timeline.video_frames / 16
    first, second = timeline.segments
    assert (first.chunks, second.chunks) == (14, 13)
    assert (first.start_video_frame, first.video_frames) == (0, 165)
    assert (second.start_video_frame, second.video_frames) == (165, 156)


def test_grid_is_derived_from_the_geometry() -> None:
    slow = VideoGeometry(fps=8)  # 12 video frames per chunk: 1.5 s
    timeline = story_of(0.0, 10.0, duration_s=20.0).timeline(slow)
    assert timeline.switch_chunks == (7,)
    assert timeline.chunks == 14
    assert timeline.segments[1].snapped_start_s == 10.5


def test_prompt_index_for_chunk_follows_the_switches() -> None:
    timeline = story_of(0.0, 10.0, 20.0, duration_s=30.0).timeline(GEOMETRY)
    assert timeline.switch_chunks == (14, 27)
    assert [timeline.prompt_index_for_chunk(chunk) for chunk in (0, 13, 14, 26, 27, 39)] == [0, 0, 1, 1, 2, 2]
    assert timeline.prompts == ("prompt 0", "prompt 1", "prompt 2")
    with pytest.raises(IndexError):
        timeline.prompt_index_for_chunk(timeline.chunks)
    with pytest.raises(IndexError):
        timeline.prompt_index_for_chunk(-1)


def test_duration_limit_cuts_the_timeline() -> None:
    story = story_of(0.0, 10.0, 20.0, 30.0, duration_s=40.0)
    cut = story.timeline(GEOMETRY, duration_s=25.0)
    assert cut.chunks == 34  # ceil(25 / 0.75)
    assert [segment.index for segment in cut.segments] == [0, 1, 2]
    assert cut.segments[-1].start_chunk + cut.segments[-1].chunks == 34
    on_a_switch = story.timeline(GEOMETRY, duration_s=20.0)  # segment 2 would start exactly at the cut
    assert (on_a_switch.chunks, on_a_switch.switch_chunks) == (27, (14,))
    assert story.timeline(GEOMETRY, duration_s=1000.0) == story.timeline(GEOMETRY)


@pytest.mark.parametrize("limit", [0, -1.0, float("nan"), True])
def test_duration_limit_must_be_positive(limit: float) -> None:
    with pytest.raises(ValueError, match="positive number of seconds"):
        story_of(0.0).timeline(GEOMETRY, duration_s=limit)


def test_timeline_is_frozen() -> None:
    timeline = story_of(0.0).timeline(GEOMETRY)
    assert isinstance(timeline, Timeline)
    with pytest.raises(AttributeError):
        timeline.chunks = 3  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------------------------------
# YAML stories


def test_yaml_story_with_every_key(write) -> None:
    path = write(
        """\
        title: wizard-and-dragon
        seed: 7
        duration: 1m30s
        segments:
          - start: 0s
            prompt: A young wizard practices magic.
          - start: 0:10
            prompt: A dragon lands on his shoulder.
          - start: 1:02.5
            prompt: They cast a spell together.
        settings:
          memory: nam
          sma: true
          steps: [1000, 500]
        """,
        name="wizard.yml",
    )
    story = load_one(path)
    assert (story.title, story.seed, story.duration_s, story.line) == ("wizard-and-dragon", 7, 90.0, None)
    assert [segment.start_s for segment in story.segments] == [0.0, 10.0, 62.5]
    assert [segment.line for segment in story.segments] == [5, 7, 9]
    assert story.segments[1].prompt == "A dragon lands on his shoulder."
    assert story.settings == {"memory": "nam", "sma": True, "steps": [1000, 500]}
    assert GenerationSettings().with_overrides(story.settings).sampler.steps == (1000, 500)


def test_yaml_defaults(write) -> None:
    story = load_one(write(TWO_SEGMENTS, name="lighthouse.yaml"))
    assert (story.title, story.seed, story.settings) == ("lighthouse", 0, {})
    assert story.duration_s == 20.0  # last start + 10 s
    assert story.timeline(GEOMETRY).chunks == 27


def test_yaml_default_duration_follows_segment_seconds(write) -> None:
    story = load_one(write(TWO_SEGMENTS), segment_seconds=5.0)
    assert story.duration_s == 15.0


def test_yaml_reads_unquoted_clock_times_and_plain_numbers(write) -> None:
    text = TWO_SEGMENTS.replace("start: 10s", "start: 1:30") + "  - start: 100\n    prompt: The ship passes.\n"
    story = load_one(write(text))
    assert [segment.start_s for segment in story.segments] == [0.0, 90.0, 100.0]
    assert story.duration_s == 110.0


def test_yaml_prompt_keeps_folded_text(write) -> None:
    text = "segments:\n  - start: 0s\n    prompt: >\n      A long prompt\n      over two lines.\n"
    assert load_one(write(text)).segments[0].prompt == "A long prompt over two lines."


# ---------------------------------------------------------------------------------------------------------------------
# JSONL prompt files


def jsonl_line(*prompts: str) -> str:
    return json.dumps({"prompts": list(prompts)}) + "\n"


def test_jsonl_gives_one_story_per_line(write) -> None:
    path = write(jsonl_line("a1", "a2", "a3") + "\n" + jsonl_line("b1", "b2", "b3"), name="prompts.jsonl")
    first, second = load_scripts(path)
    assert (first.title, first.line, first.seed, first.duration_s) == ("prompts-001", 1, 0, 30.0)
    assert (second.title, second.line) == ("prompts-003", 3)
    assert [segment.start_s for segment in second.segments] == [0.0, 10.0, 20.0]
    assert [segment.prompt for segment in second.segments] == ["b1", "b2", "b3"]
    assert second.timeline(GEOMETRY).switch_chunks == (14, 27)


def test_jsonl_segment_seconds(write) -> None:
    (story,) = load_scripts(write(jsonl_line("a", "b", "c"), name="p.jsonl"), segment_seconds=5.0)
    assert [segment.start_s for segment in story.segments] == [0.0, 5.0, 10.0]
    assert story.duration_s == 15.0
    assert story.timeline(GEOMETRY).switch_chunks == (7, 14)


def test_load_many_keeps_the_order_of_files(write) -> None:
    yaml_path = write(TWO_SEGMENTS, name="one.yaml")
    jsonl_path = write(jsonl_line("a") + jsonl_line("b"), name="two.jsonl")
    assert [story.title for story in load_many([jsonl_path, yaml_path])] == ["two-001", "two-002", "one"]
    with pytest.raises(ScriptError, match="no such file"):
        load_many([yaml_path, Path("missing.yaml")])


# ---------------------------------------------------------------------------------------------------------------------
# Errors: one line naming file, line, field, problem and fix

HEAD = "segments:\n  - start: 0s\n    prompt: A lighthouse keeper climbs the stairs.\n"  # lines 1-3
SEGMENTS_HINT = "write segments as a list of `- start: 0s` / `  prompt: ...` entries"
TIME_HINT = "write it like 10s, 1m30s, 0:10 or 1:02.5"
STORY_KEYS = "known keys: title, seed, duration, segments, settings"
SETTING_KEYS = (
    "known settings: memory, window, sink, bank_size, record_interval, sma, sma_top_k, interactive, steps, shift"
)
SEED_HINT = "use a whole number from 0 up, such as 0 or 42"


ORDER_HINT = "starts must increase strictly: reorder the segments or fix the times"
YAML_HINT = "check the indentation and quoting here"


def as_params(table: list[tuple[str, str, str]]) -> list:
    return [pytest.param(text, expected, id=name) for name, text, expected in table]


YAML_ERRORS = [
    # the file itself
    (
        "syntax",
        HEAD + "  - start: 10s\n    prompt: [unclosed\n  - start: 20s\n",
        "story.yaml:6: not valid YAML: while parsing a flow sequence, expected ',' or ']', but got ':' — " + YAML_HINT,
    ),
    (
        "tab",
        "segments:\n\t- start: 0s\n",
        "story.yaml:2: not valid YAML: while scanning for the next token, found character '\\t' that cannot start any "
        "token — " + YAML_HINT,
    ),
    (
        "two documents",
        HEAD + "---\n" + HEAD,
        "story.yaml:4: not valid YAML: expected a single document in the stream, but found another document — "
        + YAML_HINT,
    ),
    ("empty", "", "story.yaml: the file is empty — a story needs at least `segments:`"),
    ("only comments", "# to do\n", "story.yaml: the file is empty — a story needs at least `segments:`"),
    (
        "top level list",
        "- start: 0s\n  prompt: x\n",
        "story.yaml:1: expected a mapping, got [{'start': '0s', 'prompt': 'x'}] — write `key: value` lines; "
        + STORY_KEYS,
    ),
    (
        "top level text",
        "just a sentence\n",
        "story.yaml:1: expected a mapping, got 'just a sentence' — write `key: value` lines; " + STORY_KEYS,
    ),
    # keys
    (
        "unknown key",
        "title: t\nsegmens:\n  - start: 0s\n",
        "story.yaml:2: segmens: unknown key 'segmens' — did you mean 'segments'? " + STORY_KEYS,
    ),
    ("unknown key, nothing close", "music: loud\n" + HEAD, "story.yaml:1: music: unknown key 'music' — " + STORY_KEYS),
    (
        "repeated key",
        "seed: 1\n" + HEAD + "seed: 2\n",
        "story.yaml:5: seed: 'seed' is given twice (first on line 1) — keep one",
    ),
    (
        "unknown segment key",
        "segments:\n  - start: 0s\n    promt: x\n",
        "story.yaml:3: segments[0].promt: unknown key 'promt' — did you mean 'prompt'? known keys: start, prompt",
    ),
    (
        "unknown setting",
        HEAD + "settings:\n  bank_sise: 4\n",
        "story.yaml:5: settings.bank_sise: unknown key 'bank_sise' — did you mean 'bank_size'? " + SETTING_KEYS,
    ),
    # segments
    ("no segments", "title: t\nseed: 3\n", "story.yaml:1: segments: the story has no segments — " + SEGMENTS_HINT),
    ("segments not a list", "segments: 5\n", "story.yaml:1: segments: expected a list, got 5 — " + SEGMENTS_HINT),
    (
        "segments left blank",
        "title: t\nsegments:\n",
        "story.yaml:2: segments: expected a list, got nothing — " + SEGMENTS_HINT,
    ),
    ("segments empty", "segments: []\n", "story.yaml:1: segments: the list of segments is empty — " + SEGMENTS_HINT),
    (
        "segment not a mapping",
        HEAD + "  - just text\n",
        "story.yaml:4: segments[1]: expected a mapping, got 'just text' — write `key: value` lines; known keys: start, "
        "prompt",
    ),
    (
        "no prompt",
        HEAD + "  - start: 10s\n",
        "story.yaml:4: segments[1]: the segment has no 'prompt' — add `prompt: what happens next`",
    ),
    (
        "blank prompt",
        HEAD + "  - start: 10s\n    prompt: '  '\n",
        "story.yaml:5: segments[1].prompt: the prompt is blank — describe what happens in this segment",
    ),
    (
        "prompt not text",
        HEAD + "  - start: 10s\n    prompt: 42\n",
        "story.yaml:5: segments[1].prompt: the prompt must be text, got 42 — write the prompt as text, quoted",
    ),
    ("no start", HEAD + "  - prompt: x\n", "story.yaml:4: segments[1]: the segment has no 'start' — add `start: 10s`"),
    (
        "bad time",
        HEAD + "  - start: 1:75\n    prompt: x\n",
        "story.yaml:4: segments[1].start: '1:75' is not a time — " + TIME_HINT,
    ),
    (
        "date for a time",
        HEAD + "  - start: 2024-01-01\n    prompt: x\n",
        "story.yaml:4: segments[1].start: the date 2024-01-01 is not a time — " + TIME_HINT,
    ),
    (
        "negative start",
        HEAD + "  - start: -5s\n    prompt: x\n",
        "story.yaml:4: segments[1].start: '-5s' is negative — times count from the start of the video: use 0s or later",
    ),
    (
        "first start not 0",
        "segments:\n  - start: 2s\n    prompt: x\n",
        "story.yaml:2: segments[0].start: the first segment starts at 2s, not at 0s — start the first segment at 0s",
    ),
    (
        "unsorted",
        HEAD + "  - start: 20s\n    prompt: x\n  - start: 10s\n    prompt: y\n",
        "story.yaml:6: segments[2].start: 10s is before segments[1] (20s) — " + ORDER_HINT,
    ),
    (
        "same start twice",
        HEAD + "  - start: 10s\n    prompt: x\n  - start: 0:10\n    prompt: y\n",
        "story.yaml:6: segments[2].start: 10s is the same time as segments[1] (10s) — " + ORDER_HINT,
    ),
    (
        "start at the end",
        "duration: 30s\n" + HEAD + "  - start: 30s\n    prompt: x\n",
        "story.yaml:5: segments[1].start: 30s is at or after the end of the story (duration 30s) — make the duration "
        "longer or remove this segment",
    ),
    (
        "start snaps onto the end",
        "duration: 30s\n" + HEAD + "  - start: 29.9s\n    prompt: x\n",
        "story.yaml:5: segments[1].start: 29.9s snaps to the 0.75s chunk grid at 30s, the end of the video — start it "
        "at 29.25s or earlier, or make the duration longer",
    ),
    (
        "two starts in one chunk",
        HEAD + "  - start: 10s\n    prompt: x\n  - start: 10.2s\n    prompt: y\n",
        "story.yaml:6: segments[2].start: 10.2s snaps to chunk 14, the same chunk as segments[1] (10s) — space starts "
        "at least 0.75 s apart: the prompt switches at most once a chunk",
    ),
    # duration, seed, title
    (
        "negative duration",
        "duration: -5s\n" + HEAD,
        "story.yaml:1: duration: '-5s' is negative — times count from the start of the video: use 0s or later",
    ),
    (
        "zero duration",
        "duration: 0\n" + HEAD,
        "story.yaml:1: duration: the duration must be longer than 0s — give the video length, like 60s or 1m",
    ),
    ("duration not a time", "duration: soon\n" + HEAD, "story.yaml:1: duration: 'soon' is not a time — " + TIME_HINT),
    (
        "negative seed",
        "seed: -1\n" + HEAD,
        "story.yaml:1: seed: the seed must be between 0 and 2**64-1, got -1 — " + SEED_HINT,
    ),
    (
        "seed too large",
        f"seed: {2**64}\n" + HEAD,
        f"story.yaml:1: seed: the seed must be between 0 and 2**64-1, got {2**64} — " + SEED_HINT,
    ),
    (
        "seed not a number",
        "seed: abc\n" + HEAD,
        "story.yaml:1: seed: the seed must be a whole number, got 'abc' — " + SEED_HINT,
    ),
    (
        "seed a bool",
        "seed: true\n" + HEAD,
        "story.yaml:1: seed: the seed must be a whole number, got true — " + SEED_HINT,
    ),
    (
        "seed a fraction",
        "seed: 1.5\n" + HEAD,
        "story.yaml:1: seed: the seed must be a whole number, got 1.5 — " + SEED_HINT,
    ),
    (
        "blank title",
        "title: ''\n" + HEAD,
        "story.yaml:1: title: the title must be non-blank text, got '' — write a short name in quotes",
    ),
    # settings
    (
        "setting out of range",
        HEAD + "settings:\n  memory: nam\n  bank_size: 0\n",
        "story.yaml:6: settings.bank_size: must be at least 1, got 0 — fix the value, or remove `bank_size` to keep "
        "the default (3)",
    ),
    (
        "unknown memory mode",
        HEAD + "settings:\n  memory: lots\n",
        "story.yaml:5: settings.memory: unknown mode 'lots'; choose one of nam, sink, none — fix the value, or remove "
        '`memory` to keep the default ("nam")',
    ),
    (
        "settings that clash",
        HEAD + "settings:\n  memory: sink\n  sma: true\n",
        "story.yaml:6: settings.sma: sparse memory activation needs memory 'nam', not 'sink' — fix the value, or "
        "remove `sma` to keep the default (false)",
    ),
    (
        "steps not a list",
        HEAD + "settings:\n  steps: abc\n",
        "story.yaml:5: settings.steps: 'abc' is not a whole number; write the steps like 1000,750,500,250 — fix the "
        "value, or remove `steps` to keep the default ([1000, 750, 500, 250])",
    ),
    (
        "default clashes with a setting",
        HEAD + "settings:\n  window: 2\n",
        "story.yaml:5: settings.window: the sink (3 frames) must be smaller than the window (2 frames) — fix the "
        "value, or remove `window` to keep the default (12)",
    ),
    (
        "settings not a mapping",
        HEAD + "settings:\n  - memory\n",
        "story.yaml:5: settings: expected a mapping, got ['memory'] — write `key: value` lines; " + SETTING_KEYS,
    ),
    (
        "unsafe tag",
        HEAD + "settings:\n  memory: !!python/name:os.system\n",
        "story.yaml:5: settings.memory: cannot read this value: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/name:os.system' — write plain YAML values",
    ),
]


@pytest.mark.parametrize(("text", "expected"), as_params(YAML_ERRORS))
def test_yaml_error_names_file_line_field_and_fix(write, text: str, expected: str) -> None:
    assert str(error_of(write(text))) == expected


def test_error_from_the_brief_reads_as_one_line(write) -> None:
    lines = ["title: t", "seed: 1", "duration: 60s", "segments:"]
    lines += ["  - start: 0s", "    prompt: a", "", "  - start: 0:10", "    prompt: b", "", "  - prompt: c"]
    lines += ["    start: 1:75"]
    error = error_of(write("\n".join(lines) + "\n"))
    assert str(error) == "story.yaml:12: segments[2].start: '1:75' is not a time — " + TIME_HINT
    assert (error.path, error.line, error.field) == (Path("story.yaml"), 12, "segments[2].start")
    assert (error.message, error.hint) == ("'1:75' is not a time", TIME_HINT)
    assert "\n" not in str(error)


JSONL_HINT = 'each line must look like {"prompts": ["first segment", "second segment"]}'

JSONL_ERRORS = [
    (
        "bad json",
        jsonl_line("a", "b") + '{"prompts": ["a", "b"\n',
        "p.jsonl:2: not valid JSON: Expecting ',' delimiter (column 22) — " + JSONL_HINT,
    ),
    ("not an object", '["a", "b"]\n', "p.jsonl:1: a line must be a JSON object, got ['a', 'b'] — " + JSONL_HINT),
    (
        "misspelt key",
        '{"prompt": ["a"]}\n',
        "p.jsonl:1: prompt: unknown key 'prompt' — did you mean 'prompts'? known keys: prompts",
    ),
    ("extra key", '{"prompts": ["a"], "seed": 3}\n', "p.jsonl:1: seed: unknown key 'seed' — known keys: prompts"),
    ("no prompts", "{}\n", "p.jsonl:1: prompts: needs a non-empty list of prompts, got nothing — " + JSONL_HINT),
    (
        "empty prompts",
        '{"prompts": []}\n',
        "p.jsonl:1: prompts: needs a non-empty list of prompts, got [] — " + JSONL_HINT,
    ),
    (
        "prompts not a list",
        '{"prompts": "a"}\n',
        "p.jsonl:1: prompts: needs a non-empty list of prompts, got 'a' — " + JSONL_HINT,
    ),
    (
        "blank prompt",
        jsonl_line("a", "b") + jsonl_line("a", " "),
        "p.jsonl:2: prompts[1]: the prompt is blank — describe what happens in this segment",
    ),
    (
        "prompt not text",
        '{"prompts": ["a", 3]}\n',
        "p.jsonl:1: prompts[1]: the prompt must be text, got 3 — write the prompt as text, quoted",
    ),
    (
        "different lengths",
        jsonl_line("a", "b") + "\n" + jsonl_line("a", "b", "c"),
        "p.jsonl:3: prompts: stories of one file must have as many segments each: 3 prompts here, 2 on line 1 — split "
        "the file so that each one holds stories of one length",
    ),
    ("empty", "\n  \n", "p.jsonl: the file is empty — " + JSONL_HINT),
]


@pytest.mark.parametrize(("text", "expected"), as_params(JSONL_ERRORS))
def test_jsonl_error_names_file_line_field_and_fix(write, text: str, expected: str) -> None:
    assert str(error_of(write(text, name="p.jsonl"))) == expected


def test_missing_file(write) -> None:
    error = error_of(Path("nope.yaml"))
    assert str(error) == "nope.yaml: no such file — check the path and the file name"
    assert (error.line, error.field) == (None, None)


def test_folder_instead_of_a_file(write) -> None:
    Path("stories.yaml").mkdir()
    assert str(error_of(Path("stories.yaml"))) == "stories.yaml: is a folder, not a script — give one script file"


def test_unreadable_path(write) -> None:
    write("x", name="plain.txt")
    assert str(error_of(Path("plain.txt/story.yaml"))) == (
        "plain.txt/story.yaml: cannot read the file: Not a directory — check that the file exists and is readable"
    )


def test_file_that_is_not_text(write) -> None:
    Path("binary.yaml").write_bytes(b"segments: \xff\n")
    assert str(error_of(Path("binary.yaml"))) == "binary.yaml: not UTF-8 text (byte 10) — save the file as UTF-8"


@pytest.mark.parametrize(
    ("name", "kind"),
    [("story.txt", "'.txt' files"), ("story.json", "'.json' files"), ("README", "files without an extension")],
)
def test_unsupported_extension_lists_the_accepted_ones(write, name: str, kind: str) -> None:
    write(TWO_SEGMENTS, name=name)
    accepted = "give a story script ending in .yaml, .yml, .jsonl"
    assert str(error_of(Path(name))) == f"{name}: cannot read {kind} — {accepted}"


def test_segment_seconds_shorter_than_a_chunk(write) -> None:
    path = write(jsonl_line("a", "b"), name="p.jsonl")
    assert str(error_of(path, segment_seconds=0.5)) == (
        "p.jsonl: segment_seconds: must be a number of seconds no shorter than one chunk, got 0.5 — use at least "
        "0.75 s, such as 10"
    )


def test_story_checks_its_segments_when_built_in_code() -> None:
    with pytest.raises(ScriptError, match=r"segments: a story needs at least one segment"):
        story_of()
    with pytest.raises(ScriptError, match=r"segments\[2\]\.start: 4s is before segments\[1\] \(5s\)"):
        story_of(0.0, 5.0, 4.0)
    with pytest.raises(ScriptError, match=r"segments\[1\]\.start: 70s is at or after the end of the story"):
        story_of(0.0, 70.0, duration_s=60.0)
