"""Run the consumer of a chunk stream (decode, write) beside its producer (the generator).

The generator keeps the GPU's main stream busy while a worker thread decodes the
previous chunk on a side stream and hands frames on, so decoding and encoding
overlap generation instead of following it. On the CPU this is a plain loop.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")
_DONE = object()


def overlapped(
    chunks: Iterator[torch.Tensor], work: Callable[[torch.Tensor], T], device: torch.device, depth: int = 2
) -> Iterator[T]:
    """Yield `work(chunk)` for every chunk, in order; on CUDA the work runs on a worker thread and stream."""
    if device.type != "cuda":
        for chunk in chunks:
            yield work(chunk)
        return
    inbox: queue.Queue = queue.Queue(maxsize=depth)
    outbox: queue.Queue = queue.Queue()
    side = torch.cuda.Stream(device)

    def worker() -> None:
        try:
            while (item := inbox.get()) is not _DONE:
                chunk, ready = item
                with torch.cuda.stream(side):
                    side.wait_event(ready)
                    outbox.put((work(chunk), None))
        except BaseException as error:  # handed to the consumer, raised there
            outbox.put((None, error))
        outbox.put((_DONE, None))

    thread = threading.Thread(target=worker, name="memflow-decode", daemon=True)
    thread.start()
    pending = 0
    first = True
    try:
        for chunk in chunks:
            ready = torch.cuda.Event()
            ready.record()
            chunk.record_stream(side)  # the allocator must not reuse it before the side stream is done
            inbox.put((chunk, ready))
            pending += 1
            if first:  # the first frames go out as soon as they exist: time to first frame is not traded away
                first = False
                yield _take(outbox)
                pending -= 1
            while pending and not outbox.empty():
                yield _take(outbox)
                pending -= 1
        inbox.put(_DONE)
        while pending:
            yield _take(outbox)
            pending -= 1
    finally:
        if thread.is_alive():
            _drain(inbox)
            inbox.put(_DONE)
            thread.join(timeout=60)


def _take(outbox: queue.Queue):
    result, error = outbox.get()
    if error is not None:
        raise error
    return result


def _drain(inbox: queue.Queue) -> None:
    while True:
        try:
            inbox.get_nowait()
        except queue.Empty:
            return
