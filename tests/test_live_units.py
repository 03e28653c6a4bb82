"""The parts of a live session alone: the stdin reader, the session loop, the playback clock, the replay script."""

from __future__ import annotations

import fcntl
import functools
import os
import signal
import threading
import time

import pytest
import torch

from memflow_cli.generator import MemFlowGenerator, SeededNoise
from memflow_cli.live.events import EventQueue, LineNotText, LineTooLong, PromptTyped, Stop, StopIgnored
from memflow_cli.live.loop import STDIN_WARNINGS, SessionLoop
from memflow_cli.live.pacing import HANDOVER_MARGIN_S, Playback, PlaybackClock
from memflow_cli.live.prompts import (
    _BYTES_PER_CHUNK,
    MAX_PENDING,
    MAX_PROMPT_CHARS,
    PromptRefused,
    StdinReader,
    checked_prompt,
)
from memflow_cli.live.replay import (
    ReplayError,
    ReplaySegment,
    is_replay_script,
    read_back,
    replay_story,
    replay_text,
    write_replay,
)
from memflow_cli.live.start import SessionStop, stop_on_signals
from memflow_cli.model.transformer import CausalWanTransformer
from memflow_cli.prompt_embeds import PromptEmbeddings
from memflow_cli.report import Terminated
from memflow_cli.script import load_scripts
from memflow_cli.settings import GenerationSettings, MemorySettings, TransformerConfig, VideoGeometry
from memflow_cli.text import bidi_control, text_problem

from .live import Recorder, taken, waiting


def reading(data: bytes) -> tuple[StdinReader, EventQueue, int]:
    """A stdin reader of a pipe that holds `data` (the write end returned: open, no end of input yet)."""
    read, write = os.pipe()
    os.write(write, data)
    events = EventQueue()
    return StdinReader(read, events), events, write


def queued(events: EventQueue) -> list:
    """The events on the queue now, taken."""
    found = []
    while (event := events.take(timeout=0)) is not None:
        found.append(event)
    return found


def test_lines_written_before_a_boundary_are_all_on_the_queue_after_sync_in_order():
    reader, events, write = reading(b"  first prompt  \r\nsecond prompt\n\nthird")
    with reader:
        reader.sync()
        assert [event.text for event in queued(events)] == ["  first prompt  \r", "second prompt", ""]  # as typed
        os.close(write)  # the end of input: the last line counts, and the reader stops
        reader.sync()
        assert [(event.text, event.source) for event in queued(events)] == [("third", "stdin")]


def test_a_line_too_long_is_dropped_as_it_comes_and_the_next_line_is_read():
    reader, events, write = reading(b"y" * (5 * MAX_PROMPT_CHARS * 4))  # no end yet: longer than any line kept
    with reader:
        reader.sync()
        assert queued(events) == [LineTooLong()]
        os.write(write, b"still the same line\nafter it\n")
        reader.sync()
        assert [event.text for event in queued(events)] == ["after it"]
    os.close(write)


def test_the_loop_queues_checked_prompts_in_order_and_says_why_it_drops_the_others():
    events, report = EventQueue(), Recorder()
    with SessionLoop(events, report) as loop:
        for text in ("  first prompt  \r", "", "x" * (MAX_PROMPT_CHARS + 1), "a\x1bb", "second prompt"):
            events.put(PromptTyped(text, time.perf_counter(), "stdin"))
        events.put(LineTooLong())
        assert taken(loop) == ["first prompt", "second prompt"]
        assert report.switches == [("first prompt", 1), ("second prompt", 0)]
    assert report.warnings[0] == "ignored an empty prompt line (type the prompt, then Enter)"
    assert report.warnings[1].startswith(f"refused a prompt of {MAX_PROMPT_CHARS + 1} characters")
    assert "control character \\x1b" in report.warnings[2]
    assert report.warnings[3].startswith(f"refused a prompt line of more than {MAX_PROMPT_CHARS} characters")
    assert len(report.warnings) == 4


def test_a_flood_of_refused_lines_is_told_a_few_at_a_time_and_counted_at_the_next_chunk():
    events, report = EventQueue(), Recorder()
    with SessionLoop(events, report) as loop:
        for _ in range(STDIN_WARNINGS + 40):
            events.put(LineTooLong())
        events.put(PromptTyped("a prompt", time.perf_counter(), "stdin"))
        assert taken(loop) == ["a prompt"]  # its chunk's boundary counts the lines not told
    assert len(report.warnings) == STDIN_WARNINGS + 1
    assert report.warnings[-1] == "refused 40 more stdin lines since the last chunk (not told one by one)"


