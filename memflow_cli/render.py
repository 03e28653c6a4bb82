"""Render stories: a story's prompts encoded, then the engine's pipeline written to an MP4 that grows.

Nothing here prints: progress goes to a callback, results come back as values.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from .engine import Engine
from .mp4 import RenderInterrupted
from .output import write_video_sidecar
from .record import video_record
from .script import Story, Timeline
from .settings import GenerationSettings
from .snapshots import SnapshotRecord, prefix_digest
from .speed import compile_cache
from .timing import RenderTimings, Startup, since_process_start, warmup_seconds
from .update import SnapshotKeeper, StartPoint, find_start, remove_snapshots, render_identity


@dataclass(frozen=True)
class ChunkProgress:
    """Reported after every chunk is written."""

    chunk: int  # chunks done
    chunks: int
    segment: int
    segment_start_s: float
    prompt: str
    video_frames: int  # frames written so far
    elapsed_s: float


@dataclass(frozen=True)
class RenderResult:
    path: Path
    sidecar: Path
    timeline: Timeline
    seconds: float
    timings: RenderTimings  # its phases, the first frame's time among them


def render_story(
    engine: Engine,
    story: Story,
    target: Path,
    settings: GenerationSettings,
    *,
    seed: int,
    duration_s: float | None = None,
    overwrite: bool = False,
    progress: Callable[[ChunkProgress], None] | None = None,
    reuse: bool = False,
    stopped: bool = False,
    keep_snapshots: bool = False,
    notice: Callable[[str], None] | None = None,
) -> RenderResult:
    """Generate, decode and write one story to `target` (an MP4 that grows chunk by chunk).

    With `keep_snapshots`, a story with several prompts keeps a snapshot at each boundary (`update.py`);
    without, none of that machinery runs. With `reuse`, the render starts from the latest snapshot of `target`
    (the finished video's or a stopped render's) that this story and request allow, and `target` is replaced;
    `stopped`: a stopped render's partial video of `target` was there (and has been replaced). `notice` hears,
    in one line, what is kept or why not (nothing where no earlier render of `target` is there), after a line
    for each snapshot that could not be read.
    """
    # 1. the timeline and its prompts, encoded before any file or process is touched
    timeline = story.timeline(engine.geometry, duration_s)
    encode_start = time.perf_counter()
    video = engine.video(timeline)
    encode_s = time.perf_counter() - encode_start
    identity = render_identity(engine, settings, seed, video.interactive(settings))
    start = StartPoint(None, None, "")
    if reuse:
        start = find_start(target, timeline, identity, engine.device, stopped=stopped)
    for line in (*start.unreadable, start.reason):
        if notice and line:
            notice(line)
    keeper = None
    if keep_snapshots and identity["interactive"]:  # a story that switches prompt (or may, appended to)
        prefix = functools.partial(prefix_digest, timeline)
        keeper = SnapshotKeeper(target, identity, prefix, engine.geometry, start)
    # 2. the pipeline, written as it streams; the writer keeps a playable partial file if it stops early
    started = time.perf_counter()
    chunk_ends: list[float] = []  # seconds from `started` to each chunk's frames handed to the writer
    first_frame_age = 0.0  # process start -> the first chunk's frames handed to the writer
    resume = start.snapshot.point if start.snapshot else None
    with engine.mp4_writer(target, overwrite=overwrite or reuse) as writer:
        try:
            keep = keeper.save if keeper is not None else None
            stream = engine.stream(video, settings, seed, writer=writer, resume=resume, snapshots=keep)
            with closing(stream) as chunks:
                for chunk in chunks:
                    chunk_ends.append(time.perf_counter() - started)
                    first_frame_age = first_frame_age or since_process_start()
                    if progress:
                        progress(_progress(timeline, chunk.index, writer.frames_written, chunk_ends[-1]))
        except KeyboardInterrupt:
            raise RenderInterrupted(writer.abort(), writer.frames_written) from None
        rendered = time.perf_counter()
    finished = time.perf_counter()
    timings = _timings(engine.startup, encode_s, chunk_ends, rendered - started, finished - rendered, first_frame_age)
    # 3. the sidecar beside the finished video; compiled graphs of this shape are in the cache from now on
    if keeper is not None:
        kept = keeper.finish()
    else:
        remove_snapshots(target)  # an earlier video's: not this video's
        kept = SnapshotRecord(start.reused_frames, start.segment)
    metadata = video_record(engine, story, timeline, settings, seed, script=str(story.path),
                            script_line=story.line, timings=timings.as_dict(), snapshots=kept)  # fmt: skip
    metadata["prompts"] = _prompt_record(timeline, video.prompt_sources)
    sidecar = write_video_sidecar(target, metadata)
    if engine.fast.compile and engine.device.type == "cuda":
        compile_cache.remember_compiled(engine.device, engine.source.architecture, settings, engine.fp8)
    return RenderResult(target, sidecar, timeline, finished - started, timings)


def _timings(
    startup: Startup | None, encode_s: float, chunk_ends: list[float], render_s: float, finish_s: float,
    first_frame_age: float,
) -> RenderTimings:  # fmt: skip
    startup = startup or Startup(0.0, 0.0)
    chunk_s = [end - start for start, end in zip([0.0, *chunk_ends], chunk_ends, strict=False)]
    return RenderTimings(
        import_s=startup.import_s, load_s=startup.load_s, encode_s=encode_s, warmup_s=warmup_seconds(chunk_s),
        first_frame_s=chunk_ends[0] if chunk_ends else 0.0, render_s=render_s, finish_s=finish_s,
        total_s=since_process_start(), time_to_first_frame_s=first_frame_age,
    )  # fmt: skip


def _progress(timeline: Timeline, chunk: int, video_frames: int, elapsed_s: float) -> ChunkProgress:
    segment = timeline.segments[timeline.prompt_index_for_chunk(chunk)]
    return ChunkProgress(
        chunk + 1, timeline.chunks, segment.index, segment.snapped_start_s, segment.prompt, video_frames, elapsed_s
    )


def _prompt_record(timeline: Timeline, sources: tuple[str, ...]) -> list[dict[str, str]]:
    """Per segment, its prompt and whether its embeddings were "encoded" for this video or "cached"."""
    return [{"prompt": prompt, "embedding": source} for prompt, source in zip(timeline.prompts, sources, strict=True)]
