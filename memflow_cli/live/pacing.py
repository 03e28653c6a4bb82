"""The viewer's clock: frames play at the video's frame rate from the moment the first one is made.

A frame plays at its due time: one frame period after the previous one, or when it is made if that is
later, and then playback has stalled (the viewer saw a frozen picture). Generation is paced against
this clock: the next chunk starts once the video made but not played yet is down to `ahead` chunks (on
one clock: chunk k starts when chunk k - ahead is on screen), so a prompt typed now shows within about
`ahead + 1` chunks; where playback runs dry anyway (a machine slower than real time) it starts at once.
"""

from __future__ import annotations

from dataclasses import dataclass

STALL_TOLERANCE_S = 0.002  # a frame later than this past its period counts as a stall
HANDOVER_MARGIN_S = 0.05  # frames made but not handed over yet reach the clock this long before it runs dry


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

    def add(self, count: int, now: float) -> tuple[float, ...]:
        """`count` frames made at `now`; returns their due times."""
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
            self.made.append(now)
        return tuple(self.due[start:])

    def runs_dry_at(self) -> float:
        """When playback will have shown every frame made so far (and stalls if nothing follows)."""
        return self.due[-1] + self.period if self.due else 0.0

    def start_time(self, ahead_s: float, pending_s: float = 0.0) -> float:
        """When generation may start its next chunk: once the video made but not played yet is down to
        `ahead_s`. `pending_s` of it is made but not on the clock yet (decoding beside generation, it is
        handed over only when the next chunk starts): then never later than just before playback runs dry.
        """
        if not self.due:
            return 0.0
        dry = self.runs_dry_at()
        start = dry - ahead_s + pending_s
        return min(start, dry - HANDOVER_MARGIN_S) if pending_s > 0 else start

    @property
    def stalled_s(self) -> float:
        return sum(stall.seconds for stall in self.stalls)