def test_refused_lines_after_the_last_chunk_are_counted_when_the_session_ends():
    events, report = EventQueue(), Recorder()
    with SessionLoop(events, report) as loop:
        for _ in range(STDIN_WARNINGS + 2):
            events.put(LineTooLong())
        assert waiting(loop) == []  # the session's end: its record asked for
    assert report.warnings[-1] == "refused 2 more stdin lines since the last chunk (not told one by one)"


def test_stdin_is_read_a_bounded_part_a_chunk_and_the_rest_waits_in_the_pipe():
    line = b"x" * 999 + b"\n"
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4 * _BYTES_PER_CHUNK)  # room for more than two chunks' parts
    written = 0
    while written < 2 * _BYTES_PER_CHUNK + len(line):
        written += os.write(write, line)
    events = EventQueue()
    with StdinReader(read, events) as reader:
        reader.sync()
        first = len(queued(events))
        assert 0 < first <= _BYTES_PER_CHUNK // len(line) + 1  # the rest waits in the pipe
        reader.sync()  # the next boundary: the next part
        assert 0 < len(queued(events)) <= _BYTES_PER_CHUNK // len(line) + 1
    os.close(write)
    os.close(read)


def test_a_line_that_is_not_utf8_is_refused_with_one_warning_and_a_leading_bom_is_dropped():
    reader, events, write = reading(b"a \xff line\n\xef\xbb\xbfwith a mark\nafter\n")
    with reader:
        reader.sync()
        lines = queued(events)
    os.close(write)
    assert lines[0] == LineNotText(3)  # never read with U+FFFD in its place
    report = Recorder()
    with SessionLoop(events, report) as loop:
        for event in lines:
            events.put(event)
        assert taken(loop) == ["with a mark", "after"]
    assert report.warnings == ["refused a prompt line that is not UTF-8 text (byte 3): save or type it as UTF-8; "
                               "the story goes on with the current prompt"]  # fmt: skip


def test_a_typed_prompt_longer_than_the_text_encoder_reads_is_told_at_its_chunk_as_render_tells_it():
    events, report = EventQueue(), Recorder()
    words = " ".join(f"w{i}" for i in range(300))
    with SessionLoop(events, report, opening={0: "a long opening is told by the command"}, opening_source="script",
                     token_limit=256, count_tokens=lambda text: len(text.split()) + 1) as loop:  # fmt: skip
        for text in ("short", words):
            events.put(PromptTyped(text, 1.0, "stdin"))
        assert taken(loop, first_chunk=0)[1:] == ["short", words]
    assert report.warnings == ["segment 2 (at 1.5s): 300 words, 301 tokens; the text encoder reads 256, so "
                               "everything after word 255 ('...w249 w250 w251 w252 w253 w254') is dropped"]  # fmt: skip


def test_the_opening_scripts_segment_comes_at_its_chunk_and_typed_prompts_wait_behind_it():
    events, report = EventQueue(), Recorder()
    with SessionLoop(events, report, opening={0: "dawn", 2: "storm"}, opening_source="script") as loop:
        events.put(PromptTyped("typed", 1.0, "page"))
        assert taken(loop, first_chunk=0) == ["dawn", "typed", "storm"]
    assert [prompt for prompt, _ in report.switches] == ["dawn", "typed", "storm"]


def test_the_loop_tells_the_pacer_a_switch_is_coming_while_a_prompt_waits_or_the_script_has_one():
    from memflow_cli.live.events import ChunkBoundary
    from memflow_cli.live.session import ask

    events, report = EventQueue(), Recorder()
    with SessionLoop(events, report, opening={0: "dawn", 5: "storm"}, opening_source="script") as loop:
        assert not loop.switches_at(1) and loop.switches_at(5)  # nothing typed; the script's own at chunk 5
        for text in ("first", "second"):
            events.put(PromptTyped(text, 1.0, "stdin"))
        assert waiting(loop) == ["first", "second"]  # answered after the loop took both
        assert loop.switches_at(1)
        assert ask(loop, functools.partial(ChunkBoundary, 1)).prompt == "first"
        assert loop.switches_at(2)  # "second" still waits
        assert ask(loop, functools.partial(ChunkBoundary, 2)).prompt == "second"
        assert not loop.switches_at(3) and loop.switches_at(5)


