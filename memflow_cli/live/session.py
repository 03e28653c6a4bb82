"""A live session: the story rendered continuously while prompts arrive, then written down to replay it.

This is the generation thread's side. `LiveVideo` is the generator's prompt source: at every chunk
boundary it waits for the playback clock (`pacing.Playback`: at most `ahead` chunks ahead of what the
viewer sees, never so late that playback runs dry), waits until the stdin lines already written are on
the session's queue, and asks the session loop (`loop.py`) which prompt drives the chunk. `run_live`
streams that video through the engine into the MP4 (growing, as `render` writes it), puts each chunk
on the queue as it goes on the playback clock, and at the end writes the replay script (`OUT.yaml`) and
the sidecar. Nothing here prints or decides about prompts: the loop does; `SessionStop` ends the session
at the next chunk boundary.
"""

from __future__ import annotations

import bisect
import queue
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
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
from ..tokens import TokenCounter
from ..update import SnapshotKeeper, StartPoint, remove_snapshots, render_identity
from .events import Answer, ChunkBoundary, ChunkShown, Event, EventQueue, SessionEnded
from .loop import Latency, LiveReport, LiveSegment, SessionLoop, SessionRecord
from .pacing import OnClock, Playback
from .prompts import StdinReader
from .replay import ReplayError, ReplaySegment, replay_story, replay_text, write_replay
from .start import SessionStop

DEFAULT_AHEAD = 2
PACE_POLL_S = 0.01  # how often a chunk waiting for the clock looks whether a prompt came


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
    token_limit: int | None = None  # tokens of a prompt the text encoder reads: a typed prompt past it is told
    count_tokens: TokenCounter | None = field(default=None, compare=False)  # the model's tokenizer (None: estimated)

    @property
    def script(self) -> Path:
        return self.target.with_suffix(".yaml")


@dataclass(frozen=True)
class LiveResult:
    path: Path
    script: Path | None  # None: it could not be written (`replay_problem` says why)
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
    chunk_times: tuple[float, ...] = ()  # per chunk after the first: from its start (after its wait for the
    # clock) to its frames out: generation, a switch's re-cache, the decode
    replay_problem: str | None = None  # why the replay script could not be written (the video and sidecar are)

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


ANSWER_WAIT_S = 0.5  # how often a wait for the session loop looks whether it is still there


class LiveVideo:
    """The prompt source of a live session (`generator.PromptSource`) and the record of its segments."""

    def __init__(self, engine: Engine, request: LiveRequest, reader: StdinReader, loop: SessionLoop,
                 playback: Playback[Chunk], stopped: SessionStop):  # fmt: skip
        self.engine, self.reader, self.loop, self.playback, self.stopped = engine, reader, loop, playback, stopped
        self.geometry = request.settings.geometry
        self.limit = None if request.limit_s is None else max(1, chunk_for(request.limit_s, self.geometry))
        self.segments: list[LiveSegment] = []  # as the loop answered: the segments generated
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
            return self._last()
        if chunk > 0:
            self._pace(chunk)
            if self.stopped.is_set():
                return self._last()
        self.playback.started(time.perf_counter())
        self.reader.sync()  # the lines written before this boundary are on the queue before the question
        segment: LiveSegment | None = ask(self.loop, lambda answer: ChunkBoundary(chunk, answer))
        if segment is not None:
            if chunk > 0:
                self.playback.switching()
            self._embeds = self.engine.embeddings([segment.prompt])[0]  # held for the segment's chunks
            self.segments.append(segment)
            self._starts.append(chunk)
        return self.segments[-1].index, self._embeds

    def _last(self) -> None:
        """No chunk is made any more: from here a signal does not cut the video's files short."""
        self.stopped.finishing = True

    def _pace(self, chunk: int) -> None:
        """Wait until the pacer lets `chunk` start (or the session stops).

        The chunks made before `chunk` but not on the clock yet are held for the pre-roll (the session's
        stream hands each chunk out once it is decoded, before asking for the next one).
        """
        while not self.stopped.is_set():
            switching = self.loop.switches_at(chunk)
            remaining = self.playback.start_time(chunk, switching) - time.perf_counter()
            if remaining <= 0:
                return
            self.stopped.wait(min(remaining, PACE_POLL_S))  # a prompt typed meanwhile may let it start sooner


def ask(loop: SessionLoop, event: Callable[[Answer], Event]) -> Any:
    """Put the event `event(answer)` on the loop's queue and wait for the loop's answer."""
    answer: Answer = Answer()
    loop.events.put(event(answer))
    while True:
        try:
            return answer.wait(ANSWER_WAIT_S)
        except queue.Empty:
            if not loop.alive():
                raise loop.error or RuntimeError("the live session's loop stopped before it answered") from None


