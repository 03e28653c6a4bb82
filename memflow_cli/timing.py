"""Where a render's time goes, from the moment its process started: the phases its sidecar and bench report.

A user waits from the command to the finished MP4; most of that is not the chunk loop. The process's own
start is read from the kernel (`/proc/self/stat`), so the time Python and the imports took before any
memflow code ran is counted too; where /proc is missing, the clock starts when the package was imported.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass

from . import IMPORTED_AT


def _process_age_from_proc() -> float | None:
    """Seconds since this process started, from /proc (Linux), or None where that cannot be read."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()  # the command name may hold spaces: cut after it
        with open("/proc/uptime", encoding="ascii") as uptime:
            since_boot = float(uptime.read().split()[0])
        started_after_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, since_boot - started_after_boot)


def _process_start() -> float:
    """The process's start on the `time.perf_counter` clock."""
    age = _process_age_from_proc()
    return IMPORTED_AT if age is None else min(IMPORTED_AT, time.perf_counter() - age)


PROCESS_START = _process_start()


def since_process_start() -> float:
    """Seconds since this process started (or, without /proc, since memflow was imported)."""
    return time.perf_counter() - PROCESS_START


@dataclass(frozen=True)
class Startup:
    """What an engine cost before its first video: the process up to loading, then loading."""

    import_s: float  # process start -> the engine starts loading (Python, torch, memflow, argument parsing)
    load_s: float  # weights read, models built, the fast path chosen


@dataclass(frozen=True)
class RenderTimings:
    """One render's phases, in seconds. import_s + load_s + encode_s + render_s + finish_s <= total_s;
    warmup_s is part of first_frame_s, which is part of render_s."""

    import_s: float  # the engine's, paid once per process (a batch's later stories share it)
    load_s: float
    encode_s: float  # the story's prompts encoded (0 where all were encoded already)
    warmup_s: float  # what the first chunk took beyond a steady chunk: compiling, autotuning
    first_frame_s: float  # stream start -> the first chunk's frames handed to the MP4 writer
    render_s: float  # stream start -> the last chunk's frames handed to the writer
    finish_s: float  # the MP4 finished (the encoder drained, the file moved into place)
    total_s: float  # process start -> the video finished
    time_to_first_frame_s: float  # process start -> the first chunk's frames handed to the writer

    def as_dict(self) -> dict[str, float]:
        return {name: round(value, 3) for name, value in asdict(self).items()}


def warmup_seconds(chunk_s: list[float]) -> float:
    """What the first chunk took beyond the median of the others (0 for a video of one chunk)."""
    if len(chunk_s) < 2:
        return 0.0
    return max(0.0, chunk_s[0] - statistics.median_high(chunk_s[1:]))
