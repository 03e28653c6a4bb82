"""torch.compile, applied from outside: static-shape graphs callable from any thread, and the blocks' steps.

Decoding runs on a worker thread beside generation (`overlap.py`), and torch.compile is not thread-safe:
while one thread traces a new graph, a compiled call on another thread fails. `compiled` therefore
serialises every call of a compiled function (compiling or not) under one lock; the lock is held for a
kernel launch, not for the GPU's work.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import torch

# Graphs that one compiled function may build before dynamo gives up and runs it eagerly.
MODEL_GRAPHS = 16  # per pass kind, and SMA's key set per bank view and window length while the cache fills
# one per input shape and layout (strided views of tiled convs, with or without a bias) a decoder step
# sees: about 20 at one latent frame per call, 45 when a whole chunk passes at once
VAE_GRAPHS = 64

_COMPILED_CALLS = threading.RLock()


def compiled(function: Callable[..., Any], options: dict[str, Any] | None = None) -> Callable[..., Any]:
    """`torch.compile(function)` with static shapes, callable from any thread (one call at a time).

    `options` are Inductor settings for this function alone.
    """
    graph = torch.compile(function, dynamic=False, options=options)

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        with _COMPILED_CALLS:
            return graph(*args, **kwargs)

    return call


def allow_recompiles(graphs: int) -> None:
    """Let one compiled function build at least `graphs` graphs (dynamo's limit is process-wide)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), graphs))


def eager_rounding() -> dict[str, Any] | None:
    """Inductor's option to round where eager PyTorch rounds, where this torch has it (else its default)."""
    import torch._inductor.config as inductor

    return {"emulate_precision_casts": True} if hasattr(inductor, "emulate_precision_casts") else None


def compiled_block_step() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """What the compiled path runs each block's two pure steps through (`Kernels.block_step`): `compiled`.

    The steps are everything but the cache read/write and the attention call. Static shapes: a pass kind is
    a few graphs, shared by all blocks.
    """
    allow_recompiles(MODEL_GRAPHS)  # built alone (tests) as well as through `process.process_settings`
    return compiled