def run_live(
    engine: Engine, request: LiveRequest, events: EventQueue, reader: StdinReader, report: LiveReport,
    stopped: SessionStop
) -> LiveResult:  # fmt: skip
    """Render the session into `request.target` until its duration or `stopped`; then write the replay
    script and the sidecar. The session loop runs meanwhile, taking `events` and reporting to `report`.
    Raises RenderInterrupted (the partial file kept) on a KeyboardInterrupt."""
    settings = request.settings
    if settings.memory.interactive is None:  # recorded, so that the replay records the bank the same way
        settings = replace(settings, memory=replace(settings.memory, interactive=True))
        request = replace(request, settings=settings)
    geometry = engine.geometry
    playback: Playback[Chunk] = Playback(geometry.fps, geometry.chunk_seconds, request.ahead)
    opening = {chunk_for(s.start_s, geometry): s.prompt for s in request.opening.segments}
    # a prompt is encoded as soon as the loop takes it, beside generation: at its chunk it is (nearly) ready
    loop = SessionLoop(events, report, opening=opening, chunk_seconds=geometry.chunk_seconds,
                       opening_source="script" if request.opening_script is not None else "prompt",
                       encode=lambda prompt: engine.prefetch([prompt], beside_render=True),
                       token_limit=request.token_limit, count_tokens=request.count_tokens)  # fmt: skip
    started = time.perf_counter()
    with loop:
        video = LiveVideo(engine, request, reader, loop, playback, stopped)
        keeper = _snapshot_keeper(engine, request, video) if request.snapshots else None
        # 1. the stream, written as it comes; every chunk's frames go on the playback clock (after the pre-roll)
        with engine.mp4_writer(request.target, overwrite=request.overwrite) as writer:
            try:
                keep = keeper.save if keeper is not None else None
                # each chunk's frames out as soon as they are decoded: the next chunk waits for the clock
                stream = engine.stream(video, settings, request.seed, writer=writer, snapshots=keep, decode_trail=0)
                with closing(stream) as chunks:
                    for chunk in chunks:
                        assert chunk.frames is not None
                        _shown(events, playback, playback.made(chunk, len(chunk.frames), time.perf_counter()))
                _shown(events, playback, playback.finish(time.perf_counter()))  # shorter than the pre-roll
                stopped.finishing = True  # (where the stream ended without asking for another chunk)
            except KeyboardInterrupt:
                stopped.finishing = True  # a further signal does not cut the partial file short
                raise RenderInterrupted(writer.abort(), writer.frames_written) from None
        seconds = time.perf_counter() - started
        record: SessionRecord = ask(loop, SessionEnded)
        # 2. the replay script and the sidecar, the loop still reporting (a signal now is answered)
        return _write_down(engine, request, settings, video, playback, record, keeper, started, seconds)


def _shown(events: EventQueue, playback: Playback[Chunk], shown: list[OnClock[Chunk]]) -> None:
    """The chunks put on the playback clock, told to the loop."""
    clock = playback.clock
    for on_clock in shown:
        chunk = on_clock.item
        assert chunk.frames is not None
        late = bool(clock.stalls) and clock.stalls[-1].frame == on_clock.first_frame  # never in the pre-roll
        events.put(ChunkShown(chunk.index, chunk.frames, on_clock.first_frame, on_clock.due,
                              clock.made[on_clock.first_frame], late))  # fmt: skip


def _write_down(engine: Engine, request: LiveRequest, settings: GenerationSettings, video: LiveVideo,
                playback: Playback[Chunk], record: SessionRecord, keeper: SnapshotKeeper | None, started: float,
                seconds: float) -> LiveResult:  # fmt: skip
    """The replay script, read back as `render` will read it, then the sidecar (written even where the replay
    script could not be)."""
    clock = playback.clock
    made = playback.chunks_on_clock
    segments = tuple(s for s in video.segments if s.start_chunk < made)
    replayed = [ReplaySegment(s.start_chunk, s.prompt) for s in segments]
    story = replay_story(path=request.script, title=request.title, seed=request.seed, settings=settings,
                         segments=replayed, chunks=made)  # fmt: skip
    text = replay_text(title=request.title, seed=request.seed, settings=settings, segments=replayed, chunks=made,
                       video=request.target, options=request.replay_options)  # fmt: skip
    problem = None
    try:
        story = write_replay(request.script, text, story, engine.geometry)
    except ReplayError as error:
        problem = str(error)
    result = LiveResult(
        path=request.target, script=None if problem else request.script, sidecar=request.target.with_suffix(".json"),
        chunks=made, video_frames=clock.frames, seconds=seconds, segments=segments, latencies=record.latencies,
        stalls=len(clock.stalls), stalled_s=clock.stalled_s, slower_than_real_time=record.slower_than_real_time,
        stalled_frames=tuple((stall.frame, stall.seconds) for stall in clock.stalls[:100]),
        ended_by=record.ended_by or "duration", unused_prompts=record.unused_prompts,
        chunk_times=tuple(playback.work_s[1:]), replay_problem=problem,
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
    script = str(result.script) if result.script is not None else None  # none where it could not be written
    record = video_record(engine, story, timeline, settings, request.seed, script=script,
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
    """How close the session ran to real time: the time each chunk took to make (from its start, after any wait
    for the viewer's clock, to its frames out; the first chunk, which carries the warm-up, left out) against the
    video time a chunk holds. A ratio below 1 is faster than real time; 1 - ratio is the share of a chunk's
    playing time left for a prompt switch, a slower chunk or the machine's other work before playback stalls."""
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
