"""A live session: the story rendered continuously while prompts arrive, then written down to replay it.

`LiveVideo` is the generator's prompt source. At every chunk boundary it waits for the playback clock
(`pacing.Playback`: at most `ahead` chunks ahead of what the viewer sees, never so late that playback
runs dry), takes in the prompts that arrived (each encoded on a worker since it came), and says
which prompt drives the chunk: the opening script's own segment where one starts at that chunk, else
the oldest prompt not used yet (one switch a chunk, in the order they came), else the current one.
`run_live` streams that video through the engine into the MP4 (growing, as `render` writes it), and at
the end writes the replay script (`OUT.yaml`) and the sidecar. Nothing here prints or handles signals:
reports go to `LiveEvents`, and `stop()` ends the session at the next chunk boundary.
"""

from __future__ import annotations

import bisect
import statistics
import threading
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..engine import Chunk, Engine
from ..mp4 import RenderInterrupted
from ..output import write_video_sidecar
from ..record import video_record
from ..script import Story, chunk_for
from ..settings import GenerationSettings
from ..snapshots import SnapshotRecord, segments_digest
from ..update import SnapshotKeeper, StartPoint, remove_snapshots, render_identity
from .pacing import OnClock, Playback, PlaybackClock
from .prompts import Arrival, PromptInbox
from .replay import ReplaySegment, read_back, replay_text, write_replay

DEFAULT_AHEAD = 2


