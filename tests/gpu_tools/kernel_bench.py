"""Times the transformer's hot kernels at the 1.3B model's shapes on one GPU, one chunk at 832x480.

Linear layers (4680 tokens): bf16 as the fast path runs them (fused q/k/v, the FFN's GELU in cuBLASLt's
epilogue) against FP8 (`memflow_cli.speed.fp8`): the FP8 GEMM alone on pre-quantised inputs, and the whole layer
(quantising its input on the fly), eager and compiled. Self-attention (4680 queries, 23400 keys: nam's
window and bank, 12 heads of 128): torch SDPA per backend and each installed flash-attn 3 module.
Each kernel's error is its relative L2 distance to float32. Not part of the test suite or the package.

    PYTHONPATH=. python tests/gpu_tools/kernel_bench.py [--no-compile] [--iters 50]

Prints a table, then one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from memflow_cli.speed.attention import FLASH_ATTENTION_3_MODULES, heads_last
from memflow_cli.speed.fp8 import Fp8Linear, quantise_rows, scaled_matmul

TOKENS = 4680  # one chunk: 3 latent frames x 1560 tokens
KEYS = 23400  # 15 frames: window 12 + bank 3
HEADS, HEAD_DIM = 12, 128
BLOCKS, PASSES = 30, 5  # a steady chunk runs five passes of thirty blocks
# (name, in, out, layers of this shape per block on the bf16 fast path, on the FP8 path)
LINEARS = [
    ("qkv (fused)", 1536, 4608, 1, 0),
    ("q/k/v/o, cross q/o", 1536, 1536, 3, 6),
    ("ffn 1 (+gelu)", 1536, 8960, 1, 1),
    ("ffn 2", 8960, 1536, 1, 1),
]


def time_ms(function: Callable[[], object], iters: int, warmup: int = 10) -> float:
    """Median GPU time of one call, from CUDA events around each call."""
    for _ in range(warmup):
        function()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends, strict=True):
        start.record()
        function()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def relative_l2(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return ((ours.float() - expected).norm() / expected.norm()).item()


def linear_rows(name: str, k: int, n: int, gelu: bool, iters: int, compile: bool) -> list[dict]:
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((TOKENS, k), generator=generator, device="cuda").bfloat16()
    linear = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(linear.weight, std=k**-0.5, generator=generator)
    expected = F.linear(x.float(), linear.weight.float(), linear.bias.float())
    if gelu:
        expected = F.gelu(expected, approximate="tanh")
    flops = 2 * TOKENS * k * n

    def bf16() -> torch.Tensor:
        if gelu:
            return torch._addmm_activation(linear.bias, x, linear.weight.t(), use_gelu=True)
        return F.linear(x, linear.weight, linear.bias)

    layer = Fp8Linear.from_linear(linear, gelu=gelu)
    x_values, x_scales = quantise_rows(x)

    def fp8_gemm() -> torch.Tensor:  # the GELU, where the layer has one, is left out of the timing
        return scaled_matmul(x_values, x_scales, layer.weight, layer.weight_scale, layer.bias, torch.bfloat16)

    variants: dict[str, Callable[[], torch.Tensor]] = {
        "bf16": bf16,
        "fp8 gemm only": fp8_gemm,
        "fp8 quantise only (eager)": lambda: quantise_rows(x)[0],
        "fp8 layer (eager)": lambda: layer(x),
    }
    if compile:
        compiled_layer = torch.compile(layer, dynamic=False)
        variants["fp8 layer (compiled)"] = lambda: compiled_layer(x)
    rows = []
    with torch.no_grad():
        for variant, function in variants.items():
            ms = time_ms(function, iters)
            is_matmul = "quantise" not in variant
            out = function()
            if variant == "fp8 gemm only" and gelu:
                out = F.gelu(out, approximate="tanh")
            error = relative_l2(out, expected) if is_matmul else None
            rows.append({
                "kernel": f"linear {name}", "shape": f"[{TOKENS}x{k}]x[{k}x{n}]", "variant": variant, "ms": ms,
                "tflops": flops / ms / 1e9 if is_matmul else None, "rel_l2_vs_fp32": error,
            })  # fmt: skip
    return rows


def attention_kernels() -> dict[str, Callable[..., torch.Tensor]]:
    kernels: dict[str, Callable[..., torch.Tensor]] = {}
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):

        def sdpa(q, k, v, backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        kernels[f"sdpa {backend.name.lower()}"] = sdpa
    for module in FLASH_ATTENTION_3_MODULES:
        try:
            kernels[f"flash-attn 3 ({module})"] = heads_last(importlib.import_module(module).flash_attn_func)
        except ImportError as error:
            print(f"# {module}: not available ({error})")
    return kernels


def attention_rows(iters: int) -> list[dict]:
    """q in the model's [B, N, H, D] memory seen as [B, H, N, D]; keys and values strided cache slices."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn((1, TOKENS, HEADS, HEAD_DIM), generator=generator, device="cuda").bfloat16().transpose(1, 2)
    cache = torch.randn((2, 1, HEADS, KEYS + 1560, HEAD_DIM), generator=generator, device="cuda").bfloat16()
    k, v = cache[0, :, :, :KEYS], cache[1, :, :, :KEYS]
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    flops = 4 * HEADS * TOKENS * KEYS * HEAD_DIM
    rows = []
    with torch.no_grad():
        for name, kernel in attention_kernels().items():
            try:
                ms = time_ms(lambda kernel=kernel: kernel(q, k, v), iters)
                error = relative_l2(kernel(q, k, v), expected)
            except RuntimeError as failure:
                print(f"# {name}: failed ({str(failure).splitlines()[0]})")
                continue
            rows.append({
                "kernel": "self-attention", "shape": f"q {TOKENS}, keys {KEYS}, {HEADS}x{HEAD_DIM}",
                "variant": name, "ms": ms, "tflops": flops / ms / 1e9, "rel_l2_vs_fp32": error,
            })  # fmt: skip
    return rows


