"""Snapshots at segment boundaries (`snapshots.py`): a stream started from one equals the tail of a stream
from the start, bit for bit, for latents and decoded frames; and the file round trip keeps that."""

from __future__ import annotations

import copy
import json
import os
import struct
from dataclasses import replace

import pytest
import torch

from memflow_cli.decoders import DecoderChoice, DecoderRequest
from memflow_cli.engine import Video, load_engine
from memflow_cli.settings import GenerationSettings, MemorySettings
from memflow_cli.snapshots import (
    Snapshot,
    SnapshotError,
    load_snapshot,
    read_metadata,
    save_snapshot,
    snapshot_files,
    snapshot_path,
)

from .test_update import PROMPTS  # the same five-segment fox story


@pytest.fixture(scope="module")
def engine():
    with load_engine("demo", "cpu") as engine:
        engine.encode(PROMPTS)
        yield engine


def _video(engine, prompts: int, switch_chunks: tuple[int, ...], chunks: int) -> Video:
    return Video(engine.embeddings(PROMPTS[:prompts]), chunks=chunks, switch_chunks=switch_chunks)


def _streamed(engine, video, settings, seed, **options):
    """(every chunk, every resume point handed out) of one stream."""
    points = []
    chunks = list(engine.stream(video, settings, seed=seed, snapshots=points.append, **options))
    return chunks, points


@pytest.fixture(scope="module")
def _fox_from_start(engine):
    """The three-segment fox story of 6 chunks (switches at chunks 2 and 4), seed 3, decoded: streamed once for
    the tests below that resume it."""
    video = _video(engine, 3, (2, 4), 6)
    return video, _streamed(engine, video, GenerationSettings(geometry=engine.geometry), 3)


@pytest.fixture
def fox(_fox_from_start):
    """(video, every chunk, every resume point) of the fox story from the start; the points are each test's own
    copies (a test may change them), the chunks are only read."""
    video, (full, points) = _fox_from_start
    return video, full, copy.deepcopy(points)


def _assert_same_stream(resumed, full) -> None:
    """Every chunk, the kept ones (decoded again) and the generated ones, as the stream from the start made it."""
    assert [c.index for c in resumed] == [c.index for c in full]
    for a, b in zip(resumed, full, strict=True):
        assert a.segment == b.segment
        assert torch.equal(a.latents, b.latents), f"latents of chunk {a.index}"
        if b.frames is not None:
            assert torch.equal(a.frames, b.frames), f"frames of chunk {a.index}"


@pytest.mark.parametrize(
    ("prompts", "switches", "chunks"),
    [(3, (2, 4), 6), (5, (2, 5, 7, 9), 11)],  # early switches (inside the window), late ones, a compressing bank
    ids=["3-segments", "5-segments"],
)
def test_a_stream_from_each_boundary_is_the_stream_from_the_start(engine, prompts, switches, chunks):
    settings = GenerationSettings(geometry=engine.geometry)
    video = _video(engine, prompts, switches, chunks)
    full, points = _streamed(engine, video, settings, 5, decode=False)
    assert [p.chunk for p in points] == [*switches, chunks]  # one at each switch and one at the end
    assert [p.latents.shape[1] for p in points] == [3 * c for c in (*switches, chunks)]
    for point in points[:-1]:
        resumed = list(engine.stream(video, settings, seed=5, decode=False, resume=point))
        _assert_same_stream(resumed, full)


def test_latents_only_and_sparse_memory_resume_exactly(engine):
    memory = MemorySettings(sma=True, sma_top_k=2, bank_size=2, record_interval=1)
    settings = GenerationSettings(geometry=engine.geometry, memory=memory)
    video = _video(engine, 3, (5, 7), 9)
    full, points = _streamed(engine, video, settings, 1, decode=False)
    point = points[1]
    assert point.latents.shape == (1, 7 * 3, 16, 8, 12)
    _assert_same_stream(list(engine.stream(video, settings, seed=1, decode=False, resume=point)), full)


def test_the_edited_story_continues_from_the_old_storys_snapshot_as_a_fresh_render_does(engine):
    settings = GenerationSettings(geometry=engine.geometry)
    old = _video(engine, 3, (2, 4), 6)
    edited = Video(engine.embeddings((PROMPTS[0], PROMPTS[1], PROMPTS[4])), chunks=7, switch_chunks=(2, 4))
    point = _streamed(engine, old, settings, 2, decode=False)[1][1]
    assert point.chunk == 4
    fresh = list(engine.stream(edited, settings, seed=2, decode=False))
    _assert_same_stream(list(engine.stream(edited, settings, seed=2, decode=False, resume=point)), fresh)


