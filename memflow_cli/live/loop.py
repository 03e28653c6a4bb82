"""The session loop: the one consumer of a live session's events, and the only holder of its state.

It takes the events the other threads put on the queue (`events.py`) one at a time, in the order they
came, and alone decides and reports: which typed prompts are queued (checked as `prompts.checked_prompt`
says, at most `MAX_PENDING` waiting) and which one starts at a chunk boundary; the prompt latencies; the
page's viewers; why the session ended. Reports go to `LiveReport` (printing, and frames for the page's
player), from this thread only.

A prompt is accepted as soon as its event is taken and its encoding starts then (`encode`), beside
generation: nothing here waits on a viewer or on the model, so a typed prompt is accepted within the
time the loop takes for the events before it (handing a chunk's frames to the player, a line of print).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..text import plural
from ..tokens import TokenCounter, prompt_cuts
from .events import (
    ChunkBoundary,
    ChunkShown,
    Closed,
    Event,
    EventQueue,
    LineNotText,
    LineTooLong,
    PromptAccepted,
    PromptRejected,
    PromptTyped,
    SessionEnded,
    Stop,
    StopIgnored,
    ViewerJoined,
    ViewerLeft,
)
from .prompts import (
    LINE_TOO_LONG,
    MAX_PENDING,
    PAGE_FULL,
    STDIN_FULL,
    PromptRefused,
    checked_prompt,
    line_not_text,
)

if TYPE_CHECKING:
    import queue

    import torch

SLOWER_THAN_REAL_TIME = ("generation is slower than real time here: frames come as they are made, and playback "
                         "stalls while the next chunk is made")  # fmt: skip
STOPPING = "stopping after the chunk being made (once more to abort at once)"
FINISHING = "the video is finished; writing its replay script and metadata"
STDIN_WARNINGS = 5  # refused stdin lines told one by one in a chunk (more than anyone types); the rest counted


@dataclass(frozen=True)
class LiveSegment:
    """A prompt of the session, placed on the chunk grid where it took over."""

    index: int
    start_chunk: int
    start_s: float  # on the video's timeline
    prompt: str
    source: str  # "script" (the opening script's), "prompt" (--prompt), "stdin" or "page"
    received_s: float | None  # perf_counter time it arrived (typed prompts)
    accepted_s: float | None = None  # perf_counter time the session loop queued it (typed prompts)

    def as_dict(self, started: float) -> dict[str, Any]:
        def since(moment: float | None) -> float | None:
            return None if moment is None else round(moment - started, 3)

        return {"start_chunk": self.start_chunk, "start_s": self.start_s, "prompt": self.prompt,
                "source": self.source, "received_s": since(self.received_s),
                "accepted_s": since(self.accepted_s)}  # fmt: skip


@dataclass(frozen=True)
class Latency:
    """From a typed prompt's arrival to the first frame of its segment: made (written) and on screen."""

    segment: LiveSegment
    to_written_s: float
    to_screen_s: float


class LiveReport:
    """What a session reports, from its loop's thread only; subclasses print it or serve it. Every method may be
    left out."""

    def switched(self, segment: LiveSegment, waited: int) -> None:
        """`segment` drives the chunk about to start; `waited`: prompts still queued behind it."""

    def chunk(self, index: int, frames: torch.Tensor, first_frame: int, due: Sequence[float],
              segments: Sequence[LiveSegment]) -> None:  # fmt: skip
        """Chunk `index` is written: its frames [N, H, W, 3] (frame `first_frame` on) play at `due`."""

    def latency(self, latency: Latency) -> None:
        """A typed prompt's first frame is made."""

    def notice(self, text: str) -> None:
        """Something to say once (generation slower than real time)."""

    def warn(self, text: str) -> None:
        """A prompt refused, a signal heard: one line."""

    def viewers(self, video: frozenset[queue.Queue], events: frozenset[queue.Queue]) -> None:
        """The page's viewers now: the queues of its video streams and of its event streams."""


@dataclass(frozen=True)
class Accepted:
    """A typed prompt the loop queued for a chunk."""

    prompt: str
    source: str
    received_s: float
    accepted_s: float  # perf_counter time the loop took it: its encoding started then


