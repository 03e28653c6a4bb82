"""Pure functions of MemFlow's memory: cache index arithmetic, bank schedule, NAM and SMA selection.

Everything here is a small function of integers or tensors, with no state, so it
can be unit-tested on hand-computed cases. Positions are counted in tokens
(`tokens_per_frame` per latent frame) unless a name says frames or chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CachePlan:
    """Where one pass writes into a layer's KV cache and what it attends to.

    The cache holds `cache_tokens` tokens: a sink of `sink_tokens` tokens at its head, then
    the most recent frames. A pass of `n_new` tokens starting at absolute token
    `start` first rolls the cache left by `evict` tokens when it would overflow,
    then writes its keys to `[write_start, end)` from `write_offset` on, and
    attends to `[0, end)` (sink and local window) plus the bank view.
    """

    start: int
    n_new: int
    end: int  # one past the last valid cache token during and after the pass
    write_start: int
    write_offset: int  # first token of the pass's keys that is written
    evict: int  # tokens dropped after the sink by the roll (0: no roll)
    rolled: int  # tokens moved left by the roll
    is_recompute: bool  # re-encoding frames already committed (prompt-switch re-cache)
    global_end: int  # absolute end after the pass

    @property
    def write_len(self) -> int:
        return self.end - self.write_start

    @property
    def layout(self) -> tuple[int, int, int, int]:
        """What a pass reads and writes in the buffer: passes with equal layouts do the same device work."""
        return (self.n_new, self.end, self.write_start, self.write_offset)


def plan_cache_pass(
    start: int, n_new: int, *, local_end: int, global_end: int, cache_tokens: int, sink_tokens: int
) -> CachePlan:
    """Index arithmetic of one pass over a rolling KV cache with a protected sink.

    `local_end` is the end of valid data in the buffer and `global_end` the
    absolute end of everything committed so far.
    """
    cur_end = start + n_new
    is_recompute = cur_end <= global_end and start > 0
    evict = rolled = 0
    if cur_end > global_end and n_new + local_end > cache_tokens:
        evict = n_new + local_end - cache_tokens
        rolled = local_end - evict - sink_tokens
        end = local_end + (cur_end - global_end) - evict
    else:
        end = local_end + max(cur_end - global_end, 0)
    local_start = end - n_new
    write_start = max(local_start, sink_tokens) if is_recompute else local_start
    if write_start < 0:
        raise ValueError(f"pass of {n_new} tokens at {start} does not fit a cache of {cache_tokens} tokens")
    return CachePlan(
        start=start,
        n_new=n_new,
        end=end,
        write_start=write_start,
        write_offset=write_start - local_start,
        evict=evict,
        rolled=rolled,
        is_recompute=is_recompute,
        global_end=max(global_end, cur_end),
    )


def recorded_frames(chunk_end: int, record_interval: int) -> int:
    """Bank frames recorded once the chunk ending at chunk index `chunk_end` (exclusive) is done.

    Chunk j records the (j // R + 1)-th frame; the count only grows.
    """
    return max((chunk_end - 1) // record_interval + 1, 0)


def bank_view_frames(chunk: int, *, record_interval: int, bank_size: int, recache: bool = False) -> int:
    """Bank slots attended by the passes of chunk `chunk` (or by the re-cache before it).

    A recording chunk leaves out the slot its own prototype will fill. The
    re-cache before chunk j sees the count recorded up to chunk j - 1.
    """
    if recache:
        return min(recorded_frames(chunk, record_interval), bank_size)
    recorded = recorded_frames(chunk + 1, record_interval)
    if chunk % record_interval == 0:
        recorded -= 1
    return min(recorded, bank_size)


def select_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores along the last dim, with an explicit tie rule.

    The set takes everything above the k-th largest value and, among entries
    equal to it, the lowest indices. The result is ordered by descending score
    and, among equal scores, by descending index: the order CUDA's topk gives
    for the small inputs MemFlow uses, made explicit so every device agrees.
    """
    n = scores.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"cannot select {k} of {n} entries")
    # stable sort on descending score keeps ascending index among ties: lowest indices win the set
    chosen = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    # order the set: descending index first, then a stable sort by descending score
    by_index = torch.sort(chosen, dim=-1, descending=True).values
    order = torch.sort(scores.gather(-1, by_index), dim=-1, descending=True, stable=True).indices
    return by_index.gather(-1, order)