def test_the_point_at_the_end_continues_a_story_with_a_segment_appended(engine):
    settings = GenerationSettings(geometry=engine.geometry)
    old = _video(engine, 3, (2, 4), 6)
    longer = _video(engine, 4, (2, 4, 6), 8)
    end = _streamed(engine, old, settings, 4, decode=False)[1][-1]
    assert end.chunk == 6
    fresh = list(engine.stream(longer, settings, seed=4, decode=False))
    _assert_same_stream(list(engine.stream(longer, settings, seed=4, decode=False, resume=end)), fresh)


def test_the_latents_kept_for_snapshots_are_bounded_and_no_snapshot_is_taken_past_the_bound(engine):
    settings = GenerationSettings(geometry=engine.geometry)
    video = _video(engine, 5, (2, 5, 7, 9), 11)
    full = list(engine.stream(video, settings, seed=6, decode=False))  # no snapshots asked
    chunk_bytes = full[0].latents.nbytes  # [1, 3, 16, 8, 12] in float32 for the demo model
    bounded, points = _streamed(engine, video, settings, 6, decode=False, kept_latents_bytes=5 * chunk_bytes)
    assert [p.chunk for p in points] == [2, 5]  # the switches at 7 and 9 and the end are past 5 chunks of latents
    _assert_same_stream(bounded, full)  # taking snapshots changes nothing in the video
    _assert_same_stream(list(engine.stream(video, settings, seed=6, decode=False, resume=points[-1])), full)


def test_a_snapshot_file_round_trip_resumes_exactly_to_the_decoded_frames(engine, fox, tmp_path):
    settings = GenerationSettings(geometry=engine.geometry)
    video, full, points = fox
    point = points[1]
    target = tmp_path / "fox.mp4"
    path = snapshot_path(target, 4)
    size = save_snapshot(path, Snapshot(point, video_frames=45, request="r", prefix="p"))
    assert path.name == ".fox.snap-c0004.safetensors" and size == path.stat().st_size
    # the demo model's snapshot is small: 45 frames of 64x96 (0.8 MB), its decoder's causal state (3.4 MB), latents
    assert size < 5 * 2**20
    assert snapshot_files(target) == {4: path} and snapshot_files(target, partial=True) == {}
    assert read_metadata(path)["video_frames"] == 45
    loaded = load_snapshot(path)
    assert (loaded.chunk, loaded.video_frames, loaded.request, loaded.prefix) == (4, 45, "r", "p")
    assert torch.equal(loaded.point.frames, torch.cat([c.frames for c in full[:4]]))
    assert len(loaded.point.decoder) == len(point.decoder) > 0
    assert all(torch.equal(a, b) for a, b in zip(loaded.point.decoder, point.decoder, strict=True))
    _assert_same_stream(list(engine.stream(video, settings, seed=3, resume=loaded.point)), full)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_a_point_with_frames_writes_them_as_kept_and_decodes_only_the_new_chunks(engine, fox):
    settings = GenerationSettings(geometry=engine.geometry)
    video, full, points = fox
    point = points[1]
    assert point.chunk == 4 and torch.equal(point.frames, torch.cat([c.frames for c in full[:4]]))
    # frames that no decoder makes: a stream that yields them did not decode the kept chunks
    marked = replace(point, frames=torch.full_like(point.frames, 7))
    resumed = list(engine.stream(video, settings, seed=3, resume=marked))
    assert all(torch.equal(c.frames, torch.full_like(c.frames, 7)) for c in resumed[:4])
    assert [c.frames.shape[0] for c in resumed[:4]] == [c.frames.shape[0] for c in full[:4]]
    _assert_same_stream(resumed[4:], full[4:])  # the decoder went on from the kept causal state


def test_a_stream_resumed_from_frames_hands_out_the_later_points_a_stream_from_the_start_does(engine, fox):
    settings = GenerationSettings(geometry=engine.geometry)
    video, full, points = fox
    resumed, later = _streamed(engine, video, settings, 3, resume=points[0])
    _assert_same_stream(resumed, full)
    assert [p.chunk for p in later] == [2, 4, 6]
    for a, b in zip(later, points, strict=True):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.frames, b.frames)
        assert all(torch.equal(x, y) for x, y in zip(a.decoder, b.decoder, strict=True)) and a.decoder


def test_a_point_without_frames_or_with_another_decoders_state_decodes_its_latents_again(engine, fox):
    settings = GenerationSettings(geometry=engine.geometry)
    video, full, points = fox
    point = points[1]
    cropped = tuple(history[..., :-1, :] for history in point.decoder)  # another frame size: would go on from zeros
    for odd in (replace(point, frames=None, decoder=()), replace(point, decoder=point.decoder[1:]),
                replace(point, decoder=cropped), replace(point, frames=point.frames.float())):  # fmt: skip
        _assert_same_stream(list(engine.stream(video, settings, seed=3, resume=odd)), full)