@dataclass(frozen=True)
class SessionRecord:
    """What the loop knows when the session ends."""

    latencies: tuple[Latency, ...]
    unused_prompts: tuple[str, ...]  # queued, but the session ended before their chunk
    slower_than_real_time: bool
    ended_by: str | None  # the signal's reason (None: the duration)


@dataclass
class _Viewers:
    video: set[queue.Queue] = field(default_factory=set)
    events: set[queue.Queue] = field(default_factory=set)


class SessionLoop:
    """Takes the session's events on a thread of its own and reports them; use `with` (the thread ends on exit).

    `opening`: the opening script's prompts by their first chunk (`opening_source` says whose: "script" or
    "prompt"); `chunk_seconds` places a segment on the video's timeline; `encode(prompt)` starts a queued
    prompt's encoding (it must return at once); a typed prompt longer than `token_limit` tokens (counted by
    `count_tokens`, else estimated) is told as `render` tells it (`tokens.PromptCut`), once it has its chunk.
    """

    def __init__(self, events: EventQueue, report: LiveReport, *, opening: Mapping[int, str] | None = None,
                 opening_source: str = "prompt", chunk_seconds: float = 0.75,
                 encode: Callable[[str], None] | None = None, token_limit: int | None = None,
                 count_tokens: TokenCounter | None = None):  # fmt: skip
        self.events, self.report = events, report
        self._token_limit, self._count_tokens = token_limit, count_tokens
        self._opening = dict(opening or {})
        self._opening_source = opening_source
        self._chunk_seconds = chunk_seconds
        self._encode = encode
        # the state: changed by this loop's thread only
        self._pending: deque[Accepted] = deque()
        self._segments: list[LiveSegment] = []
        self._latencies: list[Latency] = []
        self._stdin_overflowing = False  # stdin lines are being dropped: the queue was full
        self._stdin_refused = 0  # stdin lines refused since the last boundary (`_warn_stdin`)
        self._slow_said = False
        self._ended_by: str | None = None
        self._viewers = _Viewers()
        # set while a typed prompt waits for its chunk: the pacer starts a switching chunk sooner (`switches_at`)
        self._prompt_waiting = threading.Event()
        self.error: Exception | None = None  # what ended the loop early (a report that failed)
        self._thread = threading.Thread(target=self._run, name="memflow-live-session", daemon=True)

    # -- lifetime ----------------------------------------------------------------------------------------------

    def __enter__(self) -> SessionLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.events.put(Closed())
        self._thread.join(timeout=5.0)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def switches_at(self, chunk: int) -> bool:
        """Whether `chunk` will start a new segment, as far as is known now: the opening script's, or a typed
        prompt waiting (any thread may ask; the answer at the boundary itself is `ChunkBoundary`'s)."""
        return chunk in self._opening or self._prompt_waiting.is_set()

    def _run(self) -> None:
        try:
            while not isinstance(event := self.events.take(), Closed):
                if event is not None:
                    self.handle(event)
        except Exception as error:  # noqa: BLE001 - raised again on the generation thread, at its next question
            self.error = error

    # -- the events ----------------------------------------------------------------------------------------------

    def handle(self, event: Event) -> None:
        """One event: the state updated, and what it means reported."""
        if isinstance(event, PromptTyped):
            self._typed(event)
        elif isinstance(event, LineTooLong):
            self._warn_stdin(LINE_TOO_LONG)
        elif isinstance(event, LineNotText):
            self._warn_stdin(line_not_text(event.byte))
        elif isinstance(event, ChunkBoundary):
            event.answer.give(self._boundary(event.chunk))
        elif isinstance(event, ChunkShown):
            self._shown(event)
        elif isinstance(event, SessionEnded):
            self._tell_unwarned()  # refused lines since the last boundary
            event.answer.give(self._record())
        elif isinstance(event, (ViewerJoined, ViewerLeft)):
            self._viewer(event)
        elif isinstance(event, Stop):
            self._ended_by = self._ended_by or event.reason
            self.report.warn(STOPPING)
        elif isinstance(event, StopIgnored):
            self.report.warn(FINISHING)

    def _typed(self, typed: PromptTyped) -> None:
        try:
            prompt = checked_prompt(typed.text, typed.source)
        except PromptRefused as refused:
            self._refuse(typed, str(refused))
            return
        if len(self._pending) >= MAX_PENDING:
            if typed.answer is not None:
                typed.answer.give(PromptRejected(PAGE_FULL))
            elif not self._stdin_overflowing:  # one warning for a run of dropped lines
                self._stdin_overflowing = True
                self.report.warn(STDIN_FULL)
            return
        if typed.source == "stdin":
            self._stdin_overflowing = False
        self._pending.append(Accepted(prompt, typed.source, typed.received_s, time.perf_counter()))
        self._prompt_waiting.set()
        if typed.answer is not None:
            typed.answer.give(PromptAccepted(prompt))
        self._start_encoding(prompt)

    def _refuse(self, typed: PromptTyped, reason: str) -> None:
        if typed.answer is not None:
            typed.answer.give(PromptRejected(reason))
        else:
            self._warn_stdin(reason)

    def _warn_stdin(self, text: str) -> None:
        """A refused stdin line's warning: the first `STDIN_WARNINGS` of a chunk told, the others counted and told
        as one line at the next boundary (a flood of bad lines is not a flood of warnings)."""
        self._stdin_refused += 1
        if self._stdin_refused <= STDIN_WARNINGS:
            self.report.warn(text)

    def _tell_unwarned(self) -> None:
        if (untold := self._stdin_refused - STDIN_WARNINGS) > 0:
            self.report.warn(f"refused {plural(untold, 'more stdin line')} since the last chunk (not told one by one)")
        self._stdin_refused = 0

    def _start_encoding(self, prompt: str) -> None:
        if self._encode is None:
            return
        try:
            self._encode(prompt)
        except Exception as error:  # noqa: BLE001 - told, not asked: the prompt is queued whatever it does
            self.report.warn(f"could not start encoding a prompt as it came ({error}): it is encoded at its chunk")

    def _boundary(self, chunk: int) -> LiveSegment | None:
        """The segment that starts at `chunk`: the opening script's own, else the oldest typed prompt, else none."""
        self._tell_unwarned()
        start_s = chunk * self._chunk_seconds
        index = len(self._segments)
        if chunk in self._opening:
            segment = LiveSegment(index, chunk, start_s, self._opening[chunk], self._opening_source, None)
        elif self._pending:
            typed = self._pending.popleft()
            if not self._pending:
                self._prompt_waiting.clear()
            segment = LiveSegment(index, chunk, start_s, typed.prompt, typed.source, typed.received_s,
                                  typed.accepted_s)  # fmt: skip
        else:
            return None
        self._segments.append(segment)
        self.report.switched(segment, len(self._pending))
        if segment.received_s is not None and self._token_limit is not None:  # typed (the opening's are told before)
            for cut in prompt_cuts([segment], self._token_limit, self._count_tokens):
                self.report.warn(cut.describe())
        return segment

    def _shown(self, shown: ChunkShown) -> None:
        for segment in self._segments:
            if segment.start_chunk == shown.index and segment.received_s is not None:  # typed: someone waited
                latency = Latency(segment, shown.made_s - segment.received_s, shown.due[0] - segment.received_s)
                self._latencies.append(latency)
                self.report.latency(latency)
        self.report.chunk(shown.index, shown.frames, shown.first_frame, shown.due, tuple(self._segments))
        if shown.late and not self._slow_said:
            self._slow_said = True
            self.report.notice(SLOWER_THAN_REAL_TIME)

    def _viewer(self, event: ViewerJoined | ViewerLeft) -> None:
        streams = self._viewers.video if event.kind == "video" else self._viewers.events
        if isinstance(event, ViewerJoined):
            streams.add(event.stream)
        else:
            streams.discard(event.stream)
        self.report.viewers(frozenset(self._viewers.video), frozenset(self._viewers.events))

    def _record(self) -> SessionRecord:
        return SessionRecord(latencies=tuple(self._latencies), unused_prompts=tuple(a.prompt for a in self._pending),
                             slower_than_real_time=self._slow_said, ended_by=self._ended_by)  # fmt: skip
