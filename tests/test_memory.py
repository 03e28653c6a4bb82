"""Pure memory arithmetic against hand-computed cases from the spec (§6 KV cache, §7 bank, §8 SMA, §5.2 switches).

Every expected number below is written out literally, derived by hand from
MEMFLOW_INFERENCE_SPEC.md, never recomputed with the functions under test.
"""

from __future__ import annotations

import pytest
import torch

from memflow_cli.model.memory import (
    bank_view_frames,
    compressed_bank_order,
    nam_scores,
    plan_cache_pass,
    recorded_frames,
    select_top,
    select_top_ascending,
    sma_frame_selection,
)
from memflow_cli.settings import MemorySettings

from .parity import switch_chunks_from_frames

# shipped sizes: P = 1560 tokens per frame, W = 12, S = 3, chunks of 3 frames
P = 1560
CAPACITY = 18720
SINK = 4680
CHUNK = 4680


# -- §6.2 / §6.5: the cache index arithmetic ----------------------------------------------------------


def test_plan_chunks_0_to_6_match_spec_6_5():
    # (end, write_start, evict, rolled, global_end) per chunk, committed in order
    expected = [
        (4680, 0, 0, 0, 4680),  # chunk 0 writes frames 0-2 into the sink region [0, 4680)
        (9360, 4680, 0, 0, 9360),
        (14040, 9360, 0, 0, 14040),
        (18720, 14040, 0, 0, 18720),  # the cache is now full: sink + 9 frames
        (18720, 14040, 4680, 9360, 23400),  # chunk 4: frames 3-5 evicted, 6-11 rolled left, 12-14 written
        (18720, 14040, 4680, 9360, 28080),
        (18720, 14040, 4680, 9360, 32760),
    ]
    local_end = global_end = 0
    for chunk, (end, write_start, evict, rolled, new_global) in enumerate(expected):
        plan = plan_cache_pass(
            chunk * CHUNK, CHUNK, local_end=local_end, global_end=global_end, cache_tokens=CAPACITY, sink_tokens=SINK
        )
        assert plan.start == chunk * CHUNK
        assert plan.n_new == CHUNK
        assert (plan.end, plan.write_start, plan.evict, plan.rolled, plan.global_end) == (
            end,
            write_start,
            evict,
            rolled,
            new_global,
        ), f"chunk {chunk}"
        assert plan.write_offset == 0
        assert plan.write_len == 4680
        assert plan.is_recompute is False
        local_end, global_end = plan.end, plan.global_end  # the commit rule of §6.3


def test_plan_steady_state_recache_protects_sink():
    # switch at s = 18: re-encode frames 6..17, start 6*1560, after chunks 0..5 (global_end 28080)
    plan = plan_cache_pass(9360, 18720, local_end=18720, global_end=28080, cache_tokens=CAPACITY, sink_tokens=SINK)
    assert plan.is_recompute is True
    assert plan.evict == 0 and plan.rolled == 0
    assert plan.end == 18720
    assert plan.write_start == 4680  # max(local_start 0, sink 4680)
    assert plan.write_offset == 4680  # the first 3 re-encoded frames (6..8) are written nowhere
    assert plan.write_len == 14040  # frames 9..17
    assert plan.global_end == 28080  # unchanged


def test_plan_recache_at_15_protects_sink():
    # s = 15 > W: start (15 - 12) * 1560 = 4680 > 0, so it is a recompute
    plan = plan_cache_pass(4680, 18720, local_end=18720, global_end=23400, cache_tokens=CAPACITY, sink_tokens=SINK)
    assert plan.is_recompute is True
    assert (plan.end, plan.write_start, plan.write_offset, plan.evict) == (18720, 4680, 4680, 0)


def test_plan_early_recache_rewrites_from_zero():
    # switch at s = 9 (<= W): r = 9, start 0, after chunks 0..2 (local_end = global_end = 14040)
    plan = plan_cache_pass(0, 14040, local_end=14040, global_end=14040, cache_tokens=CAPACITY, sink_tokens=SINK)
    assert plan.is_recompute is False  # start == 0
    assert (plan.end, plan.write_start, plan.write_offset, plan.evict, plan.rolled) == (14040, 0, 0, 0, 0)
    assert plan.write_len == 14040  # the sink frames 0-2 are rewritten too
    assert plan.global_end == 14040


def test_plan_recache_at_12_rewrites_whole_cache():
    plan = plan_cache_pass(0, 18720, local_end=18720, global_end=18720, cache_tokens=CAPACITY, sink_tokens=SINK)
    assert (plan.is_recompute, plan.end, plan.write_start, plan.write_offset, plan.evict) == (False, 18720, 0, 0, 0)