def test_the_preview_decoder_keeps_no_frames_and_decodes_the_kept_latents_of_any_point_again(engine, fox):
    settings = GenerationSettings(geometry=engine.geometry)
    video, _, (_, wan_point, _) = fox
    with load_engine("demo", "cpu", decoder=DecoderRequest(DecoderChoice.TAE)) as tae:
        tae.encode(PROMPTS[:3])
        full, points = _streamed(tae, video, settings, 3)
        assert [p.frames for p in points] == [None, None, None] and all(p.decoder == () for p in points)
        resumed = list(tae.stream(video, settings, seed=3, resume=wan_point))  # the VAE's frames are not TAEHV's
    _assert_same_stream(resumed, full)


def test_the_frames_kept_for_snapshots_are_bounded_and_the_later_points_keep_latents_only(engine, fox):
    settings = GenerationSettings(geometry=engine.geometry)
    video, full, points = fox
    state_bytes = sum(t.nbytes for t in points[0].decoder)
    bound = state_bytes + sum(c.frames.nbytes for c in full[:3])  # the frames of 3 chunks and the state
    bounded, limited = _streamed(engine, video, settings, 3, kept_frames_bytes=bound)
    _assert_same_stream(bounded, full)
    assert [p.frames is not None for p in limited] == [True, False, False]
    assert [len(p.decoder) > 0 for p in limited] == [True, False, False]
    for point in limited:  # each resumes to the same video, the later ones by decoding their latents again
        _assert_same_stream(list(engine.stream(video, settings, seed=3, resume=point)), full)


def test_the_frames_of_all_the_points_together_are_bounded_not_each_points(engine, fox):
    settings = GenerationSettings(geometry=engine.geometry)
    video, full, points = fox
    state_bytes = sum(t.nbytes for t in points[0].decoder)
    bound = 2 * state_bytes + sum(c.frames.nbytes for c in full[:6])  # each point alone fits, not all three
    bounded, limited = _streamed(engine, video, settings, 3, kept_frames_bytes=bound)
    _assert_same_stream(bounded, full)
    assert [p.frames is not None for p in limited] == [True, True, False]
    held = sum(p.frames.nbytes + sum(t.nbytes for t in p.decoder) for p in limited if p.frames is not None)
    assert held <= bound
    _assert_same_stream(list(engine.stream(video, settings, seed=3, resume=limited[2])), full)


def test_a_stream_refuses_to_resume_where_the_prompt_does_not_switch(engine):
    settings = GenerationSettings(geometry=engine.geometry)
    video = _video(engine, 3, (2, 4), 6)
    point = _streamed(engine, video, settings, 0, decode=False)[1][0]
    assert point.chunk == 2
    later_switch = _video(engine, 2, (4,), 6)  # chunk 2 is still the first prompt's
    with pytest.raises(ValueError, match="resumes only where the prompt switches"):
        list(engine.stream(later_switch, settings, seed=0, decode=False, resume=point))


def test_a_file_that_is_not_a_snapshot_is_refused_in_one_line(tmp_path):
    path = tmp_path / ".x.snap-c0002.safetensors"
    path.write_bytes(b"not a snapshot")
    with pytest.raises(SnapshotError, match="not a readable snapshot"):
        read_metadata(path)


def test_a_snapshot_without_the_metadata_a_render_reads_is_refused_in_one_line(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / ".x.snap-c0002.safetensors"
    save_file({"noise": torch.zeros(2)}, path, metadata={"memflow_snapshot": '{"format": 1, "chunk": 2}'})
    with pytest.raises(SnapshotError, match=r"is not a whole memflow snapshot \(no segment, video_frames, request, "
                                            r"prefix, memory\)"):  # fmt: skip
        read_metadata(path)


@pytest.mark.parametrize("kind", ["fifo", "folder", "nested"])
def test_what_is_no_snapshot_at_a_snapshots_place_is_refused_at_once(tmp_path, kind):
    path = tmp_path / ".v.snap-c0003.safetensors"
    if kind == "fifo":
        os.mkfifo(path)  # a read would wait for a writer forever
    elif kind == "folder":
        path.mkdir()
    else:
        header = json.dumps({"__metadata__": {"memflow_snapshot": "[" * 100_000 + "]" * 100_000}}).encode()
        path.write_bytes(struct.pack("<Q", len(header)) + header)
    said = {"fifo": "not a regular file", "folder": "not a regular file", "nested": "nests too deep"}[kind]
    with pytest.raises(SnapshotError, match=said):
        read_metadata(path)
