"""Running `memflow live` as a user does, and reading back what it wrote (test helpers)."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from .cli_helpers import wait_until

MEMFLOW = [sys.executable, "-m", "memflow_cli"]
DEMO = ("--model", "demo", "--device", "cpu")
ROOT = Path(__file__).resolve().parents[1]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def start_live(*args: str | Path, stdin: int | None = None, model: tuple[str, ...] = DEMO) -> subprocess.Popen:
    """`memflow live ARGS` on `model` (the demo model on the CPU); `stdin` a file descriptor (a pipe written
    before the start)."""
    return subprocess.Popen(
        [*MEMFLOW, "live", *map(str, args), *model],
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
        # a shell's background jobs ignore SIGINT; a user's terminal does not
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def piped(lines: list[str]) -> tuple[int, int]:
    """(read end, write end) of a pipe that already holds `lines`; while the write end is open, no end of input."""
    read, write = os.pipe()
    os.write(write, "".join(f"{line}\n" for line in lines).encode())
    return read, write


def run_memflow(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*MEMFLOW, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=environment())  # fmt: skip


def wait_for_bytes(path: Path, size: int, process: subprocess.Popen, timeout: float = 180) -> None:
    """Until `path` holds more than `size` bytes (the growing partial video)."""
    wait_until(lambda: path.exists() and path.stat().st_size > size, process, f"{path} did not grow past {size} bytes",
               timeout)  # fmt: skip


def decoded_frames(path: Path) -> list[np.ndarray]:
    """Every frame of a video, decoded (rgb24)."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return [np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader]


def same_frames(a: Path, b: Path) -> bool:
    first, second = decoded_frames(a), decoded_frames(b)
    return len(first) == len(second) and all(np.array_equal(x, y) for x, y in zip(first, second, strict=True))


def render_replay(video: Path, replay: Path, timeout: float = 300) -> list[str]:
    """Render a session's OUT.yaml into `replay` with the options its replay line names; returns those options."""
    script = video.with_suffix(".yaml")
    options = replay_options(script)
    rendered = run_memflow("render", script, "-o", replay, *options, "-q", timeout=timeout)
    assert rendered.returncode == 0, rendered.stderr
    return options


def replay_options(script: Path) -> list[str]:
    """The render options that the `# replay ...:` header of a session's OUT.yaml names, as a user copies them."""
    header = next(line for line in script.read_text().splitlines() if line.startswith("# replay "))
    command = shlex.split(header.split(": ", 1)[1])
    assert command[:2] == ["memflow", "render"] and command[3:5] == ["-o", "replay.mp4"], header
    return command[5:]


# -- a session loop alone, without a model ---------------------------------------------------------------------


class Recorder:
    """What a session loop reports (`live.loop.LiveReport`), kept; viewers handed to `server` as the command does."""

    def __init__(self, server=None):
        self.server = server
        self.warnings: list[str] = []
        self.switches: list[tuple[str, int]] = []  # (prompt, prompts still waiting)
        self.latencies: list = []
        self.chunks: list[int] = []
        self.notices: list[str] = []

    def switched(self, segment, waited: int) -> None:
        self.switches.append((segment.prompt, waited))

    def chunk(self, index, frames, first_frame, due, segments) -> None:
        self.chunks.append(index)

    def latency(self, latency) -> None:
        self.latencies.append(latency)

    def notice(self, text: str) -> None:
        self.notices.append(text)

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def viewers(self, video, events) -> None:
        if self.server is not None:
            self.server.watch(video, events)


def waiting(loop) -> list[str]:
    """The prompts the loop holds for their chunks (asked as the generation thread asks, through the queue)."""
    from memflow_cli.live.events import SessionEnded
    from memflow_cli.live.session import ask

    return list(ask(loop, SessionEnded).unused_prompts)


def taken(loop, first_chunk: int = 1) -> list[str]:
    """Every prompt the loop holds, taken one chunk boundary each, as generation takes them."""
    from memflow_cli.live.events import ChunkBoundary
    from memflow_cli.live.session import ask

    prompts = []
    for chunk in itertools.count(first_chunk):
        segment = ask(loop, functools.partial(ChunkBoundary, chunk))
        if segment is None:
            return prompts
        prompts.append(segment.prompt)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def served(address: str = "0", public: bool = False):
    """The page's server with a session loop and no model: (server, loop, what the loop reported)."""
    from memflow_cli.live.events import EventQueue
    from memflow_cli.live.loop import SessionLoop
    from memflow_cli.live.server import LiveServer, parse_address

    events, report = EventQueue(), Recorder()
    with LiveServer(parse_address(address), events, public=public) as server, SessionLoop(events, report) as loop:
        report.server = server
        yield server, loop, report
