"""The sidecar record of a video: what was asked (a finished video with the same request is done) and how it
was made. `render` and `live` both write it; `plan` compares a sidecar on disk with a request through it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import __version__
from .script import Story, Timeline
from .settings import GenerationSettings
from .snapshots import SnapshotRecord

if TYPE_CHECKING:
    from .engine import Engine


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


def video_record(
    engine: Engine, story: Story, timeline: Timeline, settings: GenerationSettings, seed: int, *,
    script: str | None, script_line: int | None, timings: dict[str, float], snapshots: SnapshotRecord | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The sidecar of a video `engine` made: the request, the weights, devices, dtype, the fast path, timings,
    and (`snapshots`) the frames it reused from an earlier render and the snapshots it keeps."""
    choice = engine.compile_choice
    return {
        "memflow_version": __version__,
        "script": script,
        "script_line": script_line,
        **request_record(story, timeline, settings, seed),
        "weights": engine.identity,
        "device": str(engine.device),
        **({"decode_device": str(engine.decode_device)} if engine.decode_device else {}),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "fp8": engine.fp8,
        "decoder": engine.decoder.value,
        "compile": engine.compile_path,
        **({"compile_reason": choice.reason} if choice else {}),
        "timings": timings,
        **(snapshots.as_dict() if snapshots is not None else {}),
    }
