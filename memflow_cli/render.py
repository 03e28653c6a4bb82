"""Render stories: a story's prompts encoded, then the engine's pipeline written to an MP4 that grows.

Nothing here prints: progress goes to a callback, results come back as values.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .engine import Engine
from .output import write_video_sidecar
from .script import Story, Timeline
from .settings import GenerationSettings


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
    first_frame_s: float


class RenderInterrupted(Exception):
    """The render was stopped (Ctrl-C); `partial` is the playable file of the finished chunks, if any."""

    def __init__(self, partial: Path | None, frames: int):
        super().__init__(f"interrupted after {frames} frames")
        self.partial, self.frames = partial, frames


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
) -> RenderResult:
    """Generate, decode and write one story to `target` (an MP4 that grows chunk by chunk)."""
    # 1. the timeline and its prompts, encoded before any file or process is touched
    timeline = story.timeline(engine.geometry, duration_s)
    video = engine.video(timeline)
    # 2. the pipeline, written as it streams; the writer keeps a playable partial file if it stops early
    started = time.perf_counter()
    first_frame_s = 0.0
    with engine.mp4_writer(target, overwrite=overwrite) as writer:
        try:
            with closing(engine.stream(video, settings, seed, writer=writer)) as chunks:
                for chunk in chunks:
                    elapsed = time.perf_counter() - started
                    first_frame_s = first_frame_s or elapsed
                    if progress:
                        progress(_progress(timeline, chunk.index, writer.frames_written, elapsed))
        except KeyboardInterrupt:
            raise RenderInterrupted(writer.abort(), writer.frames_written) from None
    seconds = time.perf_counter() - started
    # 3. the sidecar beside the finished video
    metadata = _metadata(engine, story, timeline, settings, seed, seconds, first_frame_s)
    metadata["prompts"] = _prompt_record(timeline, video.prompt_sources)
    sidecar = write_video_sidecar(target, metadata)
    return RenderResult(target, sidecar, timeline, seconds, first_frame_s)


def _progress(timeline: Timeline, chunk: int, video_frames: int, elapsed_s: float) -> ChunkProgress:
    segment = timeline.segments[timeline.prompt_index_for_chunk(chunk)]
    return ChunkProgress(
        chunk + 1, timeline.chunks, segment.index, segment.snapped_start_s, segment.prompt, video_frames, elapsed_s
    )


def _prompt_record(timeline: Timeline, sources: tuple[str, ...]) -> list[dict[str, str]]:
    """Per segment, its prompt and whether its embeddings were "encoded" for this video or "cached"."""
    return [{"prompt": prompt, "embedding": source} for prompt, source in zip(timeline.prompts, sources, strict=True)]


def request_record(story: Story, timeline: Timeline, settings: GenerationSettings, seed: int) -> dict[str, Any]:
    """What a render was asked for, as its sidecar records it: a finished video with the same record is done."""
    return {
        "title": story.title,
        "seed": seed,
        "timeline": {
            "chunks": timeline.chunks,
            "latent_frames": timeline.latent_frames,
            "video_frames": timeline.video_frames,
            "duration_s": timeline.duration_s,
            "segments": [
                {
                    "start_s": s.start_s,
                    "snapped_start_s": s.snapped_start_s,
                    "start_chunk": s.start_chunk,
                    "video_frames": s.video_frames,
                    "prompt": s.prompt,
                }
                for s in timeline.segments
            ],
        },
        "settings": settings.as_dict(),
    }


def _metadata(
    engine: Engine,
    story: Story,
    timeline: Timeline,
    settings: GenerationSettings,
    seed: int,
    seconds: float,
    first_frame_s: float,
) -> dict[str, Any]:
    return {
        "memflow_version": __version__,
        "script": str(story.path),
        "script_line": story.line,
        **request_record(story, timeline, settings, seed),
        "weights": engine.identity,
        "device": str(engine.device),
        **({"decode_device": str(engine.decode_device)} if engine.decode_device else {}),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "fp8": engine.fp8,
        "timings": {"render_s": round(seconds, 3), "first_chunk_s": round(first_frame_s, 3)},
    }