def test_the_page_is_answered_and_a_blank_or_too_long_prompt_is_not_queued():
    from memflow_cli.live.events import Answer, PromptAccepted, PromptRejected

    events, report = EventQueue(), Recorder()
    with SessionLoop(events, report) as loop:
        answers = []
        for text in ("   ", "x" * (MAX_PROMPT_CHARS + 1), " the tide turns "):
            answers.append(Answer())
            events.put(PromptTyped(text, 1.0, "page", answers[-1]))
        said = [answer.wait(5.0) for answer in answers]
        assert [type(s) for s in said] == [PromptRejected, PromptRejected, PromptAccepted]
        assert said[2].prompt == "the tide turns" and waiting(loop) == ["the tide turns"]
        assert said[0].reason == "the prompt is empty: write what happens next"  # not the terminal's words
    assert report.warnings == []  # the page is answered: nothing printed


def test_a_flood_of_prompts_is_bounded_with_one_warning_and_the_queue_takes_prompts_again_once_drained():
    from memflow_cli.live.events import Answer

    events, report = EventQueue(), Recorder()
    with SessionLoop(events, report) as loop:
        for i in range(MAX_PENDING + 100):
            events.put(PromptTyped(f"prompt {i}", 1.0, "stdin"))
        assert len(waiting(loop)) == MAX_PENDING
        assert len(report.warnings) == 1 and f"{MAX_PENDING} prompts are waiting" in report.warnings[0]
        refused = Answer()
        events.put(PromptTyped("from the page", 1.0, "page", refused))
        assert "waiting for their chunks already" in refused.wait(5.0).reason
        assert taken(loop) == [f"prompt {i}" for i in range(MAX_PENDING)]
        events.put(PromptTyped("from the page", 1.0, "page"))
        assert waiting(loop) == ["from the page"]


def test_a_signal_is_said_by_the_loop_and_its_reason_ends_the_session():
    from memflow_cli.live.events import SessionEnded, Stop, StopIgnored
    from memflow_cli.live.session import ask

    events, report = EventQueue(), Recorder()
    with SessionLoop(events, report) as loop:
        events.put(Stop("sigterm"))
        events.put(Stop("ctrl-c"))
        events.put(StopIgnored())
        assert ask(loop, SessionEnded).ended_by == "sigterm"
    assert report.warnings[0] == "stopping after the chunk being made (once more to abort at once)"
    assert report.warnings[-1] == "the video is finished; writing its replay script and metadata"


def test_a_report_that_fails_ends_the_loop_and_its_error_reaches_the_generation_thread():
    from memflow_cli.live.events import ChunkShown, SessionEnded
    from memflow_cli.live.session import ask

    class Failing(Recorder):
        def chunk(self, *args) -> None:
            raise OSError("the page's player is gone")

    events = EventQueue()
    with SessionLoop(events, Failing()) as loop:
        events.put(ChunkShown(0, torch.zeros(1, 2, 2, 3), 0, (0.0,), 0.0, False))
        with pytest.raises(OSError, match="player is gone"):
            ask(loop, SessionEnded)


def test_stop_wakes_the_wait_for_the_clock():
    with SessionStop() as stop:
        threading.Timer(0.05, stop.set).start()
        started = time.perf_counter()
        stop.wait(5.0)
        assert stop.is_set() and time.perf_counter() - started < 1.0


def test_a_signal_stops_the_command_before_the_session_ends_it_while_it_runs_and_is_ignored_once_it_finishes():
    events = EventQueue()
    with SessionStop() as stop, stop_on_signals(stop, events):
        with pytest.raises(Terminated):  # before the session runs (its checks, the model's load): as in `render`
            signal.raise_signal(signal.SIGTERM)
        stop.running = True
        signal.raise_signal(signal.SIGINT)  # the first one ends the session at the next chunk
        assert stop.is_set() and [type(event) for event in queued(events)] == [Stop]
        with pytest.raises(KeyboardInterrupt):  # a second one aborts it
            signal.raise_signal(signal.SIGINT)
        stop.finishing = True  # no chunk is made any more: the files are finished whatever comes
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
        assert [type(event) for event in queued(events)] == [StopIgnored, StopIgnored]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # pytest's handler is back


class _SlowEncoder:
    """A text encoder that takes 0.2 s a prompt and notes which thread encoded what."""

    def __init__(self):
        self.encoded: list[tuple[str, str]] = []

    def encode(self, prompts: list[str]) -> torch.Tensor:
        time.sleep(0.2)
        self.encoded += [(prompt, threading.current_thread().name) for prompt in prompts]
        return torch.zeros((len(prompts), 4, 8))

    def to(self, device):
        return self

    def offload(self):
        return self

    def describe(self) -> str:
        return "slow"


