"""KV memory of the causal transformer: rolling local cache with sink, memory bank, text cache.

Buffers are allocated once at fixed capacity. Every layer shares the same
positions, so the indices live on the host and no pass reads them back from the
device. The per-layer key/value buffer is laid out [cache | bank] along the
token axis so that, once the cache is full, sink + local window + bank is one
contiguous slice handed straight to attention.

`KVMemory` also owns MemFlow's memory policy: what the passes of a chunk attend
to (`begin_chunk`), when a chunk is recorded into the bank (`end_chunk`) and what
a prompt switch re-encodes (`begin_recache`). The arithmetic behind it is the
pure functions of `memory.py`. Sizes in tokens are named so; frames and chunks
are latent frames and generator chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..settings import MemorySettings, TransformerConfig
from .memory import (
    CachePlan,
    bank_view_frames,
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


@dataclass(frozen=True)
class PassGroup:
    """Passes that share one cache plan: a chunk's denoising steps and cache write, or a switch's re-cache."""

    plan: CachePlan
    bank_view: int  # bank slots the passes attend to
    first_frame: int  # absolute latent frame of the passes' first frame
    frames: int  # latent frames the passes carry


@dataclass(frozen=True)
class MemoryState:
    """What a `KVMemory` keeps across a prompt switch that a re-cache cannot rebuild (`KVMemory.kept_state`).

    The local window after the sink is left out: the switch's re-cache rewrites every valid token of it
    from the latent history before anything reads it. The sink (encoded under the prompts before the
    switch) and the bank (prototypes staged from earlier chunks' cache passes) cannot be recomputed
    without replaying the video, so they are kept.
    """

    sink: torch.Tensor  # [2, L, B, H, sink_tokens, D]
    bank: torch.Tensor  # [2, L, B, H, bank_slots * P, D]
    staged: torch.Tensor  # [2, L, B, H, P, D]: the prototype waiting for the bank
    local_end: int
    global_end: int
    recorded: int


class KVMemory:
    """Self-attention KV cache (sink + local window) and MemFlow memory bank, for all layers, and their policy.

    `kv[0]` / `kv[1]` hold keys / values as [L, B, H, (W + C) * P, D]: tokens
    [0, W*P) are the cache, [W*P, (W + C) * P) the C bank slots. With `interactive`
    (several prompts) a chunk is recorded into the bank every `record_interval`
    chunks, otherwise every chunk stages its prototype.
    """

    def __init__(
        self,
        config: TransformerConfig,
        settings: MemorySettings,
        tokens_per_frame: int,
        frames_per_chunk: int,
        batch: int,
        device,
        dtype,
        *,
        interactive: bool = False,
    ):
        self.settings = settings
        self.interactive = interactive
        self.tokens_per_frame = tokens_per_frame
        self.frames_per_chunk = frames_per_chunk
        self.tokens_per_chunk = tokens_per_frame * frames_per_chunk
        self.cache_tokens = settings.window * tokens_per_frame
        self.sink_tokens = settings.sink_frames * tokens_per_frame
        self.bank_slots = settings.bank_frames
        tokens = self.cache_tokens + self.bank_slots * tokens_per_frame
        shape = (2, config.num_layers, batch, config.num_heads, tokens, config.head_dim)
        self.kv = torch.zeros(shape, device=device, dtype=dtype)
        staged_shape = (2, config.num_layers, batch, config.num_heads, tokens_per_frame, config.head_dim)
        self.staged = torch.zeros(staged_shape, device=device, dtype=dtype)
        self.local_end = 0
        self.global_end = 0
        self.recorded = 0  # bank frames ever recorded (grows without bound)
        self._sma_frames: dict[tuple[int, int], torch.Tensor] = {}

    # -- the policy --------------------------------------------------------------------

    def begin_chunk(self, chunk: int, text: TextCache) -> PassGroup:
        """Make room for chunk `chunk` and bring the staged prototype into the bank (scored by `text`'s keys).

        Returns what the chunk's passes write and attend to.
        """
        plan = self.plan(chunk * self.tokens_per_chunk, self.tokens_per_chunk)
        self.begin(plan)
        self.bank_pre_update(text)
        return PassGroup(plan, self.bank_view(chunk), chunk * self.frames_per_chunk, self.frames_per_chunk)

    def end_chunk(self, passes: PassGroup, chunk: int) -> None:
        """Keep the chunk's cache-writing pass; stage its first frame for the bank when the chunk records."""
        self.commit(passes.plan, stage=self.records(chunk))

    def begin_recache(self, chunk: int, text: TextCache) -> PassGroup | None:
        """A prompt switch before chunk `chunk`: the last `window` frames to re-encode (None at the start).

        The bank is brought up to date first, scored by `text`'s keys (the released code reads them zeroed).
        """
        start_frame = chunk * self.frames_per_chunk
        if start_frame == 0:
            return None
        frames = min(self.settings.window, start_frame)
        first = start_frame - frames
        plan = self.plan(first * self.tokens_per_frame, frames * self.tokens_per_frame)
        self.begin(plan)
        self.bank_pre_update(text)
        return PassGroup(plan, self.bank_view(chunk, recache=True), first, frames)

    def end_recache(self, passes: PassGroup) -> None:
        """Keep the re-encoded frames (nothing is staged for the bank)."""
        self.commit(passes.plan, stage=False)

    def records(self, chunk: int) -> bool:
        """Whether chunk `chunk` stages its prototype for the bank: every chunk with one prompt, else every R-th."""
        return not self.interactive or chunk % self.settings.record_interval == 0

    def bank_view(self, chunk: int, *, recache: bool = False) -> int:
        """Bank slots the passes of chunk `chunk` (or of the re-cache before it) attend to."""
        settings = self.settings
        if self.bank_slots == 0 or self.sink_tokens == 0:  # without a sink the bank is never attended
            return 0
        return bank_view_frames(
            chunk, record_interval=settings.record_interval, bank_size=self.bank_slots, recache=recache
        )

    @property
    def sma_top_k(self) -> int | None:
        """Frames of sink and bank each head keeps under sparse memory activation; None: SMA off."""
        settings = self.settings
        return settings.sma_top_k if settings.sma and self.sink_tokens else None

    # -- a prompt switch's snapshot -------------------------------------------------------

    def kept_state(self) -> MemoryState:
        """A copy of what the next prompt switch does not rebuild (take it just before the switch)."""
        return MemoryState(
            sink=self.kv[..., : self.sink_tokens, :].clone(),
            bank=self.kv[..., self.cache_tokens :, :].clone(),
            staged=self.staged.clone(),
            local_end=self.local_end,
            global_end=self.global_end,
            recorded=self.recorded,
        )

    def restore(self, state: MemoryState) -> None:
        """Take `state` (from `kept_state` of a memory of the same shape); the window is zero until the re-cache."""
        expected = (*self.kv.shape[:-2], self.sink_tokens, self.kv.shape[-1])
        if tuple(state.sink.shape) != expected or state.bank.shape[-2] != self.kv.shape[-2] - self.cache_tokens:
            raise ValueError(f"a memory snapshot of shape {list(state.sink.shape)} does not fit this memory")
        self.kv.zero_()
        self.kv[..., : self.sink_tokens, :] = state.sink
        self.kv[..., self.cache_tokens :, :] = state.bank
        self.staged.copy_(state.staged)
        self.local_end, self.global_end, self.recorded = state.local_end, state.global_end, state.recorded

    # -- the local cache -------------------------------------------------------------

    def plan(self, start: int, n_new: int) -> CachePlan:
        """Where a pass of `n_new` tokens from absolute token `start` writes (see `plan_cache_pass`)."""
        return plan_cache_pass(
            start, n_new, local_end=self.local_end, global_end=self.global_end,
            cache_tokens=self.cache_tokens, sink_tokens=self.sink_tokens,
        )  # fmt: skip

    def begin(self, plan: CachePlan) -> None:
        """Roll the cache for a pass group (all passes of one chunk share this plan)."""
        # Moved left in pieces of `evict` tokens, in ascending order: a piece never overlaps its source,
        # so no temporary copy of the window (gigabytes at full size) is ever made.
        if not plan.evict:
            return
        for offset in range(0, plan.rolled, plan.evict):
            n = min(plan.evict, plan.rolled - offset)
            dst = self.sink_tokens + offset
            self.kv[..., dst : dst + n, :] = self.kv[..., dst + plan.evict : dst + plan.evict + n, :]

    def write(self, layer: int, plan: CachePlan, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a pass's keys/values [B, H, N, D] at the plan's slots."""
        src = slice(plan.write_offset, plan.write_offset + plan.write_len)
        self.kv[0, layer, :, :, plan.write_start : plan.end] = k[:, :, src]
        self.kv[1, layer, :, :, plan.write_start : plan.end] = v[:, :, src]

    def commit(self, plan: CachePlan, *, stage: bool) -> None:
        """Make a cache-writing pass permanent; optionally stage its first frame for the bank."""
        if stage and self.bank_slots:
            first = slice(plan.write_start, plan.write_start + self.tokens_per_frame)
            self.staged.copy_(self.kv[..., first, :])
        if plan.is_recompute:
            return
        self.local_end = plan.end
        self.global_end = plan.global_end
        if stage and self.bank_slots:
            chunks_done = plan.global_end // self.tokens_per_chunk
            self.recorded = recorded_frames(chunks_done, self.settings.record_interval)

    def attention_kv(self, layer: int, plan: CachePlan, bank_view: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, K, D] a pass attends to: the whole sink, the local window, the bank view."""
        k, v = self.kv[0, layer], self.kv[1, layer]
        end = max(plan.end, self.sink_tokens)  # a sink longer than what is written so far is attended whole (zeros)
        bank_end = self.cache_tokens + bank_view * self.tokens_per_frame
        if bank_view == 0 or end == self.cache_tokens:
            stop = end if bank_view == 0 else bank_end
            return k[:, :, :stop], v[:, :, :stop]
        bank = slice(self.cache_tokens, bank_end)
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
        sink_frames = self.sink_tokens // self.tokens_per_frame
        if sink_frames + bank_view <= top_k:  # every candidate is kept: the plain key set
            return self.attention_kv(layer, plan, bank_view)
        candidates = self._candidate_frames(sink_frames, bank_view, queries.device)
        window = (self.sink_tokens, plan.end)
        k, v = self.kv[0, layer], self.kv[1, layer]
        return key_set(k, v, queries, candidates, window, self.tokens_per_frame, top_k)

    def _candidate_frames(self, sink_frames: int, bank_view: int, device) -> torch.Tensor:
        """Buffer frame of each SMA candidate: the sink's frames, then the viewed bank slots (cached)."""
        key = (sink_frames, bank_view)
        if key not in self._sma_frames:
            bank_first = self.cache_tokens // self.tokens_per_frame
            frames = [*range(sink_frames), *range(bank_first, bank_first + bank_view)]
            self._sma_frames[key] = torch.tensor(frames, device=device)
        return self._sma_frames[key]

    # -- the bank ----------------------------------------------------------------------

    def bank_pre_update(self, text: TextCache) -> None:
        """Bring the staged prototype into the bank, compressing by text relevance once it is full."""
        if not self.bank_slots or self.recorded < 1:
            return
        frame = self.tokens_per_frame
        if self.recorded <= self.bank_slots:
            slot = self.cache_tokens + (self.recorded - 1) * frame
            self.kv[..., slot : slot + frame, :] = self.staged
            return
        bank = self.kv[..., self.cache_tokens :, :]  # [2, L, B, H, C*P, D]
        two, layers, b, h, _, d = bank.shape
        for layer in range(layers):
            scores = nam_scores(text.k[layer], bank[0, layer], self.bank_slots)  # [B, C]
            keep = compressed_bank_order(scores)  # [B, C-1]
            slots = bank[:, layer].reshape(two, b, h, self.bank_slots, frame, d)
            index = keep[None, :, None, :, None, None].expand(two, b, h, keep.shape[1], frame, d)
            kept = slots.gather(3, index).flatten(3, 4)
            bank[:, layer, :, :, : kept.shape[3]] = kept
            bank[:, layer, :, :, kept.shape[3] :] = self.staged[:, layer]
