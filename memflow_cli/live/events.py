"""What the threads of a live session tell its one loop: the events, the queue they go on, and the answers.

Every thread but the session loop (`loop.py`) only puts events here and, where it needs one, waits for
the answer; none changes the session's state or prints:

- the stdin reader: `PromptTyped` for each line, `LineTooLong` or `LineNotText` for a line dropped as it came;
- the page's handlers: `PromptTyped` (answered `PromptAccepted` or `PromptRejected`), `ViewerJoined`,
  `ViewerLeft`;
- the generation thread: `ChunkBoundary` (answered with the segment that starts there, if any),
  `ChunkShown`, `SessionEnded` (answered with the session's record);
- the signal handler: `Stop`, `StopIgnored`.

The queue is a `queue.SimpleQueue`: putting on it is safe from a signal handler, and it takes no lock of ours.
"""

from __future__ import annotations

import queue
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


class Answer(Generic[T]):
    """One value handed back to the thread that put an event and waits for it."""

    def __init__(self) -> None:
        self._slot: queue.SimpleQueue[T] = queue.SimpleQueue()

    def give(self, value: T) -> None:
        self._slot.put(value)

    def wait(self, timeout: float | None = None) -> T:
        """The value; raises queue.Empty where none came within `timeout` seconds."""
        return self._slot.get(timeout=timeout)


class EventQueue:
    """The session's one queue: any thread puts, the session loop alone takes."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Event] = queue.SimpleQueue()

    def put(self, event: Event) -> None:
        self._queue.put(event)

    def take(self, timeout: float | None = None) -> Event | None:
        """The next event, or None where none came within `timeout` seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None


# -- prompts -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptTyped:
    """A line from stdin or a prompt from the page, as it came (not checked yet)."""

    text: str
    received_s: float  # time.perf_counter() when it arrived
    source: str  # "stdin" or "page"
    answer: Answer[PromptAccepted | PromptRejected] | None = None  # the page waits for it; stdin does not


@dataclass(frozen=True)
class LineTooLong:
    """The stdin reader dropped a line longer than any prompt, as it came."""


@dataclass(frozen=True)
class LineNotText:
    """The stdin reader dropped a line that is not UTF-8 text; `byte`: where the first bad byte is (1 the first)."""

    byte: int


@dataclass(frozen=True)
class PromptAccepted:
    prompt: str  # as queued: surrounding spaces dropped


@dataclass(frozen=True)
class PromptRejected:
    reason: str  # one line


# -- the page's viewers --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewerJoined:
    stream: queue.Queue  # the viewer's own bounded queue
    kind: str  # "video" (PNG frames) or "events" (the status)


@dataclass(frozen=True)
class ViewerLeft:
    stream: queue.Queue
    kind: str


# -- the generation thread ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkBoundary:
    """Chunk `chunk` starts now: which segment starts with it (None: the current one goes on)."""

    chunk: int
    answer: Answer[Any]  # LiveSegment | None


@dataclass(frozen=True)
class ChunkShown:
    """Chunk `index` is written and on the playback clock: its frames from `first_frame` on play at `due`."""

    index: int
    frames: torch.Tensor  # [N, H, W, 3] uint8 on the CPU
    first_frame: int
    due: Sequence[float]
    made_s: float  # perf_counter time its frames were made
    late: bool  # playback stalled before its first frame


@dataclass(frozen=True)
class SessionEnded:
    """No chunk follows: the loop answers with its record (`loop.SessionRecord`) and keeps reporting until closed."""

    answer: Answer[Any]


# -- signals ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stop:
    reason: str  # "ctrl-c", "sigterm", "sighup"


@dataclass(frozen=True)
class StopIgnored:
    """A signal came while the finished video's files are written: they are written whole."""


@dataclass(frozen=True)
class Closed:
    """The session is over: the loop ends."""


Event = (
    PromptTyped | LineTooLong | LineNotText | ViewerJoined | ViewerLeft | ChunkBoundary | ChunkShown | SessionEnded
    | Stop | StopIgnored | Closed
)  # fmt: skip