def test_a_live_prompt_is_encoded_on_a_worker_as_it_arrives_not_at_its_chunk():
    encoder = _SlowEncoder()
    embeddings = PromptEmbeddings(lambda: encoder, torch.device("cpu"))
    try:
        events, report = EventQueue(), Recorder()
        events.put(PromptTyped("typed while the model loaded", time.perf_counter(), "stdin"))
        with SessionLoop(events, report, encode=lambda prompt: embeddings.prefetch([prompt])) as loop:
            events.put(PromptTyped("typed during the session", time.perf_counter(), "page"))
            assert waiting(loop) == ["typed while the model loaded", "typed during the session"]  # taken at once
            deadline = time.monotonic() + 10
            while len(encoder.encoded) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        events.put(PromptTyped("typed after the session", time.perf_counter(), "stdin"))  # nobody takes it
        embeddings.wait()  # whatever was started is done
        assert [prompt for prompt, _ in encoder.encoded] == ["typed while the model loaded", "typed during the session"]
        assert all(thread.startswith("memflow-prompts") for _, thread in encoder.encoded)
        assert embeddings.embeddings(["typed during the session"]).shape == (1, 4, 8)
        assert len(encoder.encoded) == 2  # at the chunk: ready, nothing encoded again
    finally:
        embeddings.close()


class _EncoderOnCpu(_SlowEncoder):
    device = torch.device("cpu")  # offloaded: on a GPU engine, encoding would first move it back


def test_beside_a_render_a_prompt_is_not_encoded_where_the_encoder_would_take_gpu_memory(monkeypatch):
    encoder = _EncoderOnCpu()
    embeddings = PromptEmbeddings(lambda: encoder, torch.device("cuda"))  # nothing runs on the GPU here
    try:
        embeddings.prefetch(["a lighthouse"], beside_render=True)
        embeddings.wait()
        assert encoder.encoded == [] and not embeddings.encoder_loaded  # not loaded onto the GPU either
        embeddings._encoder = encoder  # loaded earlier, then offloaded to the CPU
        embeddings.prefetch(["a lighthouse"], beside_render=True)
        embeddings.wait()
        assert encoder.encoded == [] and embeddings.held_prompts() == 0
        encoder.device = torch.device("cuda")  # stays on the GPU beside the render: encoded on the worker
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
        monkeypatch.setattr(embeddings, "_settle", lambda encoder: None)
        embeddings.prefetch(["a lighthouse"], beside_render=True)
        embeddings.wait()
        assert [prompt for prompt, _ in encoder.encoded] == ["a lighthouse"]
    finally:
        embeddings.close()


def test_a_failing_encoding_start_is_one_warning_and_the_prompt_still_queued():
    def broken(prompt: str) -> None:
        raise RuntimeError("no worker")

    events, report = EventQueue(), Recorder()
    with SessionLoop(events, report, encode=broken) as loop:
        events.put(PromptTyped("a lighthouse", 1.0, "page"))
        assert taken(loop) == ["a lighthouse"]
    assert report.warnings == ["could not start encoding a prompt as it came (no worker): it is encoded at its chunk"]


def test_the_clock_plays_frames_at_the_frame_rate_and_counts_late_chunks_as_stalls():
    clock = PlaybackClock(fps=16)
    assert clock.add(9, now=100.0) == tuple(100.0 + i / 16 for i in range(9))
    # the next chunk arrives before the first has played: it follows on time, no stall
    due = clock.add(12, now=100.2)
    assert due[0] == pytest.approx(100.0 + 9 / 16) and clock.stalls == []
    # the third chunk comes 1 s after the second ran dry: playback stood still 1 s
    dry = clock.runs_dry_at()
    assert dry == pytest.approx(100.0 + 21 / 16)
    clock.add(12, now=dry + 1.0)
    assert len(clock.stalls) == 1 and clock.stalled_s == pytest.approx(1.0)
    # the next chunk may start once at most 2 chunks (1.5 s) are made but not played
    dry = clock.runs_dry_at()
    assert clock.start_time(ahead_s=1.5) == pytest.approx(dry - 1.5)
    # a chunk made but still decoding counts as made; never so late that playback runs dry before frames come
    assert clock.start_time(ahead_s=1.5, pending_s=0.75) == pytest.approx(dry - 0.75)
    assert clock.start_time(ahead_s=1.5, pending_s=1.5) == pytest.approx(dry - HANDOVER_MARGIN_S)
    assert clock.start_time(ahead_s=0.0) == pytest.approx(dry - HANDOVER_MARGIN_S)  # --ahead 0: just in time
    # frames reach the clock 0.4 s after a chunk starts: start that much before playback would run dry
    assert clock.start_time(ahead_s=0.0, handover_s=0.4) == pytest.approx(dry - 0.4 - HANDOVER_MARGIN_S)
    assert clock.start_time(ahead_s=1.5, handover_s=0.4) == pytest.approx(dry - 1.5)  # ahead is earlier anyway
    assert PlaybackClock(16).start_time(ahead_s=1.5) == 0.0  # nothing made yet: at once