def test_plan_without_sink_memory_none():
    memory = MemorySettings(mode="none")
    assert memory.sink_frames == 0
    assert memory.bank_frames == 0
    sink = memory.sink_frames * P
    # chunk 4: the roll keeps nothing at the head: 3 frames evicted, 9 rolled
    plan = plan_cache_pass(18720, CHUNK, local_end=18720, global_end=18720, cache_tokens=CAPACITY, sink_tokens=sink)
    assert (plan.end, plan.write_start, plan.evict, plan.rolled, plan.global_end) == (18720, 14040, 4680, 14040, 23400)
    # re-cache at s = 18: nothing is protected, all 12 frames are rewritten
    plan = plan_cache_pass(9360, 18720, local_end=18720, global_end=28080, cache_tokens=CAPACITY, sink_tokens=sink)
    assert (plan.is_recompute, plan.write_start, plan.write_offset, plan.write_len) == (True, 0, 0, 18720)


def test_plan_pass_larger_than_cache_is_an_error():
    with pytest.raises(ValueError, match="does not fit"):
        plan_cache_pass(0, 20000, local_end=0, global_end=0, cache_tokens=CAPACITY, sink_tokens=SINK)


# -- §7.2 / §7.5: bank schedule ---------------------------------------------------------------------------


def test_recorded_frames_r3_matches_trace_7_6():
    # M after chunk j (= recorded_frames(j + 1)): 1,1,1,2,2,2,3,3,3,4 for j = 0..9
    assert [recorded_frames(end, 3) for end in range(0, 11)] == [0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4]
    assert recorded_frames(40, 3) == 14  # m grows without bound


def test_recorded_frames_r1():
    assert [recorded_frames(end, 1) for end in range(0, 6)] == [0, 1, 2, 3, 4, 5]


