"""Every process-wide setting the fast path makes, in one place.

torch keeps some of its settings per process, not per model: cuDNN's autotuning, dynamo's recompile limit,
and where Inductor and Triton keep their compiled kernels (environment variables read when they compile).
cuDNN's autotuning stays off: it times the candidate convolution algorithms in each process and may pick
another one the next time, and another algorithm rounds the VAE's pixels differently, so the same story
would not give the same video twice (nor a live session's replay the live video).
Nothing else in memflow sets them; `choose_fast_path` calls `process_settings` once per engine, before
anything is compiled, and the compiled decoder steps call `compile_settings` in case they are built alone
(tests).
"""

from __future__ import annotations

import os

import torch

from .compile import MODEL_GRAPHS, VAE_GRAPHS, allow_recompiles
from .compile_cache import compile_cache_env, device_cache_dir


def process_settings(device: torch.device, *, compile: bool, glue: bool = False) -> None:
    """What the fast path needs torch to do in this whole process, for a model on `device`.

    On CUDA: cuDNN chooses each convolution's algorithm by its heuristics, the same choice in every process
    (never by timing them); with `compile`, dynamo may build every graph the model and the decoder need and
    the compile caches live in the user's cache, as Triton's does with `glue` (the fused glue's kernels).
    Nothing changes on the CPU.
    """
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = False
    if compile or glue:
        compile_settings(device)


def compile_settings(device: torch.device | None = None) -> None:
    """dynamo's recompile limit raised for our graphs; with a CUDA `device`, the compile caches pointed into
    the user's cache (`compile_cache.py`) unless the user set their own."""
    allow_recompiles(max(MODEL_GRAPHS, VAE_GRAPHS))
    if device is not None and device.type == "cuda":
        os.environ.update(compile_cache_env(device_cache_dir(device)))
