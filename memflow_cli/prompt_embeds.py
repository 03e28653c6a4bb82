"""The engine's prompt side: prompt -> embeddings from memory, from the disk cache, or from the text encoder.

The text encoder is loaded on first need, so a render whose prompts are all in the disk cache
(`embed_cache.py`) never loads it. Memory holds a few prompts (the current video's, and the most recently
used ones up to `MEMORY_PROMPTS`), not every prompt a batch ever had. `prefetch` encodes in a background
thread, so the prompts of the first video are ready when the transformer has loaded.

Between encodes the text encoder stays on the GPU when the card has room for it beside a render
(`RENDER_HEADROOM_GIB`), and goes back to the CPU when it has not (a 24 GB card).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .embed_cache import EmbeddingCache

ENCODED = "encoded"  # the text encoder made it for this video
CACHED = "cached"  # read from the disk cache, or kept from an earlier video
MEMORY_PROMPTS = 8  # prompts kept in memory beyond the current video's
# What a render of the 1.3B model at 832x480 needs on the GPU beside the text encoder: generation, decode and
# MP4 peak at 10.8 GiB allocated and about 12 GiB reserved on the H200, plus room for the allocator's slack.
RENDER_HEADROOM_GIB = 14.0


class PromptEncoder(Protocol):
    """What encodes prompts: `TextEncoder`, or the random model's `NoiseTextEncoder`."""

    def encode(self, prompts: list[str]) -> torch.Tensor: ...  # [n, text_len, dim] float32 on the CPU
    def to(self, device: torch.device | str) -> Any: ...
    def offload(self) -> Any: ...
    def describe(self) -> str: ...


@dataclass
class _Entry:
    embeds: torch.Tensor  # [text_len, dim] float32 on the CPU
    fresh: bool  # encoded here and not yet handed to a video