class SessionStop:
    """Ends a session at the next chunk boundary (waking it if it waits); safe from a signal handler."""

    def __init__(self, inbox: PromptInbox | None = None):
        self.inbox = inbox
        self.reason: str | None = None
        self.finishing = False  # the video is made; only its files are being written
        self._event = threading.Event()

    def set(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self._event.set()
        if self.inbox is not None:
            self.inbox.wake()

    def is_set(self) -> bool:
        return self._event.is_set()


@dataclass(frozen=True)
class LiveRequest:
    """What a live session is asked for."""

    target: Path  # the MP4 (reserved by the caller); the replay script is target.with_suffix(".yaml")
    opening: Story  # the opening prompt or script: its segments come at their times (its duration is not used)
    title: str  # of the replay script
    opening_script: Path | None  # where the opening came from (None: --prompt)
    settings: GenerationSettings  # `memory.interactive` decides how the bank records (unset: interactive)
    seed: int
    limit_s: float | None = None  # --duration: the session ends there; None: at stop()
    ahead: int = DEFAULT_AHEAD
    overwrite: bool = False
    snapshots: bool = False  # a snapshot at every prompt switch, for `render OUT.yaml --update` after an edit
    replay_options: str = ""  # the render options that make the same video (model, device, ...), for OUT.yaml

    @property
    def script(self) -> Path:
        return self.target.with_suffix(".yaml")


@dataclass(frozen=True)
class LiveSegment:
    """A prompt of the session, placed on the chunk grid where it took over."""

    index: int
    start_chunk: int
    start_s: float  # on the video's timeline
    prompt: str
    source: str  # "script" (the opening script's), "prompt" (--prompt), "stdin" or "page"
    received_s: float | None  # perf_counter time it arrived (typed prompts)

    def as_dict(self, started: float) -> dict[str, Any]:
        received = None if self.received_s is None else round(self.received_s - started, 3)
        return {"start_chunk": self.start_chunk, "start_s": self.start_s, "prompt": self.prompt,
                "source": self.source, "received_s": received}  # fmt: skip


@dataclass(frozen=True)
class Latency:
    """From a typed prompt's arrival to the first frame of its segment: made (written) and on screen."""

    segment: LiveSegment
    to_written_s: float
    to_screen_s: float


class LiveEvents:
    """What a session reports as it goes; subclasses print it or serve it. Every method may be left out."""

    def switched(self, segment: LiveSegment, waited: int) -> None:
        """`segment` drives the chunk about to start; `waited`: prompts still queued behind it."""

    def chunk(self, index: int, frames: torch.Tensor, first_frame: int, due: Sequence[float],
              segments: Sequence[LiveSegment]) -> None:  # fmt: skip
        """Chunk `index` is written: its frames [N, H, W, 3] (frame `first_frame` on) play at `due`."""

    def latency(self, latency: Latency) -> None:
        """A typed prompt's first frame is made."""

    def notice(self, text: str) -> None:
        """Something to say once (generation slower than real time)."""


@dataclass(frozen=True)
class LiveResult:
    path: Path
    script: Path
    sidecar: Path
    chunks: int
    video_frames: int
    seconds: float
    segments: tuple[LiveSegment, ...]
    latencies: tuple[Latency, ...]
    stalls: int
    stalled_s: float
    slower_than_real_time: bool
    ended_by: str
    unused_prompts: tuple[str, ...] = ()  # arrived too late: the session ended before their chunk
    stalled_frames: tuple[tuple[int, float], ...] = ()  # (frame that came late, seconds the picture stood), first 100
    chunk_times: tuple[float, ...] = ()  # seconds from one chunk's frames to the next's, after the first chunk

    def latency_summary(self) -> dict[str, Any]:
        screen = [latency.to_screen_s for latency in self.latencies]
        written = [latency.to_written_s for latency in self.latencies]
        if not screen:
            return {"prompts": 0}
        return {
            "prompts": len(screen),
            "to_screen_median_s": round(statistics.median(screen), 3), "to_screen_max_s": round(max(screen), 3),
            "to_written_median_s": round(statistics.median(written), 3), "to_written_max_s": round(max(written), 3),
        }  # fmt: skip


class LiveVideo:
    """The prompt source of a live session (`generator.PromptSource`) and the record of its segments."""

    def __init__(self, engine: Engine, request: LiveRequest, inbox: PromptInbox, playback: Playback[Chunk],
                 events: LiveEvents, stopped: SessionStop):  # fmt: skip
        self.engine, self.inbox, self.playback, self.events, self.stopped = engine, inbox, playback, events, stopped
        self.clock: PlaybackClock = playback.clock
        self.geometry = request.settings.geometry
        self.limit = None if request.limit_s is None else max(1, chunk_for(request.limit_s, self.geometry))
        self._scheduled = {chunk_for(s.start_s, self.geometry): s.prompt for s in request.opening.segments}
        self._opening_source = "script" if request.opening_script is not None else "prompt"
        self.segments: list[LiveSegment] = []
        self._starts: list[int] = []
        self._embeds: torch.Tensor | None = None  # the current segment's embeddings [text_len, text_dim]

    # -- what Engine.stream asks -----------------------------------------------------------------------

    def prompts(self) -> LiveVideo:
        return self

    def interactive(self, settings: GenerationSettings) -> bool:
        return settings.memory.interactive is not False  # `run_live` records an unset one as interactive

    def segment_of(self, chunk: int) -> int:
        return bisect.bisect_right(self._starts, chunk) - 1

    def at(self, chunk: int) -> tuple[int, torch.Tensor] | None:
        """Which prompt drives `chunk`, once the clock lets it start; None: the session ends before it."""
        if self.limit is not None and chunk >= self.limit:
            return None
        if chunk > 0:
            self._pace(chunk)
            if self.stopped.is_set():
                return None
        self.playback.started(time.perf_counter())
        self.inbox.sync()
        segment = self._next_segment(chunk)
        if segment is not None:
            self._embeds = self.engine.embeddings([segment.prompt])[0]  # held for the segment's chunks
            self.segments.append(segment)
            self._starts.append(chunk)
            self.events.switched(segment, self.inbox.pending())
        return self.segments[-1].index, self._embeds

    # -- the boundary ----------------------------------------------------------------------------------

    def _pace(self, chunk: int) -> None:
        """Wait until the pacer lets `chunk` start (or the session stops).

        The chunks made before `chunk` but not on the clock yet are decoding (on CUDA decoding trails
        generation) or held for the pre-roll; they reach the clock once this returns.
        """
        while not self.stopped.is_set():
            remaining = self.playback.start_time(chunk) - time.perf_counter()
            if remaining <= 0:
                return
            self.inbox.wait(remaining)

    def _next_segment(self, chunk: int) -> LiveSegment | None:
        start_s = chunk * self.geometry.chunk_seconds
        index = len(self.segments)
        if chunk in self._scheduled:
            return LiveSegment(index, chunk, start_s, self._scheduled[chunk], self._opening_source, None)
        arrival: Arrival | None = self.inbox.take()
        if arrival is None:
            return None
        return LiveSegment(index, chunk, start_s, arrival.prompt, arrival.source, arrival.received_s)

    def segments_shown(self) -> int:
        """Segments whose first frame is made."""
        return sum(1 for segment in self.segments if self.first_frame_of(segment) < self.clock.frames)

    def latencies_measured(self, since: int, until: int) -> list[Latency]:
        """The latencies of the typed segments `since` to `until` (segments whose first frame is made)."""
        latencies = []
        for segment in self.segments[since:until]:
            if segment.received_s is None:  # the opening script's: nobody waited for it
                continue
            frame = self.first_frame_of(segment)
            made, due = self.clock.made[frame], self.clock.due[frame]
            latencies.append(Latency(segment, made - segment.received_s, due - segment.received_s))
        return latencies

    def first_frame_of(self, segment: LiveSegment) -> int:
        return self.geometry.video_frames(segment.start_chunk * self.geometry.frames_per_chunk)


def run_live(
    engine: Engine, request: LiveRequest, inbox: PromptInbox, events: LiveEvents, stopped: SessionStop
) -> LiveResult:
    """Render the session into `request.target` until its duration or `stopped`; then write the replay
    script and the sidecar. Raises RenderInterrupted (the partial file kept) on a KeyboardInterrupt."""
    settings = request.settings
    if settings.memory.interactive is None:  # recorded, so that the replay records the bank the same way
        settings = replace(settings, memory=replace(settings.memory, interactive=True))
        request = replace(request, settings=settings)
    playback: Playback[Chunk] = Playback(engine.geometry.fps, engine.geometry.chunk_seconds, request.ahead)
    clock = playback.clock
    video = LiveVideo(engine, request, inbox, playback, events, stopped)
    latencies: list[Latency] = []
    measured = 0  # segments whose first frame is made
    slow_said = False
    started = time.perf_counter()
    made_at: list[float] = []  # when each chunk's frames were ready

    def show(shown: list[OnClock[Chunk]]) -> None:
        nonlocal measured, slow_said
        for on_clock in shown:
            chunk = on_clock.item
            assert chunk.frames is not None
            shown_now = video.segments_shown()
            for latency in video.latencies_measured(measured, shown_now):
                latencies.append(latency)
                events.latency(latency)
            measured = shown_now
            events.chunk(chunk.index, chunk.frames, on_clock.first_frame, on_clock.due, tuple(video.segments))
            late = clock.stalls and clock.stalls[-1].frame == on_clock.first_frame
            if late and not slow_said:  # never in the pre-roll: its chunks go on the clock together
                slow_said = True
                events.notice("generation is slower than real time here: frames come as they are made, "
                              "and playback stalls while the next chunk is made")  # fmt: skip

    # 1. the stream, written as it comes; every chunk's frames go on the playback clock (after the pre-roll).
    # A prompt is encoded as soon as it arrives, beside generation: at its chunk it is (nearly) ready.
    encode_early = inbox.notifying(lambda prompt: engine.prefetch([prompt], beside_render=True))
    keeper = _snapshot_keeper(engine, request, video) if request.snapshots else None
    with encode_early, engine.mp4_writer(request.target, overwrite=request.overwrite) as writer:
        try:
            keep = keeper.save if keeper is not None else None
            with closing(engine.stream(video, settings, request.seed, writer=writer, snapshots=keep)) as chunks:
                for chunk in chunks:
                    assert chunk.frames is not None
                    made_at.append(time.perf_counter())
                    show(playback.made(chunk, len(chunk.frames), made_at[-1]))
            show(playback.finish(time.perf_counter()))  # a session shorter than the pre-roll
            stopped.finishing = True  # from here on a signal does not cut the files short
        except KeyboardInterrupt:
            raise RenderInterrupted(writer.abort(), writer.frames_written) from None
    seconds = time.perf_counter() - started
    made = playback.chunks_on_clock
    unused = []  # prompts that came after the last chunk started
    while (arrival := inbox.take()) is not None:
        unused.append(arrival.prompt)
    # 2. the replay script, read back as `render` will read it
    segments = tuple(s for s in video.segments if s.start_chunk < made)
    text = replay_text(
        title=request.title, seed=request.seed, settings=settings,
        segments=[ReplaySegment(s.start_chunk, s.prompt) for s in segments], chunks=made, video=request.target,
        options=request.replay_options,
    )  # fmt: skip
    write_replay(request.script, text)
    story = read_back(request.script, engine.geometry, made, [s.start_chunk for s in segments])
    # 3. the sidecar: the request as render records it, and how the session went
    result = LiveResult(
        path=request.target, script=request.script, sidecar=request.target.with_suffix(".json"), chunks=made,
        video_frames=clock.frames, seconds=seconds, segments=segments, latencies=tuple(latencies),
        stalls=len(clock.stalls), stalled_s=clock.stalled_s, slower_than_real_time=slow_said,
        stalled_frames=tuple((stall.frame, stall.seconds) for stall in clock.stalls[:100]),
        ended_by=stopped.reason or "duration", unused_prompts=tuple(unused),
        chunk_times=tuple(later - earlier for earlier, later in zip(made_at[1:], made_at[2:], strict=False)),
    )  # fmt: skip
    kept = keeper.finish() if keeper is not None else None
    if keeper is None:
        remove_snapshots(request.target)  # an earlier video's (--overwrite): not this session's
    write_video_sidecar(request.target, _metadata(engine, request, story, settings, result, started, kept))
    return result


def _snapshot_keeper(engine: Engine, request: LiveRequest, video: LiveVideo) -> SnapshotKeeper:
    """Snapshots at the session's prompt switches, as `render` of its replay script would take them."""
    identity = render_identity(engine, request.settings, request.seed, video.interactive(request.settings))

    def prefix(chunk: int) -> str:  # the segments before `chunk` are known once it is reached
        return segments_digest(((s.prompt, s.start_chunk) for s in video.segments), chunk)

    return SnapshotKeeper(request.target, identity, prefix, engine.geometry, StartPoint(None, None, ""))


def _metadata(engine: Engine, request: LiveRequest, story: Story, settings: GenerationSettings, result: LiveResult,
              started: float, snapshots: SnapshotRecord | None) -> dict[str, Any]:  # fmt: skip
    timeline = story.timeline(engine.geometry)
    record = video_record(engine, story, timeline, settings, request.seed, script=str(request.script),
                          script_line=None, timings={"render_s": round(result.seconds, 3)},
                          snapshots=snapshots)  # fmt: skip
    return {
        **record,
        "live": {
            "ended_by": result.ended_by,
            "ahead_chunks": request.ahead,
            "opening_script": None if request.opening_script is None else str(request.opening_script),
            "segments": [segment.as_dict(started) for segment in result.segments],
            "latency": result.latency_summary(),
            "prompt_latencies": [
                {"start_chunk": lat.segment.start_chunk, "prompt": lat.segment.prompt, "source": lat.segment.source,
                 "to_written_s": round(lat.to_written_s, 3), "to_screen_s": round(lat.to_screen_s, 3)}
                for lat in result.latencies
            ],  # fmt: skip
            "stalls": result.stalls,
            "stalled_s": round(result.stalled_s, 3),
            "stalled_frames": [{"frame": frame, "s": round(seconds, 3)} for frame, seconds in result.stalled_frames],
            "slower_than_real_time": result.slower_than_real_time,
            "margin": margin(result.chunk_times, engine.geometry.chunk_seconds),
            "unused_prompts": list(result.unused_prompts),
        },
    }


def margin(chunk_times: Sequence[float], chunk_seconds: float) -> dict[str, float | int | None]:
    """How close the session ran to real time: the time between one chunk's frames and the next's (the first
    chunk, which carries the warm-up, left out) against the video time a chunk holds. A ratio below 1 is faster
    than real time; the margin is what a prompt switch or a slower chunk may take before playback stalls."""
    times = sorted(chunk_times)
    if not times:
        return {"chunks": 0, "chunk_duration_s": chunk_seconds, "chunk_s_median": None, "chunk_s_max": None,
                "ratio_median": None, "ratio_max": None}  # fmt: skip
    median, most = statistics.median(times), times[-1]
    return {
        "chunks": len(times), "chunk_duration_s": chunk_seconds, "chunk_s_median": round(median, 4),
        "chunk_s_max": round(most, 4), "ratio_median": round(median / chunk_seconds, 3),
        "ratio_max": round(most / chunk_seconds, 3),
    }  # fmt: skip