def select_top_ascending(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The same set as `select_top`, returned in ascending index order (SMA keeps time order).

    Computed by counting, not sorting, so that it compiles into one small kernel: entry i is kept when
    fewer than k entries rank before it (a higher score, or an equal score at a lower index), and a
    kept entry's place in the result is the number of kept entries before it.
    """
    n = scores.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"cannot select {k} of {n} entries")
    index = torch.arange(n, device=scores.device)
    mine, other = scores[..., :, None], scores[..., None, :]  # [..., i, j]
    ranks_before = (other > mine) | ((other == mine) & (index < index[:, None]))
    kept = ranks_before.sum(dim=-1) < k
    place = torch.where(kept, kept.cumsum(dim=-1) - 1, k)  # dropped entries go to a spare place k
    result = torch.zeros((*scores.shape[:-1], k + 1), dtype=torch.long, device=scores.device)
    return result.scatter(-1, place, index.expand_as(place))[..., :k]


def nam_scores(text_keys: torch.Tensor, bank_keys: torch.Tensor, frames: int) -> torch.Tensor:
    """Relevance of each bank frame to the text, one score per frame.

    text_keys: [B, H, T, D] (the layer's cross-attention keys); bank_keys:
    [B, H, frames * P, D]. The score is the mean over heads, text rows and frame
    tokens of the scaled dot products, i.e. the head-mean of (mean text key) ·
    (mean frame key) / sqrt(D). No softmax. Returns [B, frames].
    """
    b, h, _, d = bank_keys.shape
    text_mean = text_keys.mean(dim=2)  # [B, H, D]
    frame_mean = bank_keys.reshape(b, h, frames, -1, d).mean(dim=3)  # [B, H, frames, D]
    per_head = torch.einsum("bhd,bhfd->bhf", text_mean, frame_mean) * d**-0.5
    return per_head.mean(dim=1)


def compressed_bank_order(scores: torch.Tensor) -> torch.Tensor:
    """Slots kept when a full bank of C frames takes one new frame: the top C - 1 by score, [B, C-1]."""
    return select_top(scores, scores.shape[-1] - 1)


def sma_frame_selection(queries: torch.Tensor, pool_keys: torch.Tensor, frames: int, k: int) -> torch.Tensor:
    """Frames of the sink+bank pool each head attends to under sparse memory activation.

    queries: [B, H, N, D] (rotary-embedded); pool_keys: [B, H, frames * P, D].
    One mean query per head is scored against each frame's mean key (no scale);
    the top min(k, frames) are kept in ascending frame order. Returns [B, H, k'].
    """
    b, h, _, d = pool_keys.shape
    frame_means = pool_keys.reshape(b, h, frames, -1, d).mean(dim=3)  # [B, H, frames, D]
    relevance = torch.einsum("bhd,bhfd->bhf", queries.mean(dim=2), frame_means)
    return select_top_ascending(relevance, min(k, frames))


def sma_key_set(
    k: torch.Tensor, v: torch.Tensor, queries: torch.Tensor, candidates: torch.Tensor,
    window: tuple[int, int], tokens_per_frame: int, top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The keys and values one head attends to under SMA, for every head of one layer.

    k, v: the layer's whole buffer [B, H, T, D] in frames of `tokens_per_frame` tokens; queries: [B, H, N, D];
    candidates: the buffer frames of the sink and the viewed bank slots, in that order; window: the
    token range of the local window. Per head, the top_k candidates by `sma_frame_selection` (kept in
    ascending candidate order) are followed by the window. Returns keys and values [B, H, top_k*frame + window, D].
    """
    d, frame = k.shape[-1], tokens_per_frame
    k_frames = k.unflatten(2, (-1, frame))  # [B, H, frames, P, D]
    pool = k_frames[:, :, candidates].flatten(2, 3)  # [B, H, candidates * P, D]
    chosen = candidates[sma_frame_selection(queries, pool, len(candidates), top_k)]  # [B, H, top_k]
    index = chosen[..., None, None].expand(-1, -1, -1, frame, d)

    def key_set(t: torch.Tensor) -> torch.Tensor:
        memory = t.unflatten(2, (-1, frame)).gather(2, index).flatten(2, 3)
        return torch.cat([memory, t[:, :, window[0] : window[1]]], dim=2)

    return key_set(k), key_set(v)