def test_playback_starts_once_the_preroll_is_made_and_the_frames_keep_their_made_times():
    playback: Playback[str] = Playback(fps=16, chunk_s=0.75, ahead=2)
    playback.started(10.0)
    assert playback.made("chunk 0", 9, now=10.5) == []  # held: one short chunk is no buffer
    assert playback.start_time(chunk=1) == 0.0  # nothing plays yet: the next chunk starts at once
    playback.started(10.5)
    shown = playback.made("chunk 1", 12, now=10.9)
    assert [s.item for s in shown] == ["chunk 0", "chunk 1"] and [s.first_frame for s in shown] == [0, 9]
    assert shown[0].due[0] == 10.9 and shown[1].due[0] == pytest.approx(10.9 + 9 / 16)
    assert playback.clock.made[0] == 10.5 and playback.clock.made[9] == 10.9
    assert playback.handover_s == pytest.approx(0.5)
    playback.started(11.0)
    assert [s.item for s in playback.made("chunk 2", 12, now=11.3)] == ["chunk 2"]  # playing: at once
    assert playback.finish(12.0) == []
    short: Playback[str] = Playback(fps=16, chunk_s=0.75, ahead=2)
    assert short.made("only", 9, now=1.0) == [] and [s.item for s in short.finish(1.2)] == ["only"]


def _session_stalls(**machine) -> list:
    return _simulated_session(**machine)[0]


def _simulated_session(
    *, ahead: int, generate_s: float, decode_s: float, trailing: bool, chunks: int = 60, slow_first: float = 0.0,
    slow_chunks: int = 3, switches: tuple[int, ...] = (), switch_s: float = 0.0, foresee: bool = True,
) -> tuple[list, list[float]]:  # fmt: skip
    """The stalls of a session on a simulated machine, and the video made but not played (seconds) as each
    chunk from the fifth on starts: `Playback` paced as the session paces it, chunks made in `generate_s`
    (`slow_first` more for the first `slow_chunks`, `switch_s` more at a switch), decoded in `decode_s`
    either after each chunk or beside generation on a worker, handed over as `Overlap.map` hands them
    over (up to two trailing). With `foresee` the pacer knows a switch is coming (a prompt is waiting), as the
    session tells it."""
    playback: Playback[int] = Playback(fps=16, chunk_s=0.75, ahead=ahead)
    buffered: list[float] = []
    frames = [9] + [12] * (chunks - 1)
    now, decoder_free = 0.0, 0.0
    decoding: list[tuple[int, float]] = []  # (chunk, decoded at)
    for chunk in range(chunks):
        if chunk:
            now = max(now, playback.start_time(chunk, switching=foresee and chunk in switches))
            if chunk > 3:
                pending = chunk - playback.chunks_on_clock
                buffered.append(max(playback.clock.runs_dry_at() - now, 0.0) + pending * 0.75)
        playback.started(now)
        if chunk in switches:
            playback.switching()
        now += generate_s + (slow_first if chunk < slow_chunks else 0.0) + (switch_s if chunk in switches else 0.0)
        if not trailing:
            now += decode_s
            playback.made(chunk, frames[chunk], now)
            continue
        decoder_free = max(now, decoder_free) + decode_s + (slow_first if chunk < slow_chunks else 0.0)
        decoding.append((chunk, decoder_free))
        while decoding and (chunk == 0 or decoding[0][1] <= now or len(decoding) > 2):
            done, at = decoding.pop(0)
            now = max(now, at)
            playback.made(done, frames[done], now)
    for done, at in decoding:
        playback.made(done, frames[done], max(now, at))
    playback.finish(now)
    return playback.clock.stalls, buffered


H200_EAGER = dict(generate_s=0.42, decode_s=0.25, trailing=True)  # decoding trails generation on a worker
COMPILED_SLOW_START = dict(generate_s=0.30, decode_s=0.15, trailing=True, slow_first=0.5)
CLOSE_TO_REAL_TIME = dict(generate_s=0.60, decode_s=0.50, trailing=True)
DECODE_AFTER_EACH_CHUNK = dict(generate_s=0.35, decode_s=0.30, trailing=False)
SWITCHES = dict(switches=(10, 30, 50), switch_s=0.1)  # a re-cache pass more at three switches


