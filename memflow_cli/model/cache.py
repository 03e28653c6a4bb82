"""KV memory of the causal transformer: rolling local cache with sink, memory bank, text cache.

Buffers are allocated once at fixed capacity. Every layer shares the same
positions, so the indices live on the host and no pass reads them back from the
device. The per-layer key/value buffer is laid out [cache | bank] along the
token axis so that, once the cache is full, sink + local window + bank is one
contiguous slice handed straight to attention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..settings import MemorySettings, TransformerConfig
from .memory import (
    CachePlan,
    compressed_bank_order,
    nam_scores,
    plan_cache_pass,
    recorded_frames,
    sma_key_set,
)


class TextCache:
    """Cross-attention keys and values of the current prompt, per layer: [L, B, H, T, D]."""

    def __init__(self, config: TransformerConfig, batch: int, device, dtype):
        shape = (config.num_layers, batch, config.num_heads, config.text_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = False

    def reset(self) -> None:
        """Forget the prompt: zero keys (the bank's text query reads them) and recompute on next use."""
        self.k.zero_()
        self.v.zero_()
        self.valid = False


class KVMemory:
    """Self-attention KV cache (sink + local window) and MemFlow memory bank, for all layers.

    `kv[0]` / `kv[1]` hold keys / values as [L, B, H, (W + C) * P, D]: tokens
    [0, W*P) are the cache, [W*P, (W + C) * P) the C bank slots.
    """

    def __init__(
        self,
        config: TransformerConfig,
        memory: MemorySettings,
        tokens_per_frame: int,
        batch: int,
        device,
        dtype,
    ):
        self.memory = memory
        self.frame = tokens_per_frame
        self.capacity = memory.window * tokens_per_frame
        self.sink = memory.sink_frames * tokens_per_frame
        self.bank_slots = memory.bank_frames
        tokens = self.capacity + self.bank_slots * tokens_per_frame
        shape = (2, config.num_layers, batch, config.num_heads, tokens, config.head_dim)
        self.kv = torch.zeros(shape, device=device, dtype=dtype)
        staged_shape = (2, config.num_layers, batch, config.num_heads, tokens_per_frame, config.head_dim)
        self.staged = torch.zeros(staged_shape, device=device, dtype=dtype)
        self.local_end = 0
        self.global_end = 0
        self.recorded = 0  # bank frames ever recorded (grows without bound)
        self._sma_frames: dict[tuple[int, int], torch.Tensor] = {}

    # -- the local cache -------------------------------------------------------------

    def plan(self, start: int, n_new: int) -> CachePlan:
        return plan_cache_pass(
            start, n_new, local_end=self.local_end, global_end=self.global_end, capacity=self.capacity, sink=self.sink
        )

    def begin(self, plan: CachePlan) -> None:
        """Roll the cache for a pass group (all passes of one chunk share this plan)."""
        # Moved left in pieces of `evict` tokens, in ascending order: a piece never overlaps its source,
        # so no temporary copy of the window (gigabytes at full size) is ever made.
        if not plan.evict:
            return
        for offset in range(0, plan.rolled, plan.evict):
            n = min(plan.evict, plan.rolled - offset)
            dst = self.sink + offset
            self.kv[..., dst : dst + n, :] = self.kv[..., dst + plan.evict : dst + plan.evict + n, :]

    def write(self, layer: int, plan: CachePlan, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a pass's keys/values [B, H, N, D] at the plan's slots."""
        src = slice(plan.write_offset, plan.write_offset + plan.write_len)
        self.kv[0, layer, :, :, plan.write_start : plan.end] = k[:, :, src]
        self.kv[1, layer, :, :, plan.write_start : plan.end] = v[:, :, src]

    def commit(self, plan: CachePlan, *, stage: bool, record_interval: int, chunk_tokens: int) -> None:
        """Make a cache-writing pass permanent; optionally stage its first frame for the bank."""
        if stage and self.bank_slots:
            first = slice(plan.write_start, plan.write_start + self.frame)
            self.staged.copy_(self.kv[..., first, :])
        if plan.is_recompute:
            return
        self.local_end = plan.end
        self.global_end = plan.global_end
        if stage and self.bank_slots:
            self.recorded = recorded_frames(plan.global_end // chunk_tokens, record_interval)

    def attention_kv(self, layer: int, plan: CachePlan, bank_view: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, K, D] a pass attends to: the whole sink, the local window, the bank view."""
        k, v = self.kv[0, layer], self.kv[1, layer]
        end = max(plan.end, self.sink)  # a sink longer than what is written so far is attended whole (zeros)
        if bank_view == 0 or end == self.capacity:
            stop = end if bank_view == 0 else self.capacity + bank_view * self.frame
            return k[:, :, :stop], v[:, :, :stop]
        bank = slice(self.capacity, self.capacity + bank_view * self.frame)
        return (
            torch.cat([k[:, :, :end], k[:, :, bank]], dim=2),
            torch.cat([v[:, :, :end], v[:, :, bank]], dim=2),
        )

    def sparse_attention_kv(
        self, layer: int, plan: CachePlan, bank_view: int, queries: torch.Tensor, top_k: int,
        key_set: Callable[..., tuple[torch.Tensor, torch.Tensor]] = sma_key_set,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """SMA: per head, the top-k frames of sink + bank by relevance to the mean query, plus the local window.

        `key_set` is `memory.sma_key_set` or a compiled copy of it (the fast path passes one).
        """
        sink_frames = self.sink // self.frame
        if sink_frames + bank_view <= top_k:  # every candidate is kept: the plain key set
            return self.attention_kv(layer, plan, bank_view)
        candidates = self._candidate_frames(sink_frames, bank_view, queries.device)
        window = (self.sink, plan.end)
        return key_set(self.kv[0, layer], self.kv[1, layer], queries, candidates, window, self.frame, top_k)

    def _candidate_frames(self, sink_frames: int, bank_view: int, device) -> torch.Tensor:
        """Buffer frame of each SMA candidate: the sink's frames, then the viewed bank slots (cached)."""
        key = (sink_frames, bank_view)
        if key not in self._sma_frames:
            bank_first = self.capacity // self.frame
            frames = [*range(sink_frames), *range(bank_first, bank_first + bank_view)]
            self._sma_frames[key] = torch.tensor(frames, device=device)
        return self._sma_frames[key]

    # -- the bank ----------------------------------------------------------------------

    def bank_pre_update(self, text: TextCache) -> None:
        """Bring the staged prototype into the bank, compressing by text relevance once it is full."""
        if not self.bank_slots or self.recorded < 1:
            return
        frame = self.frame
        if self.recorded <= self.bank_slots:
            slot = self.capacity + (self.recorded - 1) * frame
            self.kv[..., slot : slot + frame, :] = self.staged
            return
        bank = self.kv[..., self.capacity :, :]  # [2, L, B, H, C*P, D]
        two, layers, b, h, _, d = bank.shape
        for layer in range(layers):
            scores = nam_scores(text.k[layer], bank[0, layer], self.bank_slots)  # [B, C]
            keep = compressed_bank_order(scores)  # [B, C-1]
            slots = bank[:, layer].reshape(two, b, h, self.bank_slots, frame, d)
            index = keep[None, :, None, :, None, None].expand(two, b, h, keep.shape[1], frame, d)
            kept = slots.gather(3, index).flatten(3, 4)
            bank[:, layer, :, :, : kept.shape[3]] = kept
            bank[:, layer, :, :, kept.shape[3] :] = self.staged[:, layer]
