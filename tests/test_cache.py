"""KVMemory and TextCache on tiny buffers whose keys encode their absolute frame (spec §6, §7, §8, §9).

A key token of latent frame f in layer l holds the constant f + 1 + 100 * l (its value
token the negative), so reading a buffer back gives the list of frames it holds. Frames
re-encoded by a re-cache are written with an offset of RE and read back as RE + f; noisy
(denoising-pass) keys with NOISY + f. Expected layouts are written out by hand from the spec.
"""

from __future__ import annotations

import torch

from memflow_cli.model.cache import KVMemory, TextCache
from memflow_cli.settings import MemorySettings, TransformerConfig

CONFIG = TransformerConfig(dim=8, num_heads=2, num_layers=2, text_len=3)  # head dim 4
P = 2  # tokens per latent frame
RE = 50  # label offset of re-encoded frames
NOISY = 500  # label offset of keys written by a denoising (non-committing) pass


def settings(window=4, sink=1, bank_size=2, record_interval=1, mode="nam") -> MemorySettings:
    return MemorySettings(mode=mode, window=window, sink=sink, bank_size=bank_size, record_interval=record_interval)


def make_memory(frames_per_chunk: int = 1, interactive: bool = False, **kwargs) -> KVMemory:
    return KVMemory(CONFIG, settings(**kwargs), P, frames_per_chunk, 1, "cpu", torch.float32, interactive=interactive)


def make_text(fill: float | list[float] = 0.0) -> TextCache:
    """A text cache whose keys are constant per layer (fill[l]); values are irrelevant to the bank."""
    text = TextCache(CONFIG, 1, "cpu", torch.float32)
    fills = fill if isinstance(fill, list) else [fill] * CONFIG.num_layers
    for layer, value in enumerate(fills):
        text.k[layer] = value
    text.valid = True
    return text