@pytest.mark.parametrize(
    ("ahead", "machine"),
    [(ahead, machine) for ahead in (0, 1, 2, 4)
     for machine in (H200_EAGER, COMPILED_SLOW_START, CLOSE_TO_REAL_TIME, DECODE_AFTER_EACH_CHUNK)]
    # a switch's extra work is not foreseen: it takes the buffer of --ahead 2 or more to ride it out
    + [(ahead, {**machine, **SWITCHES}) for ahead in (2, 4) for machine in (H200_EAGER, CLOSE_TO_REAL_TIME)],
)  # fmt: skip
def test_a_machine_faster_than_real_time_never_stalls_playback(ahead, machine):
    assert _session_stalls(ahead=ahead, **machine) == []


@pytest.mark.parametrize("ahead", [1, 2])
def test_a_slow_warm_up_does_not_let_generation_run_further_ahead_than_asked(ahead):
    # the first chunk takes 20 s more (a compile): it counts as one chunk's duration, for the next 8 chunks
    stalls, buffered = _simulated_session(ahead=ahead, generate_s=0.3, decode_s=0.15, trailing=True, slow_first=20,
                                          slow_chunks=1)  # fmt: skip
    assert stalls == []
    assert max(buffered) <= 0.75 + 0.75 + HANDOVER_MARGIN_S + 0.75 + 1e-9  # made but not played as a chunk starts
    assert max(buffered[10:]) <= max(ahead * 0.75, 0.3 + HANDOVER_MARGIN_S + 0.75) + 1e-9  # then as asked


def test_a_foreseen_switch_starts_sooner_and_does_not_stall_even_with_no_buffer():
    assert _session_stalls(ahead=0, **CLOSE_TO_REAL_TIME, **SWITCHES) == []


def test_an_unforeseen_switch_with_no_buffer_stalls_by_what_it_adds_beyond_the_margin():
    stalls = _session_stalls(ahead=0, **CLOSE_TO_REAL_TIME, **SWITCHES, foresee=False)
    assert [stall.frame for stall in stalls] == [9 + 12 * 8, 9 + 12 * 28, 9 + 12 * 48]  # the chunk before each
    assert all(stall.seconds == pytest.approx(0.1 - HANDOVER_MARGIN_S) for stall in stalls)


# a live session on an H100 with the Wan VAE: each chunk decoded at once (not trailing), a switch a re-cache more
H100_WAN_LIVE = dict(generate_s=0.28, decode_s=0.17, trailing=False, switches=(10, 30, 50), switch_s=0.45)


def test_one_chunk_ahead_rides_out_switches_longer_than_a_chunk_when_they_are_foreseen():
    assert _session_stalls(ahead=1, **H100_WAN_LIVE) == []
    assert len(_session_stalls(ahead=1, **H100_WAN_LIVE, foresee=False)) == 3  # what starting sooner saves


def test_the_pace_allows_a_switch_the_latest_switchs_time_and_other_chunks_their_own():
    playback: Playback[int] = Playback(fps=16, chunk_s=0.75, ahead=0)
    playback.started(0.0)
    playback.made(0, 9, now=0.3)
    assert playback.switch_handover_s == pytest.approx(0.6)  # before any switch: twice a chunk's
    playback.started(1.0)
    playback.switching()
    playback.made(1, 12, now=1.5)
    for chunk in range(2, 20):
        playback.started(chunk * 1.0)
        playback.made(chunk, 12, now=chunk * 1.0 + 0.3)
    assert playback.handover_s == pytest.approx(0.3) and playback.switch_handover_s == pytest.approx(0.5)
    assert playback.start_time(20, switching=True) < playback.start_time(20)


def test_a_machine_slower_than_real_time_stalls_and_the_stalls_are_counted():
    stalls = _session_stalls(ahead=2, generate_s=0.9, decode_s=0.2, trailing=True, chunks=10)
    # after the pre-roll every chunk comes late: by 0.15 s, what making it takes beyond the 0.75 s it plays
    assert [stall.frame for stall in stalls] == [21, 33, 45, 57, 69, 81, 93]
    assert [round(stall.seconds, 3) for stall in stalls[1:]] == [0.15] * 6