def test_bank_view_r3_c3_matches_spec_6_5():
    views = [bank_view_frames(j, record_interval=3, bank_size=3) for j in range(11)]
    assert views == [0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    assert bank_view_frames(100, record_interval=3, bank_size=3) == 3


def test_bank_view_r1_c3():
    # every chunk records; its own slot is left out: n - 1 = j
    assert [bank_view_frames(j, record_interval=1, bank_size=3) for j in range(6)] == [0, 1, 2, 3, 3, 3]


def test_bank_view_r2_c3():
    assert [bank_view_frames(j, record_interval=2, bank_size=3) for j in range(8)] == [0, 1, 1, 2, 2, 3, 3, 3]


def test_bank_view_recache():
    # re-cache before chunk j: min(m(3j * 1560), C) with m = floor((j - 1) / R) + 1, no recording-chunk cut
    views = {j: bank_view_frames(j, record_interval=3, bank_size=3, recache=True) for j in (1, 2, 3, 4, 7, 14, 27)}
    assert views == {1: 1, 2: 1, 3: 1, 4: 2, 7: 3, 14: 3, 27: 3}
    assert bank_view_frames(4, record_interval=1, bank_size=3, recache=True) == 3
    assert bank_view_frames(2, record_interval=1, bank_size=3, recache=True) == 2


# -- §7.8.4: the topk tie rule --------------------------------------------------------------------------


def _top(values, k, dtype=torch.float32):
    return select_top(torch.tensor(values, dtype=dtype), k).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_top_spec_ties(dtype):
    assert _top([[0.0, 0.0, 0.0]], 2, dtype) == [[1, 0]]
    assert _top([[1.0, 0.5, 1.0]], 2, dtype) == [[2, 0]]
    assert _top([[0.5, 0.5, 1.0]], 2, dtype) == [[2, 0]]


def test_select_top_more_ties():
    assert _top([1.0, 2.0, 2.0, 2.0], 2) == [2, 1]  # lowest indices win the set, returned high index first
    assert _top([2.0, 2.0, 3.0, 2.0], 3) == [2, 1, 0]
    assert _top([0.0] * 6, 3) == [2, 1, 0]


def test_select_top_distinct_scores_descending():
    assert _top([0.1, 0.9, -3.0, 0.5, 0.7], 3) == [1, 4, 3]
    assert _top([0.1, 0.9, -3.0, 0.5, 0.7], 5) == [1, 4, 3, 0, 2]


def test_select_top_batch():
    assert _top([[0.0, 0.0, 0.0], [3.0, 1.0, 2.0], [1.0, 5.0, 1.0]], 2) == [[1, 0], [0, 2], [1, 0]]
    assert select_top(torch.zeros(2, 4, 3), 2).shape == (2, 4, 2)


def test_select_top_k0_and_errors():
    out = select_top(torch.tensor([[1.0, 2.0, 3.0]]), 0)
    assert out.shape == (1, 0)
    with pytest.raises(ValueError, match="cannot select 4 of 3"):
        select_top(torch.zeros(1, 3), 4)
    with pytest.raises(ValueError):
        select_top(torch.zeros(1, 3), -1)


def test_select_top_ascending():
    assert select_top_ascending(torch.zeros(6), 3).tolist() == [0, 1, 2]
    assert select_top_ascending(torch.tensor([0.1, 0.9, -3.0, 0.5, 0.7]), 3).tolist() == [1, 3, 4]
    assert select_top_ascending(torch.tensor([[1.0, 0.5, 1.0]]), 2).tolist() == [[0, 2]]
    assert select_top_ascending(torch.tensor([2.0, 1.0]), 0).shape == (0,)
    with pytest.raises(ValueError, match="cannot select 3 of 2"):
        select_top_ascending(torch.zeros(2), 3)


@pytest.mark.parametrize("n", [1, 3, 6])
def test_select_top_ascending_is_the_sorted_select_top_set(n):
    # scores from a few levels, so that ties (which decide by index) are common; [B, H, n] as SMA uses
    generator = torch.Generator().manual_seed(n)
    for dtype in (torch.float32, torch.bfloat16):
        scores = torch.randint(0, 3, (4, 5, n), generator=generator).to(dtype)
        for k in range(n + 1):
            expected = torch.sort(select_top(scores, k), dim=-1).values
            assert torch.equal(select_top_ascending(scores, k), expected), (dtype, k)


# -- §7.4: NAM scores and compression order ----------------------------------------------------------------


def test_nam_scores_single_head_exact():
    # H = 1, D = 4, P = 2, 3 frames, 2 text rows. mean text key = [.5, .5, 0, 0]
    text = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])[None, None]  # [1, 1, 2, 4]
    bank = torch.tensor(
        [
            [2.0, 0, 0, 0], [0, 2.0, 0, 0],  # frame 0: mean [1, 1, 0, 0] -> 1 / sqrt(4) = 0.5
            [4.0, 4.0, 0, 0], [0, 0, 0, 0],  # frame 1: mean [2, 2, 0, 0] -> 2 / 2 = 1.0
            [0, 0, 3.0, 0], [0, 0, -3.0, 8.0],  # frame 2: mean [0, 0, 0, 4] -> 0
        ]
    )[None, None]  # fmt: skip
    scores = nam_scores(text, bank, 3)
    assert scores.shape == (1, 3)
    assert scores.tolist() == [[0.5, 1.0, 0.0]]


def test_nam_scores_mean_over_heads():
    text = torch.zeros(1, 2, 2, 4)
    text[0, 0] = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    text[0, 1] = torch.tensor([[0, 0, 0, 2.0], [0, 0, 0, 2.0]])  # mean [0, 0, 0, 2]
    bank = torch.zeros(1, 2, 6, 4)
    bank[0, 0] = torch.tensor(
        [[2.0, 0, 0, 0], [0, 2.0, 0, 0], [4.0, 4.0, 0, 0], [0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, -3.0, 8.0]]
    )  # head 0 scores: 0.5, 1.0, 0.0
    bank[0, 1] = torch.tensor(
        [[0, 0, 0, 1.0], [0, 0, 0, 1.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, -1.0], [0, 0, 0, -3.0]]
    )  # head 1 scores: 2/2 = 1.0, 0.0, -4/2 = -2.0
    assert nam_scores(text, bank, 3).tolist() == [[0.75, 0.5, -1.0]]


