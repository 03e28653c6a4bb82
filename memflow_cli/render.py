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

import torch

from . import __version__
from .engine import DEMO, Engine
from .output import write_video_sidecar
from .script import Story, Timeline
from .settings import GenerationSettings
from .speed import compile_cache
from .speed.compile_cache import CompileChoice, graphs_signature
from .timing import RenderTimings, Startup, since_process_start, warmup_seconds


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
    encode_start = time.perf_counter()
    video = engine.video(timeline)
    encode_s = time.perf_counter() - encode_start
    # 2. the pipeline, written as it streams; the writer keeps a playable partial file if it stops early
    started = time.perf_counter()
    chunk_ends: list[float] = []  # seconds from `started` to each chunk's frames handed to the writer
    first_frame_age = 0.0  # process start -> the first chunk's frames handed to the writer
    with engine.mp4_writer(target, overwrite=overwrite) as writer:
        try:
            with closing(engine.stream(video, settings, seed, writer=writer)) as chunks:
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
    metadata = _metadata(engine, story, timeline, settings, seed, timings)
    metadata["prompts"] = _prompt_record(timeline, video.prompt_sources)
    sidecar = write_video_sidecar(target, metadata)
    if engine.fast.compile and engine.device.type == "cuda":
        _remember_compiled(engine, settings)
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


# -- compile or not -----------------------------------------------------------------------------------------


def graphs_description(model: str | None, settings: GenerationSettings, fp8: bool) -> dict[str, Any]:
    """What decides the graphs a render compiles: the model's shape, the generation settings, FP8."""
    return {"model": "demo" if model == DEMO else "wan2.1-t2v-1.3b", "settings": settings.as_dict(), "fp8": fp8}


def compile_choice(
    model: str | None,
    device: str | torch.device,
    asked: bool | None,
    plans: list[tuple[Story, GenerationSettings]],
    duration_s: float | None,
    fp8: bool,
) -> CompileChoice:
    """Compile or not for these renders (`--compile`: True, `--no-compile`: False, neither: None), from the
    chunks they make in all and whether their graphs are in the compile cache (`speed.compile_cache`)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return compile_cache.choose_compile(asked, 0, cuda=False, warm=False)
    folder = compile_cache.device_cache_dir(dev)
    chunks = sum(story.timeline(settings.geometry, duration_s).chunks for story, settings in plans)
    warm = all(compile_cache.is_warm(folder, graphs_signature(graphs_description(model, s, fp8))) for _, s in plans)
    return compile_cache.choose_compile(asked, chunks, cuda=True, warm=warm)


def _remember_compiled(engine: Engine, settings: GenerationSettings) -> None:
    model = DEMO if engine.name == DEMO else None
    description = graphs_description(model, settings, engine.fp8)
    folder = compile_cache.device_cache_dir(engine.device)
    compile_cache.mark_warm(folder, graphs_signature(description), description)


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
    timings: RenderTimings,
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
        "decoder": engine.decoder.value,
        "compile": engine.compile_path,
        **({"compile_reason": engine.compile_choice.reason} if engine.compile_choice else {}),
        "timings": timings.as_dict(),
    }
