"""`memflow check`: validate scripts and print each resolved timeline (no torch, no weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ..plan import (
    RELEASE_TEXT_TOKENS,
    PlanError,
    check_out_dir,
    checked_output_name,
    cut_prompts,
    load_stories,
    output_name,
    printable_path,
    story_name,
    story_outputs,
    story_settings,
)
from ..report import err, out, print_error, warn_prompt_cuts
from ..script import Story, Timeline, format_seconds
from ..settings import VideoGeometry
from ..text import json_line, one_line, plural
from .common import OutDir, Scripts, SegmentSeconds, reported

EPILOG = "Examples:  memflow check story.yaml  |  memflow check scripts/*.yaml --out-dir renders --json"


MAX_TABLES = 50  # more stories than this are a line each: ten thousand tables are neither read nor quick to print


def story_line(story: Story, timeline: Timeline) -> str:
    """One story in one line: where it is written, its seed and its timeline's totals."""
    name = f"{story.path}" + (f":{story.line}" if story.line else "")
    return one_line(
        f"{story.title}  ({name}, seed {story.seed}): {plural(len(timeline.segments), 'segment')}, "
        f"{plural(timeline.chunks, 'chunk')}, {timeline.video_frames} video frames, {timeline.duration_s:.2f} s"
    )


def timeline_table(story: Story, timeline: Timeline) -> Table:
    name = f"{story.path}" + (f":{story.line}" if story.line else "")
    table = Table(title=escape(one_line(f"{story.title}  ({name}, seed {story.seed})")), title_justify="left")
    for column in ("#", "start", "snapped", "chunk", "frames", "prompt"):
        table.add_column(column, overflow="fold" if column == "prompt" else "ellipsis")
    for s in timeline.segments:
        prompt = " ".join(s.prompt[:400].split())  # one line: newlines and tabs of the prompt are spaces
        prompt = prompt if len(prompt) <= 80 and len(s.prompt) <= 400 else prompt[:77] + "..."
        table.add_row(
            str(s.index), format_seconds(s.start_s), format_seconds(s.snapped_start_s),
            str(s.start_chunk), str(s.video_frames), escape(prompt),
        )  # fmt: skip
    table.caption = (
        f"{plural(timeline.chunks, 'chunk')}, {timeline.latent_frames} latent frames, "
        f"{timeline.video_frames} video frames, {timeline.duration_s:.2f} s"
    )
    return table


def story_record(story: Story, timeline: Timeline, output: Path) -> dict[str, Any]:
    """One story as `check --json` prints it."""
    return {
        "script": str(story.path), "line": story.line, "title": story.title, "seed": story.seed,
        "output": str(output), "chunks": timeline.chunks, "video_frames": timeline.video_frames,
        "duration_s": timeline.duration_s, "segments": len(timeline.segments),
    }  # fmt: skip


def check(
    scripts: Scripts,
    segment_seconds: SegmentSeconds = 10.0,
    out_dir: OutDir = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="One JSON object per story (script, title, seed, output file, frames) instead."),
    ] = False,
    against: Annotated[
        Path | None,
        typer.Option(
            "--against",
            help="An earlier render of the (one) story: say which segments `render --update` would keep.",
            metavar="FILE.mp4",
        ),
    ] = None,
) -> None:
    """Validate scripts and print each resolved timeline (no GPU, no weights, no torch).

    Each SCRIPT is a .yaml/.yml story or an official .jsonl prompt file. A prompt longer than the text
    encoder reads (512 tokens, by an estimate that errs high) is a warning naming its segment and the word
    after which it is cut.
    """
    geometry = VideoGeometry()
    with reported():
        if out_dir is not None:
            check_out_dir(out_dir)
        if against is not None:
            printable_path(against, "--against")
        stories, problems = load_stories(tuple(scripts), segment_seconds, geometry, keep_going=True)
        for problem in problems[:-1]:  # every bad script named, a line each, before any table
            print_error(problem)
        if problems:
            raise PlanError(problems[-1])
        # titles that collide matter only in one folder
        outputs = story_outputs(stories, out_dir) if out_dir else [checked_output_name(Path(output_name(story)))
                                                                   for story in stories]  # fmt: skip
        if against is not None and len(stories) != 1:
            raise PlanError(f"--against compares one story with its video; {len(stories)} were given")
    for story, output in zip(stories, outputs, strict=True):
        timeline = story.timeline(geometry)
        warn_prompt_cuts(story_name(story), cut_prompts(story, geometry, RELEASE_TEXT_TOKENS))
        if as_json:
            out.print(json_line(story_record(story, timeline, output)), markup=False, soft_wrap=True)
        elif len(stories) > MAX_TABLES:
            out.print(story_line(story, timeline), markup=False, soft_wrap=True)
        else:
            out.print(timeline_table(story, timeline))
    if against is not None:
        from ..update import preview_update

        story = stories[0]
        settings = story_settings(story, {}, geometry).as_dict()
        console = err if as_json else out  # stdout holds only JSON lines with --json
        console.print(f"against {against}: {preview_update(against, story.timeline(geometry), story.seed, settings)}",
                      markup=False, soft_wrap=True)  # fmt: skip
    if not as_json:
        out.print(f"ok: {len(scripts)} script(s) valid")
