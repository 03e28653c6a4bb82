"""Helpers of the command-line tests: the paths, the demo model's grid, running `memflow` in-process, writing
scripts, and reading back videos.

Expected numbers are computed from the rules, not read back from the code: a start snaps up to the next chunk
of 0.75 s (12 video frames at 16 fps), a chunk is 3 latent frames, N latent frames decode to 4N-3 video frames.
The demo model renders 96x64 at 16 fps.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import imageio_ffmpeg
from typer.testing import CliRunner

from memflow_cli.cli import app
from memflow_cli.output import lock_path, partial_path

from .video import probe_video

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEMFLOW_SHARED_DIR", REPO.parent / "shared"))
STORIES = SHARED / "stories"
EXAMPLES = REPO / "scripts_examples"
BATCH_RENDER = EXAMPLES / "batch_render.sh"

CHUNK_S = 0.75  # 12 video frames at 16 fps
FPS = 16
WIDTH, HEIGHT = 96, 64  # the demo model
JSONL_SEGMENT_S = 10.0  # `--segment-seconds` default
DEMO = ("--model", "demo", "--device", "cpu")
# The demo model's tiny random TAEHV decoder: the whole render path runs, and a process imports neither diffusers
# nor transformers (about 3 CPU-s less a process). For process tests whose subject is not the decoder (signals,
# locks, exit codes, the batch script, torchrun); each command keeps process tests on the default Wan VAE.
TAE = ("--decoder", "tae")

runner = CliRunner()


def chunks_until(seconds: float) -> int:
    """The first chunk starting at or after `seconds`."""
    return math.ceil(seconds / CHUNK_S - 1e-9)


def video_frames(chunks: int) -> int:
    """Frames of the first `chunks` chunks: 3 latent frames each, 4N-3 video frames for N latent frames."""
    return 0 if chunks == 0 else 4 * 3 * chunks - 3


def memflow(*args: str | Path):
    """`memflow ARGS` in this process; a traceback (an unexpected exception) fails the test."""
    result = runner.invoke(app, [str(arg) for arg in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert "Traceback" not in result.stdout + result.stderr
    return result


def write_story(path: Path, starts: list[str], duration: str, title: str | None = None, seed: int = 0) -> Path:
    prompts = ["a red fox trots across a snowy field", "the fox stops at the edge of a pine forest", "night falls"]
    lines = [f"title: {title}"] if title else []
    lines += [f"seed: {seed}", f"duration: {duration}", "segments:"]
    for start, prompt in zip(starts, prompts, strict=False):
        lines += [f"  - start: {start}", f"    prompt: {prompt}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, stories: list[list[str]]) -> Path:
    path.write_text("".join(json.dumps({"prompts": prompts}) + "\n" for prompts in stories), encoding="utf-8")
    return path


def decoded(path: Path) -> bytes:
    """Every RGB frame of a video, decoded in one go."""
    frames = imageio_ffmpeg.read_frames(str(path))
    next(frames)  # metadata
    return b"".join(frames)


def assert_video(path: Path, frames: int) -> None:
    info = probe_video(path)
    assert (info.frames, info.width, info.height, info.fps) == (frames, WIDTH, HEIGHT, FPS)


def dead_render(target: Path) -> None:
    """What kill -9 leaves of a render: its partial video and its lock file, with no process holding the lock."""
    partial_path(target).write_bytes(b"the frames of a render that died")
    lock_path(target).write_text("999999999\n")


def wait_until(ready: Callable[[], bool], process: subprocess.Popen, failed: str, timeout: float = 120,
               poll_s: float = 0.05) -> None:  # fmt: skip
    """Until `ready()` while `process` runs: its output if it ends first, `failed` (what did not happen) with the
    timeout if that comes first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{failed} in {timeout:g} s"
        time.sleep(poll_s)
