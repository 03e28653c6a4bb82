"""The viewer's clock, and when generation may start its next chunk so that the clock never runs dry.

A frame plays at its due time: one frame period after the previous one, or when it is made if that is
later, and then playback has stalled (the viewer saw a frozen picture). Playback starts once the first
`PREROLL_CHUNKS` chunks are made, as a player buffers before it plays: the first chunk is short (9
frames, 0.56 s), and the second one is the video's first prompt switch or warm-up at the earliest, so
with one chunk in hand the picture could stand still while the second is made and handed over.

Generation is paced against this clock (`Playback`): the next chunk starts once the video made but not
played yet is down to `ahead` chunks, so a prompt typed now shows within about `ahead + 1` chunks; and
never later than the time it takes to get frames to the clock (measured on the last few chunks; for a
chunk that will switch prompt, on the latest switch, whose re-cache makes its chunk the longest) before
playback would run dry, whatever `ahead` says. A chunk that switches starts as soon as that allows once a
prompt waits for it: the video in hand plays out as it would, so the prompt shows no later, and the
longer chunk lands before playback runs dry. Where playback runs dry anyway (a machine slower than
real time) a chunk starts at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

STALL_TOLERANCE_S = 0.002  # a frame later than this past its period counts as a stall
HANDOVER_MARGIN_S = 0.05  # frames reach the clock at least this long before it would run dry
PREROLL_CHUNKS = 2  # chunks made before playback starts
RECENT_CHUNKS = 8  # chunks whose handover times bound the next one's
SWITCH_CHUNKS = 2.0  # a prompt switch's chunk is allowed up to this many chunks' duration (its re-cache pass)

T = TypeVar("T")


@dataclass(frozen=True)
class Stall:
    frame: int  # the frame that came late
    seconds: float  # how long the picture stood still


class PlaybackClock:
    """Due times of the frames made so far, the stalls among them, and how long generation may wait."""

    def __init__(self, fps: int):
        self.period = 1.0 / fps
        self.due: list[float] = []  # due[i]: when frame i plays (perf_counter seconds)
        self.made: list[float] = []  # made[i]: when frame i was made
        self.stalls: list[Stall] = []

    @property
    def frames(self) -> int:
        return len(self.due)

    def add(self, count: int, now: float, made: float | None = None) -> tuple[float, ...]:
        """`count` frames on the clock at `now` (made at `made`, default `now`); returns their due times."""
        start = len(self.due)
        for frame in range(start, start + count):
            if frame == 0:
                due = now
            else:
                on_time = self.due[-1] + self.period
                due = max(on_time, now)
                if now - on_time > STALL_TOLERANCE_S and frame == start:
                    self.stalls.append(Stall(frame, now - on_time))
            self.due.append(due)
            self.made.append(now if made is None else made)
        return tuple(self.due[start:])

    def runs_dry_at(self) -> float:
        """When playback will have shown every frame made so far (and stalls if nothing follows)."""
        return self.due[-1] + self.period if self.due else 0.0

    def start_time(self, ahead_s: float, pending_s: float = 0.0, handover_s: float = 0.0) -> float:
        """When generation may start its next chunk.

        Once the video made but not played yet is down to `ahead_s`, `pending_s` of it made but not on
        the clock yet (decoding beside generation); and, whatever `ahead_s` says, no later than
        `handover_s` (how long after a chunk starts frames reach the clock) and a margin before playback
        runs dry. Nothing on the clock yet (before playback starts): at once.
        """
        if not self.due:
            return 0.0
        dry = self.runs_dry_at()
        return min(dry - ahead_s + pending_s, dry - handover_s - HANDOVER_MARGIN_S)

    @property
    def stalled_s(self) -> float:
        return sum(stall.seconds for stall in self.stalls)


@dataclass(frozen=True)
class OnClock(Generic[T]):
    """A chunk put on the clock: its frames from `first_frame` on play at `due`."""

    item: T
    first_frame: int
    due: tuple[float, ...]


class Playback(Generic[T]):
    """The playback clock fed by the pipeline: holds the pre-roll, and says when the next chunk may start.

    The session says when a chunk starts (`started`) and hands over each chunk as its frames come out
    of the pipeline (`made`). From a chunk's start to the next frames out is the handover time, which
    covers generation, a prompt switch's re-cache and, where decoding does not trail generation, the
    decode; the longest of the recent chunks' bounds how late the next chunk may start. No handover
    counts for more than a chunk's duration, so one slow chunk (the first one's warm-up, a compile)
    adds at most a chunk to how far generation runs ahead, for the next few chunks.
    """

    def __init__(self, fps: int, chunk_s: float, ahead: int):
        self.clock = PlaybackClock(fps)
        self.chunk_s, self.ahead = chunk_s, ahead
        self._handovers: deque[float] = deque(maxlen=RECENT_CHUNKS)
        self.work_s: list[float] = []  # per chunk, from its start (after its wait) to its frames out
        self._switching = False  # the chunk in the making starts a new prompt
        self._switch_handover_s: float | None = None  # the latest switch's handover time (a re-cache pass more)
        self._started: float | None = None
        self._held: list[tuple[T, int, float]] = []  # the pre-roll: (chunk, frames, when made)
        self.chunks_on_clock = 0

    def started(self, now: float) -> None:
        """A chunk starts (after its wait)."""
        self._started = now

    def switching(self) -> None:
        """The chunk that started switches to a new prompt (its re-cache makes it longer than the others)."""
        self._switching = True

    def made(self, item: T, frames: int, now: float) -> list[OnClock[T]]:
        """A chunk's `frames` frames came out of the pipeline at `now`; returns what goes on the clock now
        (nothing while the pre-roll fills, then the held chunks too)."""
        if self._started is not None:
            self.work_s.append(now - self._started)
            # longer than a chunk plays (a warm-up, a compile) is slower than real time there: no earlier
            # start would keep up, so it counts as a chunk's duration
            if self._switching:
                self._switch_handover_s = min(self.work_s[-1], SWITCH_CHUNKS * self.chunk_s)
            else:
                self._handovers.append(min(self.work_s[-1], self.chunk_s))
        self._switching = False
        self._held.append((item, frames, now))
        if self.clock.frames or len(self._held) >= PREROLL_CHUNKS:
            return self.finish(now)
        return []

    def finish(self, now: float) -> list[OnClock[T]]:
        """Every held chunk on the clock from `now` on (the session ends before its pre-roll filled)."""
        shown = []
        for item, frames, made in self._held:
            first_frame = self.clock.frames
            shown.append(OnClock(item, first_frame, self.clock.add(frames, now, made)))
        self.chunks_on_clock += len(self._held)
        self._held.clear()
        return shown

    @property
    def handover_s(self) -> float:
        """The longest handover time of the recent chunks that kept their prompt (0 before the first)."""
        return max(self._handovers, default=0.0)

    @property
    def switch_handover_s(self) -> float:
        """The handover time allowed for a chunk that switches prompt: the latest switch's; before the first,
        twice a chunk's (the re-cache runs the window through the model once more)."""
        if self._switch_handover_s is not None:
            return self._switch_handover_s
        return min(SWITCH_CHUNKS * self.handover_s, SWITCH_CHUNKS * self.chunk_s)

    def start_time(self, chunk: int, switching: bool = False) -> float:
        """When chunk `chunk` may start: the chunks before it that are not on the clock yet are made (decoding
        beside generation, or held for the pre-roll) and count as video ahead of playback. A chunk that will
        switch prompt (`switching`: one is waiting) may start sooner, by what a switch takes more: that costs
        no latency (the video in hand plays out as it would) and keeps playback from running dry."""
        pending_s = (chunk - self.chunks_on_clock) * self.chunk_s
        handover_s = self.switch_handover_s if switching else self.handover_s
        return self.clock.start_time(self.ahead * self.chunk_s, pending_s, handover_s)
