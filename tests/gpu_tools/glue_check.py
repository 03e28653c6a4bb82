"""Times each fused Triton glue kernel against the PyTorch op sequence it replaces, at the 1.3B model's shapes.

One steady chunk at 832x480 (4680 tokens of 1536 dims, 3 frames of 1560, 12 heads of 128), bf16, rotary
tables in float32 as the generator makes them, inputs in the layouts a block hands over (q and k views of
one fused qkv, modulations views of one per-frame tensor). For each kernel: the median GPU time of the
Triton kernel and of the PyTorch sequence (`model.glue.Glue`, eager), the GPU time a steady chunk spends in
it (30 blocks x 5 passes x its calls per block), and the max absolute error of each against a float32
computation of the same sequence and between the two. First the warm-up (the kernels' JIT: cold on an empty
Triton cache, else read from it). Not part of the test suite.

    PYTHONPATH=. python tests/gpu_tools/glue_check.py [--iters 50]

Prints one JSON line per kernel, then one with the totals.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from memflow_cli.model.glue import PLAIN_GLUE
from memflow_cli.speed.glue import TritonGlue

TOKENS = 4680  # one chunk: 3 latent frames x 1560 tokens
BLOCKS, PASSES = 30, 5  # a steady chunk runs five passes of thirty blocks

FRAMES, PER_FRAME = 3, 1560
DIM, HEAD_DIM = 1536, 128
EPS = 1e-6


def inputs() -> dict:
    """One chunk's tensors in bf16 (the rotary tables in float32, as the generator makes them for bf16)."""
    generator = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device="cuda").bfloat16()

    angles = torch.rand((TOKENS, HEAD_DIM // 2), generator=generator, device="cuda", dtype=torch.float64) * 60
    q, k, _ = randn(1, TOKENS, 3 * DIM).chunk(3, dim=-1)
    shift, scale = randn(1, FRAMES, 2, DIM).chunk(2, dim=2)
    return {
        "x": randn(1, FRAMES, PER_FRAME, DIM), "y": randn(1, FRAMES, PER_FRAME, DIM), "q": q, "k": k,
        "shift": shift, "scale": scale, "gate": randn(1, FRAMES, 4, DIM).chunk(4, dim=2)[0],
        "weight": (1 + 0.1 * randn(DIM)),
        "rope": (torch.cos(angles).float()[:, None], torch.sin(angles).float()[:, None]),
    }  # fmt: skip


def in_float32(tensors: dict) -> dict:
    """The same values in float32 (the rotary tables in float64): the reference computation's inputs."""
    rope = tuple(table.double() for table in tensors["rope"])
    return {key: rope if key == "rope" else value.float() for key, value in tensors.items()}


# name, calls per block, the call on a glue and one chunk's tensors
KERNELS = [
    ("modulated_norm", 1, lambda g, t: g.modulated_norm(t["x"], t["shift"], t["scale"], EPS)),
    ("rms_norm_rope (q and k)", 2, lambda g, t: g.rms_norm_rope(t["q"], t["weight"], EPS, t["rope"])),
    ("gated_residual", 2, lambda g, t: g.gated_residual(t["x"], t["y"], t["gate"])),
    ("residual_norm", 1, lambda g, t: g.residual_norm(t["x"], t["y"], t["shift"], t["scale"], EPS)),
    ("rms_norm (cross-attention q)", 1, lambda g, t: g.rms_norm(t["q"], t["weight"], EPS)),
]


def time_ms(function: Callable[[], object], iters: int, warmup: int = 10) -> float:
    """Median GPU time of one call, from CUDA events around each call."""
    for _ in range(warmup):
        function()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        function()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def max_error(ours, expected) -> float:
    pairs = zip(ours, expected, strict=True) if isinstance(ours, tuple) else [(ours, expected)]
    return max((a.float() - b.float()).abs().max().item() for a, b in pairs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    glue = TritonGlue()
    started = time.perf_counter()
    glue.warm_up(DIM, HEAD_DIM, torch.device("cuda"), torch.bfloat16)
    print(json.dumps({"warm_up_s": round(time.perf_counter() - started, 3), "device": torch.cuda.get_device_name()}))
    bf16 = inputs()
    float32 = in_float32(bf16)
    totals = {"triton_ms_per_chunk": 0.0, "pytorch_ms_per_chunk": 0.0}
    for name, per_block, call in KERNELS:
        reference = call(PLAIN_GLUE, float32)
        ours, eager = call(glue, bf16), call(PLAIN_GLUE, bf16)
        triton_ms = time_ms(lambda call=call: call(glue, bf16), args.iters)
        torch_ms = time_ms(lambda call=call: call(PLAIN_GLUE, bf16), args.iters)
        per_chunk = BLOCKS * PASSES * per_block
        totals["triton_ms_per_chunk"] += triton_ms * per_chunk
        totals["pytorch_ms_per_chunk"] += torch_ms * per_chunk
        print(json.dumps({
            "kernel": name, "triton_ms": round(triton_ms, 4), "pytorch_ms": round(torch_ms, 4),
            "speedup": round(torch_ms / triton_ms, 2),
            "ms_per_chunk_saved": round((torch_ms - triton_ms) * per_chunk, 1),
            "max_err_triton_vs_float32": max_error(ours, reference),
            "max_err_pytorch_vs_float32": max_error(eager, reference),
            "max_err_triton_vs_pytorch": max_error(ours, eager),
        }))  # fmt: skip
    print(json.dumps({key: round(value, 1) for key, value in totals.items()}))


if __name__ == "__main__":
    main()