def _replay(path, title, prompts, settings, chunks=None):
    """The replay script of a session with `prompts` at chunks 0, 1, 2, ... written at `path` and read back."""
    segments = [ReplaySegment(chunk, prompt) for chunk, prompt in enumerate(prompts)]
    chunks = chunks or len(prompts)
    story = replay_story(path=path, title=title, seed=5, settings=settings, segments=segments, chunks=chunks)
    text = replay_text(title=title, seed=5, settings=settings, segments=segments, chunks=chunks,
                       video=path.with_suffix(".mp4"))  # fmt: skip
    return write_replay(path, text, story, settings.geometry)


def test_the_replay_script_snaps_back_to_the_chunks_of_the_session(tmp_path):
    geometry = VideoGeometry(height=64, width=96)
    settings = GenerationSettings(geometry=geometry).with_overrides({"interactive": True, "window": 9, "shift": 3.5})
    segments = [ReplaySegment(0, "opening"), ReplaySegment(1, 'quotes " and: colons'), ReplaySegment(1001, "ü 🌊")]
    path = tmp_path / "session.yaml"
    expected = replay_story(path=path, title="t", seed=2**64 - 1, settings=settings, segments=segments, chunks=1003)
    write_replay(path, replay_text(title="t", seed=2**64 - 1, settings=settings, segments=segments, chunks=1003,
                                   video=tmp_path / "session.mp4"), expected, geometry)  # fmt: skip
    assert is_replay_script(path)
    story = load_scripts(path, geometry=geometry)[0]
    assert [s.prompt for s in story.segments] == ["opening", 'quotes " and: colons', "ü 🌊"]
    assert [s.start_chunk for s in story.timeline(geometry).segments] == [0, 1, 1001]
    assert story.timeline(geometry).chunks == 1003 and story.seed == 2**64 - 1
    assert GenerationSettings(geometry=geometry).with_overrides(story.settings) == settings  # every setting
    other = replay_story(path=path, title="t", seed=2**64 - 1, settings=settings, segments=segments, chunks=1002)
    with pytest.raises(ReplayError, match="would not replay the session"):
        read_back(path, other, geometry)


AWKWARD = [
    "1e5", "1E5", "-1e5", "+1e5", "1.5e3", "+.5", "1e-3", ".5", "5.", "010", "0x10", "0o17", "1_000", "12",
    "1:30", "1:30:00", "2024-01-02", "2024-01-02 10:00:00", ".inf", "-.inf", ".nan", "NaN", "inf",
    "yes", "no", "on", "off", "y", "n", "true", "False", "TRUE", "null", "Null", "~", "none",
    "'single'", '"double"', "it's", 'say "hi"', "a # not a comment", "#hash", "key: value", "a:b", "- item",
    "[1, 2]", "{a: 1}", "&anchor", "*alias", "!tag", "!!str", "%TAG", "@at", "`tick`", "|", ">", "?", "---", "...",
    "back\\slash \\n", "tab\there", "two\nlines", "trailing tab\t", "ü 🌊 日本語", "\u00a0nbsp", "zero\u200bwidth",
    "\ufeffbom", "a\u2028b", "a\x85b", "\u200b", "a\ud800b", "x\u00a0", "\u00a0\u00a0", "\tlead", "a\n\nb", "a\r\nb",
    "? x", "x:", "\U0001f600", "\u202egnp", "a\x7fb", "a\u200db", "--- x", "... x", "<<", "=", "1,000", "1 000",
    "0b101", "Infinity", "2001-12-14t21:59:43.10-05:00", "12:30:45.5", "10s", "é" * 300, "word " * 399 + "end",
]


def awkward_texts(count: int = 150) -> list[str]:
    """The awkward strings above, and `count` more made of their pieces, spaces and punctuation (seeded)."""
    import random

    pieces = [*AWKWARD[:-2], " ", "  ", ": ", " #", "\t", "\n", "'", '"', "\\", "-", "=", "<", ">", "%", "&"]
    made = random.Random(11)
    texts = list(AWKWARD)
    while len(texts) < len(AWKWARD) + count:
        text = "".join(made.choice(pieces) for _ in range(made.randint(1, 6)))
        if text.strip():
            texts.append(text)
    return texts


def _taken(text: str) -> str | None:
    """`text` as a session takes it from stdin or the page (`checked_prompt`), or None where it is refused."""
    try:
        return checked_prompt(text)
    except PromptRefused:
        return None