def test_nam_scores_batch():
    text = torch.ones(2, 1, 3, 4)
    text[1] = -1.0
    bank = torch.zeros(2, 1, 4, 4)  # 2 frames of P = 2
    bank[:, :, 2:] = 1.0  # frame 1 all ones: score +-4 / 2
    assert nam_scores(text, bank, 2).tolist() == [[0.0, 2.0], [0.0, -2.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nam_scores_zero_text_keys_are_exact_zeros(dtype):
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(1, 3, 3 * 5, 8, generator=generator).to(dtype)
    scores = nam_scores(torch.zeros(1, 3, 7, 8, dtype=dtype), bank, 3)
    assert scores.shape == (1, 3)
    assert torch.equal(scores, torch.zeros(1, 3, dtype=dtype))
    # all-zero scores: the compression keeps slots [1, 0] (§7.8.4): bank [s0, s1, s2] -> [s1, s0, P]
    assert compressed_bank_order(scores).tolist() == [[1, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nam_scores_identical_frames_tie_exactly(dtype):
    generator = torch.Generator().manual_seed(1)
    frame = torch.randn(1, 2, 5, 8, generator=generator)
    other = torch.randn(1, 2, 5, 8, generator=generator)
    bank = torch.cat([frame, other, frame], dim=2).to(dtype)  # slots [f, g, f]
    text = torch.randn(1, 2, 7, 8, generator=generator).to(dtype)
    scores = nam_scores(text, bank, 3)
    assert scores[0, 0].item() == scores[0, 2].item()


def test_compressed_bank_order():
    assert compressed_bank_order(torch.tensor([[0.75, 0.5, -1.0]])).tolist() == [[0, 1]]
    assert compressed_bank_order(torch.tensor([[-1.0, 0.5, 0.75]])).tolist() == [[2, 1]]  # score order, not time
    assert compressed_bank_order(torch.tensor([[0.5, 0.5, 1.0]])).tolist() == [[2, 0]]
    assert compressed_bank_order(torch.tensor([[1.0, 0.5, 1.0]])).tolist() == [[2, 0]]
    assert compressed_bank_order(torch.tensor([[0.0, 0.0]])).tolist() == [[0]]  # C = 2: lowest index wins


# -- §8: SMA frame selection ---------------------------------------------------------------------------


def _sma_inputs():
    # B = 1, H = 2, D = 2, P = 1, 4 pool frames; head 0 mean query [1, 0], head 1 mean query [0, 1]
    queries = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]])  # [1, 2, 2, 2]
    frames = torch.tensor([[3.0, 0.0], [0.0, 3.0], [2.0, 2.0], [-1.0, 1.0]])
    pool = frames[None, None].expand(1, 2, 4, 2).clone()  # same keys for both heads
    # relevance: head 0 [3, 0, 2, -1]; head 1 [0, 3, 2, 1]
    return queries, pool


def test_sma_selection_per_head_ascending():
    queries, pool = _sma_inputs()
    assert sma_frame_selection(queries, pool, 4, 2).tolist() == [[[0, 2], [1, 2]]]
    assert sma_frame_selection(queries, pool, 4, 3).tolist() == [[[0, 1, 2], [1, 2, 3]]]


def test_sma_selection_keeps_all_when_k_covers_pool():
    queries, pool = _sma_inputs()
    assert sma_frame_selection(queries, pool, 4, 4).tolist() == [[[0, 1, 2, 3], [0, 1, 2, 3]]]
    assert sma_frame_selection(queries, pool, 4, 7).tolist() == [[[0, 1, 2, 3], [0, 1, 2, 3]]]


def test_sma_selection_frame_means_and_ties():
    # P = 2: frame mean decides; zero query ties everywhere -> lowest indices
    queries = torch.tensor([[[[1.0, 0.0]]]])  # [1, 1, 1, 2]
    pool = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [1.0, 0.0], [1.0, 0.0], [5.0, 0.0], [-1.0, 0.0]])[None, None]
    # frame means along dim 0: 0, 1, 2 -> top 2 = frames 1, 2
    assert sma_frame_selection(queries, pool, 3, 2).tolist() == [[[1, 2]]]
    assert sma_frame_selection(torch.zeros(1, 1, 3, 2), pool, 3, 2).tolist() == [[[0, 1]]]


# -- §5.2: switch frames to chunks --------------------------------------------------------------------


def test_switch_chunks_simple():
    assert switch_chunks_from_frames([9, 18], 3) == (3, 6)
    assert switch_chunks_from_frames([0], 3) == (0,)
    assert switch_chunks_from_frames([], 3) == ()


def test_switch_chunks_shipped():
    # 40 -> 42, 80 -> 81, 120 -> 120, 160 -> 162, 200 -> 201 (frames), i.e. chunks 14, 27, 40, 54, 67
    assert switch_chunks_from_frames([40, 80, 120, 160, 200], 3) == (14, 27, 40, 54, 67)


def test_switch_chunks_two_in_one_chunk_delay_the_second():
    assert switch_chunks_from_frames([4, 5], 3) == (2, 3)
    assert switch_chunks_from_frames([3, 4, 5], 3) == (1, 2, 3)
    assert switch_chunks_from_frames([1, 2, 3, 4], 3) == (1, 2, 3, 4)
    assert switch_chunks_from_frames([4, 5, 12], 3) == (2, 3, 4)
