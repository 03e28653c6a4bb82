"""Run the consumer of a chunk stream (decode) beside its producer (the generator).

The generator keeps the GPU's main stream busy while one long-lived worker
thread decodes earlier chunks on a side stream, so decoding overlaps
generation instead of following it. The worker and its stream live for the
whole process (a new thread would pay for new cuDNN/cuBLAS handles at every
video). On the CPU this is a plain loop.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


@functools.cache
def _worker() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="memflow-decode")


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def overlapped(
    chunks: Iterator[torch.Tensor], work: Callable[[torch.Tensor], T], device: torch.device, depth: int = 2
) -> Iterator[T]:
    """Yield `work(chunk)` for every chunk, in order; on CUDA the work runs on a worker thread and stream.

    The first result is handed out as soon as it exists; later ones trail generation by up to `depth` chunks.
    """
    if device.type != "cuda":
        for chunk in chunks:
            yield work(chunk)
        return
    side = _side_stream(device)

    def job(chunk: torch.Tensor, ready: torch.cuda.Event) -> T:
        with torch.cuda.stream(side):
            side.wait_event(ready)
            return work(chunk)

    pending: deque[Future[T]] = deque()
    try:
        for index, chunk in enumerate(chunks):
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(chunk.device))  # the chunk's device: it may not be the current one
            chunk.record_stream(side)  # the allocator must not reuse it before the side stream is done
            pending.append(_worker().submit(job, chunk, ready))
            while pending and (index == 0 or pending[0].done() or len(pending) > depth):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        for future in pending:
            if not future.cancelled():
                future.exception()  # wait: the worker must not outlive the caller's buffers
