"""Run the consumer of a chunk stream (decode) beside its producer (the generator).

The generator keeps the GPU's main stream busy while one worker thread decodes earlier chunks on a side
stream, so decoding overlaps generation instead of following it. An `Overlap` owns that thread and
stream; the engine keeps one for all its videos (a new thread would pay for new cuDNN/cuBLAS handles at
every video) and closes it with itself. On the CPU it is a plain loop and owns nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import TypeVar

import torch

T = TypeVar("T")


class Overlap:
    """A worker thread and a CUDA side stream for work beside generation (none on the CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._worker: ThreadPoolExecutor | None = None
        self._side: torch.cuda.Stream | None = None

    def _resources(self) -> tuple[ThreadPoolExecutor, torch.cuda.Stream]:
        if self._worker is None or self._side is None:
            self._side = torch.cuda.Stream(self.device)
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memflow-decode")
        return self._worker, self._side

    def map(self, chunks: Iterator[torch.Tensor], work: Callable[[torch.Tensor], T], depth: int = 2) -> Iterator[T]:
        """Yield `work(chunk)` for every chunk, in order; on CUDA the work runs on the worker thread and stream.

        The first result is handed out as soon as it exists; later ones trail generation by up to `depth` chunks.
        """
        if self.device.type != "cuda":
            for chunk in chunks:
                yield work(chunk)
            return
        worker, side = self._resources()

        def job(chunk: torch.Tensor, ready: torch.cuda.Event) -> T:
            with torch.cuda.stream(side):
                side.wait_event(ready)
                return work(chunk)

        pending: deque[Future[T]] = deque()
        try:
            for index, chunk in enumerate(chunks):
                ready = torch.cuda.Event()
                ready.record()
                chunk.record_stream(side)  # the allocator must not reuse it before the side stream is done
                pending.append(worker.submit(job, chunk, ready))
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

    def close(self) -> None:
        """Stop the worker thread (after its current job); the side stream is released with it."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
        self._worker = self._side = None

    def __enter__(self) -> Overlap:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