def chunk_estimate(rows: list[dict]) -> dict[str, float]:
    """The linear layers' milliseconds per steady chunk (30 blocks x 5 passes), bf16 against FP8 layers."""
    ms = {(r["kernel"], r["variant"]): r["ms"] for r in rows}
    totals: dict[str, float] = {}
    for variant in ("bf16", "fp8 layer (eager)", "fp8 layer (compiled)", "fp8 gemm only"):
        count_index = 3 if variant == "bf16" else 4
        try:
            per_block = sum(ms[(f"linear {spec[0]}", variant)] * spec[count_index] for spec in LINEARS)
        except KeyError:
            continue
        totals[f"linears per chunk, {variant} (ms)"] = per_block * BLOCKS * PASSES
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled FP8 layer")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows: list[dict] = []
    for name, k, n, _, _ in LINEARS:
        rows += linear_rows(name, k, n, gelu="gelu" in name, iters=args.iters, compile=not args.no_compile)
    rows += attention_rows(args.iters)
    print(f"{'kernel':<28} {'variant':<38} {'ms':>8} {'TFLOP/s':>8} {'rel L2':>9}")
    for r in rows:
        tflops = f"{r['tflops']:.0f}" if r["tflops"] else "-"
        error = f"{r['rel_l2_vs_fp32']:.2e}" if r["rel_l2_vs_fp32"] is not None else "-"
        print(f"{r['kernel']:<28} {r['variant']:<38} {r['ms']:>8.3f} {tflops:>8} {error:>9}")
    for label, value in chunk_estimate(rows).items():
        print(f"{label}: {value:.1f}")
    for r in rows:
        rounded = {key: round(value, 4) if isinstance(value, float) else value for key, value in r.items()}
        print(json.dumps(rounded | {"device": torch.cuda.get_device_name(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