class PromptEmbeddings:
    """Prompt embeddings of one text encoder, loaded by `load` on first need (None: the model has none)."""

    def __init__(
        self,
        load: Callable[[], PromptEncoder] | None,
        device: torch.device,
        cache: EmbeddingCache | None = None,
        *,
        name: str = "this",
        memory_prompts: int = MEMORY_PROMPTS,
        headroom_gib: float = RENDER_HEADROOM_GIB,
    ):
        self._load = load
        self.device = device
        self.cache = cache
        self.name = name  # the model's, for the error when it has no text encoder
        self.memory_prompts = memory_prompts
        self.headroom_bytes = int(headroom_gib * 2**30)
        self._encoder: PromptEncoder | None = None
        self._memory: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._lock = threading.RLock()  # the prefetch thread and the caller take turns
        self._worker: ThreadPoolExecutor | None = None
        self._worker_lock = threading.Lock()
        self._prefetched: Future[None] | None = None
        self.encoded_prompts = 0  # how many prompts the text encoder has encoded, for reports and tests

    # -- the text encoder ------------------------------------------------------------------------------

    @property
    def encoder_loaded(self) -> bool:
        return self._encoder is not None

    @property
    def text_encoder(self) -> PromptEncoder | None:
        """The text encoder, loaded now if it was not yet; None where the model has none."""
        with self._lock:
            return self._loaded() if self._load is not None else None

    def _loaded(self) -> PromptEncoder:
        if self._encoder is None:
            if self._load is None:
                raise ValueError(f"the {self.name} model has no text encoder: it cannot encode prompts")
            self._encoder = self._load()
        return self._encoder

    def describe(self) -> str | None:
        """What encodes the prompts, without loading it."""
        if self._encoder is not None:
            return self._encoder.describe()
        return None if self._load is None else "not loaded (every prompt was cached)"

    # -- prompts ---------------------------------------------------------------------------------------

    def prepare(self, prompts: Sequence[str], *, encode: bool = True) -> None:
        """Have every prompt's embeddings in memory: from memory, the disk cache, or encoded (then cached);
        without `encode`, only those in memory or on disk."""
        with self._lock:
            wanted = set(prompts)
            todo = []
            for prompt in dict.fromkeys(prompts):  # distinct, in order
                if prompt in self._memory:
                    self._memory.move_to_end(prompt)
                elif (embeds := self.cache.get(prompt) if self.cache else None) is not None:
                    self._memory[prompt] = _Entry(embeds, fresh=False)
                else:
                    todo.append(prompt)
            if todo and encode:
                encoded = self._encode(todo)
                for prompt, embeds in zip(todo, encoded, strict=True):
                    self._memory[prompt] = _Entry(embeds.clone(), fresh=True)  # not a view: the batch can go
                if self.cache is not None:
                    self.cache.put_many(dict(zip(todo, encoded, strict=True)))
            self._forget_beyond(wanted)

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        encoder = self._loaded()
        encoder.to(self.device)
        try:
            embeds = encoder.encode(prompts)
        finally:
            self._settle(encoder)
        self.encoded_prompts += len(prompts)
        return embeds

    def _settle(self, encoder: PromptEncoder) -> None:
        """Leave the encoder on the GPU where a render still fits beside it; else send it to the CPU."""
        if self.device.type == "cuda" and not fits_beside_render(
            available_bytes(self.device), _nbytes(encoder), self.headroom_bytes
        ):
            encoder.offload()

    def _forget_beyond(self, wanted: set[str]) -> None:
        """Drop the least recently used prompts beyond `memory_prompts`, keeping every prompt in `wanted`."""
        for prompt in list(self._memory):
            if len(self._memory) <= max(self.memory_prompts, len(wanted)):
                break
            if prompt not in wanted:
                del self._memory[prompt]

    def embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """[n, text_len, dim] float32 on the CPU, one row block per prompt (prepared first if need be)."""
        return self.take(prompts)[0]

    def take(self, prompts: Sequence[str]) -> tuple[torch.Tensor, tuple[str, ...]]:
        """The prompts' embeddings [n, text_len, dim] and, per prompt, `ENCODED` or `CACHED`.

        A prompt is `ENCODED` the first time the embeddings the text encoder made for it are taken,
        `CACHED` when they came from the disk cache or were taken before.
        """
        with self._lock:
            self.prepare(prompts)
            entries = [self._memory[p] for p in prompts]
            sources = tuple(ENCODED if entry.fresh else CACHED for entry in entries)
            for entry in entries:
                entry.fresh = False
            return torch.stack([entry.embeds for entry in entries]), sources

    def held_bytes(self) -> int:
        """Bytes of the embeddings held in memory."""
        with self._lock:
            return sum(entry.embeds.nbytes for entry in self._memory.values())

    def held_prompts(self) -> int:
        with self._lock:
            return len(self._memory)

    # -- in the background -----------------------------------------------------------------------------

    def prefetch(self, prompts: Sequence[str], *, beside_render: bool = False) -> None:
        """Start preparing `prompts` in a background thread; `wait` for it (a later `take` also waits).

        `beside_render`: a video is rendering meanwhile, so the prompts are encoded only where that needs
        no more GPU memory (the encoder stays on the GPU beside a render, or uses none); otherwise only
        the disk cache is read, and the rest is left to the `take` at the prompt's chunk.
        """
        if not prompts:
            return
        with self._worker_lock:  # prompts may arrive on several threads (a live session's stdin and page)
            if self._worker is None:
                self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memflow-prompts")
            self._prefetched = self._worker.submit(self._prepare_on_device, tuple(prompts), beside_render)

    def _prepare_on_device(self, prompts: tuple[str, ...], beside_render: bool = False) -> None:
        with self._lock:
            encode = not beside_render or self._encodes_beside_render()
            if encode and self.device.type == "cuda":  # the current device is per thread: the engine's here too
                torch.cuda.set_device(self.device)
            self.prepare(prompts, encode=encode)

    def _encodes_beside_render(self) -> bool:
        """Encoding takes no GPU memory that the text encoder does not hold already (a CPU engine, or an
        encoder loaded that stays on the GPU or never uses it)."""
        if self.device.type != "cuda":
            return True
        if self._encoder is None:
            return False
        device = getattr(self._encoder, "device", None)  # None: an encoder that never uses the GPU
        return device is None or torch.device(device).type == "cuda"

    def wait(self) -> None:
        """Wait for the prefetch; raises what it raised."""
        with self._worker_lock:  # `prefetch` sets it from other threads
            prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None:
            prefetched.result()

    def close(self) -> None:
        """Wait for the background thread to finish its prompts (those not started are dropped: a prefetch is
        only ahead of need; its error, if any, was or will not be reported here)."""
        with self._worker_lock:
            worker, self._worker, self._prefetched = self._worker, None, None
        if worker is not None:
            worker.shutdown(wait=True, cancel_futures=True)


def _nbytes(encoder: PromptEncoder) -> int:
    return int(getattr(encoder, "nbytes", 0))


def fits_beside_render(available: int, encoder_bytes: int, headroom_bytes: int) -> bool:
    """A text encoder of `encoder_bytes` can stay on a GPU where this process may hold `available` bytes."""
    return encoder_bytes == 0 or available >= encoder_bytes + headroom_bytes


def available_bytes(device: torch.device) -> int:
    """What this process may hold on `device`: what is free plus what it reserved already, within its
    memory fraction (`torch.cuda.set_per_process_memory_fraction`, `bench --memory-limit`)."""
    free, total = torch.cuda.mem_get_info(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(device)
    return min(free + torch.cuda.memory_reserved(device), int(fraction * total))
