"""`Overlap.map`: the work beside generation hands its results out in order, trailing by at most `depth` chunks."""

from __future__ import annotations

import time

import pytest
import torch

from memflow_cli.overlap import Overlap


def _slowly(x: torch.Tensor) -> int:
    time.sleep(0.2)  # a decode: long enough that the next chunks are asked for before it ends, where allowed
    return int(x.sum().item()) // 4


def _log_of(device: str, depth: int) -> list[str]:
    """What happened, in order: each chunk asked of the generator, each result handed out."""
    log: list[str] = []

    def chunks():
        for k in range(4):
            log.append(f"pull {k}")
            yield torch.full((4,), float(k), device=device)

    with Overlap(torch.device(device)) as overlap:
        for result in overlap.map(chunks(), _slowly, depth=depth):
            log.append(f"out {result}")
    return log


IN_TURN = ["pull 0", "out 0", "pull 1", "out 1", "pull 2", "out 2", "pull 3", "out 3"]


def test_on_the_cpu_each_result_comes_before_the_next_chunk_is_asked_for():
    assert _log_of("cpu", depth=2) == IN_TURN


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_no_trail_hands_each_result_out_before_the_next_chunk_is_asked_for():
    assert _log_of("cuda", depth=0) == IN_TURN  # a live session: a decoded chunk never waits for the next
    # a render: the first result at once, then up to two chunks in the making beside generation
    assert _log_of("cuda", depth=2) == ["pull 0", "out 0", "pull 1", "pull 2", "pull 3", "out 1", "out 2", "out 3"]
