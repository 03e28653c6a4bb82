"""Reading back a video memflow wrote: its frame count, size and rate (a test helper)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imageio_ffmpeg

from memflow_cli.output import OutputError


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    width: int
    height: int
    fps: float


def probe_video(path: Path) -> VideoInfo:
    """Frame count, size and frame rate of a video file (decodes it to count frames exactly)."""
    if not path.is_file():
        raise OutputError(f"{path}: no such video file")
    try:
        meta = _read_metadata(path)
        frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    except (RuntimeError, OSError) as error:
        last_line = (str(error).strip().splitlines() or ["unknown error"])[-1]
        raise OutputError(f"{path}: ffmpeg cannot read it: {last_line}") from error
    width, height = meta["size"]
    return VideoInfo(frames=frames, width=width, height=height, fps=float(meta["fps"]))


def _read_metadata(path: Path) -> dict[str, Any]:
    """The header imageio-ffmpeg parses from ffmpeg's output, without decoding any frame."""
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        return next(reader)
    finally:
        reader.close()