def test_every_text_reads_back_as_it_was_written_however_it_looks(tmp_path):
    geometry = VideoGeometry(height=64, width=96)
    settings = GenerationSettings(geometry=geometry).with_overrides({"interactive": True})
    prompts = [prompt for text in awkward_texts() if (prompt := _taken(text)) is not None]
    assert len(prompts) > 200 and {"1e5", "1:30", "yes", "null", "~", "a\n\nb"} <= set(prompts)
    story = _replay(tmp_path / "prompts.yaml", "title", prompts, settings)
    assert [segment.prompt for segment in story.segments] == prompts
    for index, prompt in enumerate(prompts):  # a title is one line of text that fits a file name
        if not text_problem(prompt) and not bidi_control(prompt) and len(prompt.encode()) <= 200:  # as start.py
            assert _replay(tmp_path / f"title{index}.yaml", prompt, ["a fox"], settings).title == prompt, prompt
    long = "x" * MAX_PROMPT_CHARS
    assert _replay(tmp_path / "long.yaml", "1e5", [long, "1e5"], settings).segments[0].prompt == long


def test_a_replay_script_that_cannot_be_written_is_one_error_and_leaves_nothing(tmp_path):
    settings = GenerationSettings(geometry=VideoGeometry(height=64, width=96))
    folder = tmp_path / "session.yaml"
    folder.mkdir()
    with pytest.raises(ReplayError, match=r"cannot write the replay script .*session.yaml: Is a directory"):
        _replay(folder, "t", ["a fox"], settings)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["session.yaml"]  # no temporary file left


def test_a_prompt_source_deciding_at_each_boundary_makes_what_the_same_script_makes():
    config = TransformerConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, text_dim=16, text_len=8)
    torch.manual_seed(0)
    model = CausalWanTransformer(config).eval().requires_grad_(False)
    geometry = VideoGeometry(height=32, width=48)
    prompts = torch.randn((3, 5, config.text_dim), generator=torch.Generator().manual_seed(1))
    asked: list[int] = []

    class Typed:  # prompt 1 typed before chunk 2, prompt 2 before chunk 5; the session ends before chunk 7
        def at(self, chunk: int):
            asked.append(chunk)
            if chunk >= 7:
                return None
            segment = 0 if chunk < 2 else 1 if chunk < 5 else 2
            return segment, prompts[segment]

    def video(settings: GenerationSettings, live: bool) -> torch.Tensor:
        generator = MemFlowGenerator(model, settings)
        noise = SeededNoise(3, generator.noise_shape(), "cpu", torch.float32)
        chunks = generator.stream(Typed(), noise, interactive=True) if live else generator.generate(
            prompts, 7, noise, (2, 5))  # fmt: skip
        return torch.cat(list(chunks), dim=1)

    settings = GenerationSettings(memory=MemorySettings(), geometry=geometry)
    assert torch.equal(video(settings, live=True), video(settings, live=False))
    assert asked == list(range(8))  # asked at every boundary, and once more to end
    # one prompt, recorded as interactive (what a live session with no typed prompt writes): as its script says
    single = GenerationSettings(memory=MemorySettings(interactive=True), geometry=geometry)
    plain = GenerationSettings(memory=MemorySettings(), geometry=geometry)

    def one_prompt(settings: GenerationSettings) -> torch.Tensor:
        generator = MemFlowGenerator(model, settings)
        noise = SeededNoise(3, generator.noise_shape(), "cpu", torch.float32)
        return torch.cat(list(generator.generate(prompts[:1], 8, noise)), dim=1)

    assert not torch.equal(one_prompt(single), one_prompt(plain))  # the bank records otherwise: it matters


def test_a_chunks_time_is_its_work_not_its_wait_for_the_clock():
    """Paced chunks come out a chunk's duration apart; what they took to make is what the margin reads."""
    playback: Playback[int] = Playback(fps=16, chunk_s=0.75, ahead=1)
    for chunk, start in enumerate([0.0, 0.4, 1.0, 1.75, 2.5]):  # from the third on, each started by the clock
        playback.started(start)
        playback.made(chunk, 12, start + 0.3 + 0.1 * (chunk == 3))  # chunk 3 switches prompt: a re-cache more
    assert playback.work_s == pytest.approx([0.3, 0.3, 0.3, 0.4, 0.3])


def test_the_margin_is_the_time_a_chunk_takes_against_a_chunks_video_time():
    from memflow_cli.live.session import margin

    assert margin([0.5, 0.25, 0.6], 0.75) == {
        "chunks": 3, "chunk_duration_s": 0.75, "chunk_s_median": 0.5, "chunk_s_max": 0.6,
        "ratio_median": 0.667, "ratio_max": 0.8,
    }  # fmt: skip
    assert margin([], 0.75)["ratio_median"] is None  # a session of one or two chunks has no steady time