def kv_for(first: int, frames: int, layer: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [1, H, frames * P, D] of frames first.. in `layer`."""
    labels = torch.arange(first, first + frames).repeat_interleave(P) + offset + 1 + 100 * layer
    k = labels.float()[None, None, :, None].expand(1, CONFIG.num_heads, -1, CONFIG.head_dim).clone()
    return k, -k


def frames_of(t: torch.Tensor, layer: int = 0, values: bool = False) -> list[int | None]:
    """Frame labels of a [B, H, N, D] buffer (None: an all-zero, never written frame)."""
    t = -t if values else t
    labels = []
    for block in t.split(P, dim=2):
        first = block.flatten()[0].item()
        assert torch.all(block == first), "a frame slot holds mixed content"
        labels.append(None if first == 0 else int(first) - 1 - 100 * layer)
    return labels


def cache_frames(memory: KVMemory, layer: int = 0, values: bool = False) -> list[int | None]:
    return frames_of(memory.kv[int(values), layer, :, :, : memory.cache_tokens], layer, values)


def bank_frames(memory: KVMemory, layer: int = 0, values: bool = False) -> list[int | None]:
    return frames_of(memory.kv[int(values), layer, :, :, memory.cache_tokens :], layer, values)


def write_all(memory: KVMemory, plan, first: int, frames: int, offset: int = 0) -> None:
    for layer in range(CONFIG.num_layers):
        memory.write(layer, plan, *kv_for(first, frames, layer, offset))


def run_chunk(memory: KVMemory, text: TextCache, chunk: int, frames: int, *, stage: bool = True, pre_update=True):
    """One chunk as the generator runs it: roll, bank pre-update, a denoising pass, the cache-writing pass."""
    plan = memory.plan(chunk * frames * P, frames * P)
    memory.begin(plan)
    if pre_update:
        memory.bank_pre_update(text)
    write_all(memory, plan, chunk * frames, frames, NOISY)
    write_all(memory, plan, chunk * frames, frames)
    memory.commit(plan, stage=stage)
    return plan


# -- the local cache ---------------------------------------------------------------------------------


def test_buffers_are_laid_out_cache_then_bank():
    memory = make_memory(window=4, sink=1, bank_size=2)
    assert memory.cache_tokens == 8 and memory.sink_tokens == 2 and memory.bank_slots == 2
    assert memory.kv.shape == (2, 2, 1, 2, 8 + 4, 4)
    assert memory.staged.shape == (2, 2, 1, 2, 2, 4)
    assert (memory.local_end, memory.global_end, memory.recorded) == (0, 0, 0)
    no_bank = make_memory(mode="sink")
    assert no_bank.kv.shape == (2, 2, 1, 2, 8, 4)


def test_eviction_keeps_sink_and_drops_oldest_frames():
    memory = make_memory(frames_per_chunk=2, window=4, sink=1)
    text = make_text()
    expected = [  # cache frames after each 2-frame chunk, local_end, global_end
        ([0, 1, None, None], 4, 4),
        ([0, 1, 2, 3], 8, 8),
        ([0, 3, 4, 5], 8, 12),  # frames 1, 2 evicted, 3 rolled next to the sink
        ([0, 5, 6, 7], 8, 16),
        ([0, 7, 8, 9], 8, 20),
    ]
    for chunk, (frames, local_end, global_end) in enumerate(expected):
        plan = run_chunk(memory, text, chunk, 2)
        if chunk >= 2:
            assert (plan.evict, plan.rolled) == (4, 2)
        for layer in (0, 1):
            assert cache_frames(memory, layer) == frames, f"chunk {chunk} layer {layer} keys"
            assert cache_frames(memory, layer, values=True) == frames, f"chunk {chunk} layer {layer} values"
        assert (memory.local_end, memory.global_end) == (local_end, global_end)


def test_eviction_with_one_frame_chunks():
    memory = make_memory(window=4, sink=1)
    text = make_text()
    for chunk in range(6):
        run_chunk(memory, text, chunk, 1)
    assert cache_frames(memory) == [0, 3, 4, 5]


def test_attention_kv_sink_local_and_bank_view():
    # 1-frame chunks, R = 1, C = 2: views per chunk are 0, 1, 2, 2 (§7.5: n - 1 on recording chunks)
    memory = make_memory(window=4, sink=1, bank_size=2, record_interval=1)
    text = make_text(0.0)
    expected = [  # (bank view, attended frames: sink + local, then bank)
        (0, [0]),
        (1, [0, 1, 0]),  # frame 0 in the sink and in slot 0 (§7.8.2), end < capacity: cache + bank concatenated
        (2, [0, 1, 2, 0, 1]),
        (2, [0, 1, 2, 3, 0, 2]),  # pre-update compressed [f0, f1] + f2 with zero text: keeps slot 0
        (2, [0, 2, 3, 4, 0, 3]),  # cache full and rolled: one contiguous slice
    ]
    for chunk, (view, frames) in enumerate(expected):
        plan = memory.plan(chunk * P, P)
        memory.begin(plan)
        memory.bank_pre_update(text)
        write_all(memory, plan, chunk, 1)
        k, v = memory.attention_kv(0, plan, view)
        assert frames_of(k) == frames, f"chunk {chunk}"
        assert frames_of(v, values=True) == frames
        k1, _ = memory.attention_kv(1, plan, view)
        assert frames_of(k1, layer=1) == frames
        memory.commit(plan, stage=True)


def test_attention_kv_without_bank_view_is_the_cache_prefix():
    memory = make_memory(frames_per_chunk=2, window=4, sink=1)
    text = make_text()
    run_chunk(memory, text, 0, 2)
    run_chunk(memory, text, 1, 2)
    plan = memory.plan(8, 4)
    memory.begin(plan)
    write_all(memory, plan, 4, 2)
    k, v = memory.attention_kv(0, plan, 0)
    assert frames_of(k) == [0, 3, 4, 5]
    assert k.shape == (1, 2, 8, 4)


def test_non_committing_pass_leaves_indices_unchanged():
    memory = make_memory(frames_per_chunk=2, window=4, sink=1)
    text = make_text()
    run_chunk(memory, text, 0, 2)
    run_chunk(memory, text, 1, 2)
    assert (memory.local_end, memory.global_end, memory.recorded) == (8, 8, 2)
    plan = memory.plan(8, 4)
    memory.begin(plan)
    for _ in range(4):  # four denoising passes share one plan and move nothing
        write_all(memory, plan, 4, 2, NOISY)
        assert (memory.local_end, memory.global_end, memory.recorded) == (8, 8, 2)
        assert memory.plan(8, 4) == plan
    k, _ = memory.attention_kv(0, plan, 0)
    assert frames_of(k) == [0, 3, NOISY + 4, NOISY + 5]  # the pass sees its own (noisy) keys
    write_all(memory, plan, 4, 2)
    memory.commit(plan, stage=False)
    assert (memory.local_end, memory.global_end, memory.recorded) == (8, 12, 2)
    assert cache_frames(memory) == [0, 3, 4, 5]


# -- the re-cache (§9) -------------------------------------------------------------------------------


def test_recache_after_window_protects_sink():
    memory = make_memory(frames_per_chunk=2, window=4, sink=1)
    text = make_text()
    for chunk in range(3):  # frames 0..5
        run_chunk(memory, text, chunk, 2)
    assert cache_frames(memory) == [0, 3, 4, 5]
    # switch at s = 6 frames: re-encode r = min(4, 6) = 4 frames 2..5 from token 4
    plan = memory.plan(4, 8)
    assert plan.is_recompute is True
    assert (plan.write_start, plan.write_offset, plan.end, plan.evict) == (2, 2, 8, 0)
    memory.begin(plan)
    write_all(memory, plan, 2, 4, RE)
    k, _ = memory.attention_kv(0, plan, 0)
    assert frames_of(k) == [0, RE + 3, RE + 4, RE + 5]  # frame 2 re-encoded but written nowhere
    memory.commit(plan, stage=False)
    assert cache_frames(memory) == [0, RE + 3, RE + 4, RE + 5]
    assert cache_frames(memory, 1, values=True) == [0, RE + 3, RE + 4, RE + 5]
    assert (memory.local_end, memory.global_end) == (8, 12)
    # the next chunk rolls on from there
    run_chunk(memory, text, 3, 2)
    assert cache_frames(memory) == [0, RE + 5, 6, 7]


def test_recache_from_start_rewrites_sink():
    memory = make_memory(frames_per_chunk=2, window=4, sink=1)
    text = make_text()
    for chunk in range(2):  # frames 0..3
        run_chunk(memory, text, chunk, 2)
    # switch at s = 4 <= W: r = 4, start 0 -> not a recompute, the sink is rewritten
    plan = memory.plan(0, 8)
    assert plan.is_recompute is False
    assert (plan.write_start, plan.write_offset, plan.end) == (0, 0, 8)
    memory.begin(plan)
    write_all(memory, plan, 0, 4, RE)
    memory.commit(plan, stage=False)
    assert cache_frames(memory) == [RE + 0, RE + 1, RE + 2, RE + 3]
    assert (memory.local_end, memory.global_end) == (8, 8)


# -- the bank (§7) -------------------------------------------------------------------------------------


def test_staging_copies_first_frame_of_written_slice():
    memory = make_memory(frames_per_chunk=2, window=4, sink=1, bank_size=2)
    text = make_text()
    for chunk in range(3):  # chunk 2 writes frames 4, 5 at [4, 8) after the roll
        run_chunk(memory, text, chunk, 2)
    for layer in (0, 1):
        assert frames_of(memory.staged[0, layer], layer) == [4]
        assert frames_of(memory.staged[1, layer], layer, values=True) == [4]
    assert memory.recorded == 3  # m = chunk + 1 with R = 1
    # a recompute stages the first frame it writes, but does not move the count
    plan = memory.plan(4, 8)
    memory.begin(plan)
    write_all(memory, plan, 2, 4, RE)
    memory.commit(plan, stage=True)
    assert frames_of(memory.staged[0, 0]) == [RE + 3]
    assert memory.recorded == 3


def test_commit_without_staging_keeps_prototype_and_count():
    memory = make_memory(window=4, sink=1, bank_size=2, record_interval=2)
    text = make_text()
    run_chunk(memory, text, 0, 1, stage=True)
    assert memory.recorded == 1
    run_chunk(memory, text, 1, 1, stage=False)
    assert memory.recorded == 1
    assert frames_of(memory.staged[0, 0]) == [0]


def test_single_prompt_bank_trace():
    # miniature of trace §7.6: 1-frame chunks, R = 2, C = 2, staging on every chunk
    memory = make_memory(window=4, sink=1, bank_size=2, record_interval=2)
    text = make_text([1.0, -1.0])  # layer 0 favours late frames, layer 1 early ones
    expected = [  # (bank after the pre-update of chunk j, recorded after chunk j)
        ([None, None], 1),
        ([0, None], 1),
        ([1, None], 2),  # slot 0 slides to the newest prototype
        ([1, 2], 2),
        ([1, 3], 3),
    ]
    for chunk, (bank, recorded) in enumerate(expected):
        plan = memory.plan(chunk * P, P)
        memory.begin(plan)
        memory.bank_pre_update(text)
        assert bank_frames(memory, 0) == bank, f"chunk {chunk}"
        assert bank_frames(memory, 1, values=True) == bank
        write_all(memory, plan, chunk, 1)
        memory.commit(plan, stage=True)
        assert memory.recorded == recorded
    # chunk 5: M = 3 > C: compress [f1, f3] + f4, keeping the top C - 1 = 1 slot per layer by its own text keys
    memory.bank_pre_update(text)
    assert bank_frames(memory, 0) == [3, 4]
    assert bank_frames(memory, 0, values=True) == [3, 4]
    assert bank_frames(memory, 1) == [1, 4]
    assert bank_frames(memory, 1, values=True) == [1, 4]


def test_interactive_bank_trace_duplicates():
    # miniature of trace §7.7: R = 2, C = 2, staging only on chunks j % R == 0; text favours late frames
    memory = make_memory(window=4, sink=1, bank_size=2, record_interval=2)
    text = make_text(1.0)
    expected = [[None, None], [0, None], [0, None], [0, 2], [0, 2], [2, 4], [4, 4], [4, 6]]
    for chunk, bank in enumerate(expected):
        plan = memory.plan(chunk * P, P)
        memory.begin(plan)
        memory.bank_pre_update(text)
        # chunk 6 re-compresses with the same f4: it outranks f2 and is duplicated; chunk 7's tie keeps slot 0
        assert bank_frames(memory) == bank, f"chunk {chunk}"
        write_all(memory, plan, chunk, 1)
        memory.commit(plan, stage=chunk % 2 == 0)


# -- the policy: what a chunk attends to, when it records, what a switch re-caches ----------------------------


def test_the_policy_replays_the_interactive_trace():
    """begin_chunk / end_chunk decide the roll, the bank update and the recording of trace §7.7 themselves."""
    memory = make_memory(window=4, sink=1, bank_size=2, record_interval=2, interactive=True)
    text = make_text(1.0)
    expected = [  # (bank after begin_chunk, bank view of the chunk's passes)
        ([None, None], 0), ([0, None], 1), ([0, None], 1), ([0, 2], 2),
        ([0, 2], 2), ([2, 4], 2), ([4, 4], 2), ([4, 6], 2),
    ]  # fmt: skip
    for chunk, (bank, view) in enumerate(expected):
        passes = memory.begin_chunk(chunk, text)
        assert (bank_frames(memory), passes.bank_view) == (bank, view), f"chunk {chunk}"
        assert (passes.first_frame, passes.frames) == (chunk, 1)
        write_all(memory, passes.plan, chunk, 1)
        memory.end_chunk(passes, chunk)
        assert memory.records(chunk) == (chunk % 2 == 0)


def test_one_prompt_records_every_chunk():
    memory = make_memory(window=4, sink=1, bank_size=2, record_interval=2)
    assert [memory.records(chunk) for chunk in range(4)] == [True, True, True, True]


def test_the_bank_is_not_attended_without_a_sink_and_sma_needs_one():
    no_sink = KVMemory(
        CONFIG, MemorySettings(window=4, sink=0, bank_size=2, record_interval=1, sma=True), P, 1, 1, "cpu",
        torch.float32,
    )  # fmt: skip
    assert [no_sink.bank_view(chunk) for chunk in range(4)] == [0, 0, 0, 0]
    assert no_sink.sma_top_k is None
    with_sink = KVMemory(
        CONFIG, MemorySettings(window=4, sink=1, bank_size=2, record_interval=1, sma=True, sma_top_k=2), P, 1, 1,
        "cpu", torch.float32,
    )  # fmt: skip
    assert [with_sink.bank_view(chunk) for chunk in range(4)] == [0, 1, 2, 2]
    assert with_sink.sma_top_k == 2


def test_a_switch_re_caches_the_last_window_of_frames():
    memory = make_memory(frames_per_chunk=2, window=4, sink=1)
    text = make_text()
    assert memory.begin_recache(0, text) is None  # a switch at the very start re-encodes nothing
    for chunk in range(3):  # frames 0..5
        passes = memory.begin_chunk(chunk, text)
        write_all(memory, passes.plan, chunk * 2, 2)
        memory.end_chunk(passes, chunk)
    passes = memory.begin_recache(3, text)  # before chunk 3: the 4 frames 2..5
    assert (passes.first_frame, passes.frames, passes.plan.is_recompute) == (2, 4, True)
    write_all(memory, passes.plan, 2, 4, RE)
    memory.end_recache(passes)
    assert cache_frames(memory) == [0, RE + 3, RE + 4, RE + 5]
    assert memory.recorded == 3  # a re-cache records nothing


def _full_bank_of_three(text: TextCache) -> KVMemory:
    """C = 3, R = 1, 1-frame chunks 0..3: bank [f0, f1, f2], prototype f3 staged, M = 4."""
    memory = make_memory(window=4, sink=1, bank_size=3, record_interval=1)
    for chunk in range(4):
        run_chunk(memory, text, chunk, 1)
    assert bank_frames(memory) == [0, 1, 2]
    assert memory.recorded == 4
    return memory


def test_compression_with_zero_text_keys_follows_tie_rule():
    text = make_text(1.0)
    memory = _full_bank_of_three(text)
    text.reset()
    memory.bank_pre_update(text)  # all scores 0: keep [1, 0]
    assert bank_frames(memory) == [1, 0, 3]
    assert bank_frames(memory, 1, values=True) == [1, 0, 3]
    memory.bank_pre_update(text)  # a second zero-query compression swaps back
    assert bank_frames(memory) == [0, 1, 3]
    assert bank_frames(memory, 1) == [0, 1, 3]


def test_compression_keeps_score_order_and_appends_prototype_last():
    text = make_text(1.0)
    memory = _full_bank_of_three(text)
    memory.bank_pre_update(text)  # scores rise with the frame: keep f2 then f1, prototype f3 last
    assert bank_frames(memory) == [2, 1, 3]
    assert bank_frames(memory, 0, values=True) == [2, 1, 3]
    text = make_text(-1.0)
    memory.bank_pre_update(text)  # [f2, f1, f3] now favours the earliest: f1 then f2
    assert bank_frames(memory) == [1, 2, 3]


def test_no_pre_update_before_first_recording_or_without_bank():
    memory = make_memory(window=4, sink=1, bank_size=2)
    memory.bank_pre_update(make_text(1.0))
    assert bank_frames(memory) == [None, None]
    no_bank = make_memory(mode="sink")
    text = make_text(1.0)
    for chunk in range(3):
        run_chunk(no_bank, text, chunk, 1)
    assert no_bank.recorded == 0
    assert no_bank.kv.shape[-2] == 8
    assert cache_frames(no_bank) == [0, 1, 2, None]


# -- SMA (§8) ---------------------------------------------------------------------------------------------


def test_sparse_attention_kv_per_head_selection():
    text = make_text(1.0)
    memory = make_memory(window=4, sink=1, bank_size=3, record_interval=1)
    for chunk in range(3):
        run_chunk(memory, text, chunk, 1)
    plan = memory.plan(3 * P, P)
    memory.begin(plan)
    memory.bank_pre_update(text)  # bank [f0, f1, f2]
    write_all(memory, plan, 3, 1)
    dense, _ = memory.attention_kv(0, plan, 3)
    assert frames_of(dense) == [0, 1, 2, 3, 0, 1, 2]
    # pool = [sink f0, bank f0, f1, f2]; head 0 queries +1 (late frames win), head 1 queries -1 (early ones win)
    queries = torch.ones(1, 2, P, 4)
    queries[:, 1] = -1.0
    k, v = memory.sparse_attention_kv(0, plan, 3, queries, 2)
    assert k.shape == (1, 2, 5 * P, 4)
    assert frames_of(k[:, :1]) == [1, 2, 1, 2, 3]  # pool frames 2, 3 in ascending order, then the local window
    assert frames_of(k[:, 1:]) == [0, 0, 1, 2, 3]  # pool frames 0, 1 (both f0)
    assert frames_of(v[:, :1], values=True) == [1, 2, 1, 2, 3]
    assert frames_of(v[:, 1:], values=True) == [0, 0, 1, 2, 3]
    # k covering the pool keeps it whole: the plain key set (attention does not depend on key order)
    k, _ = memory.sparse_attention_kv(0, plan, 3, queries, 4)
    assert sorted(frames_of(k)) == [0, 0, 1, 1, 2, 2, 3]


# -- the text cache ----------------------------------------------------------------------------------------


def test_text_cache_reset_zeroes_keys_and_values():
    text = TextCache(CONFIG, 2, "cpu", torch.float32)
    assert text.k.shape == (2, 2, 2, 3, 4)  # [L, B, H, T, D]
    assert not text.valid and not text.k.any()
    text.k.fill_(3.0)
    text.v.fill_(-2.0)
    text.valid = True
    text.reset()
    assert not text.valid
    assert torch.equal(text.k, torch.zeros_like(text.k))
    assert torch.equal(text.v, torch.zeros_like(text.v))


# -- known divergence --------------------------------------------------------------------------------------


def test_sink_longer_than_first_chunk_is_attended_whole():
    memory = make_memory(window=4, sink=2, bank_size=2)
    plan = memory.plan(0, P)  # chunk 0, one frame: end = 2 < sink = 4
    memory.begin(plan)
    write_all(memory, plan, 0, 1)
    k, _ = memory.attention_kv(0, plan, 0)
    assert frames_of(k) == [0, None]  # sink = [f0, unwritten zeros], local window empty
