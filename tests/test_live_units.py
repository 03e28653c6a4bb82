"""The parts of a live session alone: the prompt inbox, the playback clock, the replay script's round trip."""

from __future__ import annotations

import os
import time

import pytest
import torch

from memflow_cli.generator import MemFlowGenerator, SeededNoise
from memflow_cli.live.pacing import HANDOVER_MARGIN_S, PlaybackClock
from memflow_cli.live.prompts import MAX_PENDING, MAX_PROMPT_CHARS, PromptInbox, PromptRefused
from memflow_cli.live.replay import ReplaySegment, is_replay_script, read_back, replay_text, write_replay
from memflow_cli.model.transformer import CausalWanTransformer
from memflow_cli.settings import GenerationSettings, MemorySettings, TransformerConfig, VideoGeometry


def inbox_with(data: bytes, warnings: list[str]) -> tuple[PromptInbox, int]:
    read, write = os.pipe()
    os.write(write, data)
    inbox = PromptInbox(read, warnings.append)
    return inbox, write


def taken(inbox: PromptInbox) -> list[str]:
    prompts = []
    while (arrival := inbox.take()) is not None:
        prompts.append(arrival.prompt)
    return prompts


def test_lines_written_before_a_boundary_are_all_queued_by_sync_in_order():
    warnings: list[str] = []
    inbox, write = inbox_with(b"  first prompt  \r\nsecond prompt\n\nthird", warnings)
    with inbox:
        inbox.sync()
        assert taken(inbox) == ["first prompt", "second prompt"]  # "third" has no newline yet
        assert warnings == ["ignored an empty prompt line (type the prompt, then Enter)"]
        os.close(write)  # the end of input: the last line counts, and the inbox keeps working
        inbox.sync()
        assert taken(inbox) == ["third"]
        assert inbox.post("from the page").source == "page"
        assert taken(inbox) == ["from the page"]


def test_a_line_too_long_is_refused_in_one_warning_and_the_next_line_is_read():
    warnings: list[str] = []
    endless = b"y" * (5 * MAX_PROMPT_CHARS * 4)  # longer than any line the inbox keeps: it is dropped as it comes
    inbox, write = inbox_with(endless + b"\nafter it\n" + b"z" * (MAX_PROMPT_CHARS + 1) + b"\n", warnings)
    with inbox:
        inbox.sync()
        assert taken(inbox) == ["after it"]
        assert len(warnings) == 2 and all(f"{MAX_PROMPT_CHARS}" in w for w in warnings)
    os.close(write)


def test_the_page_cannot_queue_a_blank_or_too_long_prompt():
    with PromptInbox(None, print) as inbox:
        for bad in ("   ", "x" * (MAX_PROMPT_CHARS + 1)):
            with pytest.raises(PromptRefused):
                inbox.post(bad)
        assert inbox.pending() == 0


def test_a_flood_of_prompts_is_bounded_with_one_warning_and_the_queue_takes_prompts_again_once_drained():
    warnings: list[str] = []
    flood = b"".join(f"prompt {i}\n".encode() for i in range(MAX_PENDING + 100))
    inbox, write = inbox_with(flood, warnings)
    with inbox:
        inbox.sync()
        assert inbox.pending() == MAX_PENDING
        assert len(warnings) == 1 and f"{MAX_PENDING} prompts are waiting" in warnings[0]
        with pytest.raises(PromptRefused, match="waiting for their chunks already"):
            inbox.post("from the page")
        assert taken(inbox) == [f"prompt {i}" for i in range(MAX_PENDING)]
        assert inbox.post("from the page").prompt == "from the page"
    os.close(write)


def test_wait_returns_early_when_a_prompt_arrives():
    with PromptInbox(None, print) as inbox:
        inbox.post("now")
        started = time.perf_counter()
        inbox.wait(5.0)
        assert time.perf_counter() - started < 1.0


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
    # a chunk made but still decoding counts as made; with chunks decoding, start before playback runs dry
    assert clock.start_time(ahead_s=1.5, pending_s=0.75) == pytest.approx(dry - 0.75)
    assert clock.start_time(ahead_s=1.5, pending_s=1.5) == pytest.approx(dry - HANDOVER_MARGIN_S)
    assert clock.start_time(ahead_s=0.0) == pytest.approx(dry)  # --ahead 0: once everything made has played
    assert PlaybackClock(16).start_time(ahead_s=1.5) == 0.0  # nothing made yet: at once


def test_the_replay_script_snaps_back_to_the_chunks_of_the_session(tmp_path):
    geometry = VideoGeometry(height=64, width=96)
    settings = GenerationSettings(geometry=geometry).with_overrides({"interactive": True, "window": 9, "shift": 3.5})
    segments = [ReplaySegment(0, "opening"), ReplaySegment(1, 'quotes " and: colons'), ReplaySegment(1001, "ü 🌊")]
    path = tmp_path / "session.yaml"
    write_replay(path, replay_text(title="t", seed=2**64 - 1, settings=settings, segments=segments, chunks=1003,
                                   video=tmp_path / "session.mp4"))  # fmt: skip
    assert is_replay_script(path)
    story = read_back(path, settings.geometry, 1003, [0, 1, 1001])
    assert [s.prompt for s in story.segments] == ["opening", 'quotes " and: colons', "ü 🌊"]
    assert story.seed == 2**64 - 1
    assert GenerationSettings(geometry=geometry).with_overrides(story.settings) == settings  # every setting
    with pytest.raises(AssertionError):
        read_back(path, settings.geometry, 1002, [0, 1, 1001])


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
