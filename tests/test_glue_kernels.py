"""The fused Triton glue (`speed.glue.TritonGlue`) computes what the plain PyTorch glue computes.

Without a GPU the kernels run in Triton's interpreter, which must be turned on (TRITON_INTERPRET=1) before
Triton is first imported (the suite's conftest imports transformers, which imports Triton): one test runs
this file again in a subprocess that way, without the conftest. Skipped where Triton is not installed. The
interpreter converts float32 to bf16 by truncation, not by rounding to nearest as the GPU does, so there
float32 is compared tightly and bf16 within a few bf16 ulps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from memflow_cli.generator import MemFlowGenerator, SeededNoise  # noqa: E402
from memflow_cli.model.glue import PLAIN_GLUE, Glue  # noqa: E402
from memflow_cli.model.transformer import CausalWanTransformer, Kernels  # noqa: E402
from memflow_cli.settings import GenerationSettings, MemorySettings, TransformerConfig, VideoGeometry  # noqa: E402
from memflow_cli.speed.glue import TritonGlue, triton_glue  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
kernels_run = pytest.mark.skipif(
    not (torch.cuda.is_available() or INTERPRETED), reason="the kernels need a GPU or the interpreter (the last test)"
)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = 1e-6
SMALL = (48, 8)  # dim, head dim
MODEL = (1536, 128)  # Wan2.1-1.3B
ROPE_DTYPE = {torch.float32: torch.float64, torch.bfloat16: torch.float32}  # as the generator makes the tables
# bf16 against eager bf16: at most 8 ulps at the value's magnitude (at least 1; one rounding that differs in
# an intermediate may cost that much after a cancellation), and on the GPU, which rounds where eager rounds
# and differs only in the order of float32 sums, at least 99% of the values identical (the interpreter
# truncates to bf16 instead, so there about half are)
BF16_ULPS = 8
BF16_IDENTICAL = 0.99
GLUE = TritonGlue()


def assert_matches(ours: torch.Tensor, expected: torch.Tensor) -> None:
    assert ours.shape == expected.shape and ours.dtype == expected.dtype
    if expected.dtype == torch.float32:
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        return
    identical = (ours == expected).float().mean().item()
    ours, expected = ours.float(), expected.float()
    ulp = torch.exp2(torch.floor(torch.log2(expected.abs().clamp(min=1.0))) - 7)
    worst = ((ours - expected).abs() / ulp).max().item()
    assert worst <= BF16_ULPS, f"{worst} bf16 ulps from eager"
    assert INTERPRETED or identical >= BF16_IDENTICAL, f"{identical:.2%} of the values are eager's"


def tokens(dim: int, dtype, frames: int = 2, per_frame: int = 5, generator=None) -> torch.Tensor:
    return torch.randn((1, frames, per_frame, dim), generator=generator, dtype=torch.float32).to(DEVICE, dtype)


def modulation(dim: int, dtype, count: int, frames: int = 2) -> tuple[torch.Tensor, ...]:
    """`count` per-frame modulations [1, F, 1, dim] as a block takes them: views of one [1, F, count, dim]."""
    return torch.randn((1, frames, count, dim)).to(DEVICE, dtype).chunk(count, dim=2)


def rope(tokens_: int, head_dim: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.rand(tokens_, head_dim // 2, dtype=torch.float64) * 40
    return tuple(t.to(DEVICE, ROPE_DTYPE[dtype])[:, None] for t in (torch.cos(angles), torch.sin(angles)))


SHAPES = [pytest.param(SMALL, id="small"), pytest.param(MODEL, id="model")]
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.bfloat16, id="bf16")]


@kernels_run
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_modulated_norm_and_the_residual_before_the_ffn(shape, dtype):
    dim, _ = shape
    torch.manual_seed(1)
    x, y = tokens(dim, dtype), tokens(dim, dtype)
    shift, scale = modulation(dim, dtype, 2)
    assert_matches(GLUE.modulated_norm(x, shift, scale, EPS), PLAIN_GLUE.modulated_norm(x, shift, scale, EPS))
    for ours, expected in zip(GLUE.residual_norm(x, y, shift, scale, EPS),
                              PLAIN_GLUE.residual_norm(x, y, shift, scale, EPS), strict=True):  # fmt: skip
        assert_matches(ours, expected)


@kernels_run
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual(shape, dtype):
    dim, _ = shape
    torch.manual_seed(2)
    x, y = tokens(dim, dtype, per_frame=7), tokens(dim, dtype, per_frame=7)
    gate = modulation(dim, dtype, 4)[3]
    assert_matches(GLUE.gated_residual(x, y, gate), PLAIN_GLUE.gated_residual(x, y, gate))


@kernels_run
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_query_and_key_norm_and_rotary_from_a_fused_projection(shape, dtype):
    """q and k are views of one qkv output (rows 3*dim apart); the result is [B, H, N, D] over [B, N, H, D]."""
    dim, head_dim = shape
    torch.manual_seed(3)
    n = 11
    q, k, _ = torch.randn((1, n, 3 * dim)).to(DEVICE, dtype).chunk(3, dim=-1)
    weight = (1 + 0.1 * torch.randn(dim)).to(DEVICE, dtype)
    tables = rope(n, head_dim, dtype)
    for x in (q, k, q.contiguous()):
        ours = GLUE.rms_norm_rope(x, weight, EPS, tables)
        expected = PLAIN_GLUE.rms_norm_rope(x, weight, EPS, tables)
        assert ours.shape == (1, dim // head_dim, n, head_dim) and ours.stride() == expected.stride()  # [B, N, H, D]
        assert_matches(ours, expected)
    assert_matches(GLUE.rms_norm(q, weight, EPS), PLAIN_GLUE.rms_norm(q, weight, EPS))  # cross-attention's query


@kernels_run
def test_the_first_blocks_transposed_tokens_and_a_wrong_modulation():
    """Block 0 gets the patch embedding's tokens as a transposed view; a modulation must be one per frame."""
    dim = SMALL[0]
    torch.manual_seed(4)
    x = torch.randn((1, dim, 10)).to(DEVICE).transpose(1, 2).unflatten(1, (2, 5))  # [1, 2, 5, dim], stride 10 on dim
    y = tokens(dim, torch.float32)
    gate = modulation(dim, torch.float32, 4)[0]
    assert x.stride(-1) != 1
    assert_matches(GLUE.gated_residual(x, y, gate), PLAIN_GLUE.gated_residual(x, y, gate))
    shift, scale = modulation(dim, torch.float32, 2)
    torch.testing.assert_close(
        GLUE.modulated_norm(x, shift, scale, EPS), PLAIN_GLUE.modulated_norm(x, shift, scale, EPS)
    )
    with pytest.raises(ValueError, match="does not fit tokens"):
        GLUE.modulated_norm(x, shift[:, :1], scale[:, :1], EPS)


CONFIG = TransformerConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, text_dim=16, text_len=8)
GEOMETRY = VideoGeometry(height=32, width=48)  # 6 tokens per frame


def render(model: CausalWanTransformer, chunks: int = 1) -> torch.Tensor:
    generator = MemFlowGenerator(model, GenerationSettings(memory=MemorySettings(record_interval=1), geometry=GEOMETRY))
    prompts = torch.randn((1, 5, CONFIG.text_dim), generator=torch.Generator().manual_seed(1))
    noise = SeededNoise(3, generator.noise_shape(), DEVICE.type, torch.float32)
    return torch.cat(list(generator.generate(prompts.to(DEVICE), chunks, noise)), dim=1)


@kernels_run
def test_a_model_built_with_the_triton_glue_renders_the_plain_models_video():
    torch.manual_seed(0)
    plain = CausalWanTransformer(CONFIG).eval().requires_grad_(False).to(DEVICE)
    glue = triton_glue(CONFIG.dim, CONFIG.head_dim, DEVICE, torch.float32)
    assert glue.warm_up_s is not None and glue.warm_up_s >= 0
    fused = CausalWanTransformer(CONFIG, Kernels(glue=glue)).eval().requires_grad_(False).to(DEVICE)
    fused.load_state_dict(plain.state_dict())
    modules = [(name, type(module)) for name, module in fused.named_modules()]
    assert modules == [(name, type(module)) for name, module in plain.named_modules()]  # only the glue differs
    assert all(block.glue is glue and block.self_attn.glue is glue for block in fused.blocks)
    assert type(plain.blocks[0].glue) is Glue

    video = render(fused)
    assert [(name, type(module)) for name, module in fused.named_modules()] == modules  # nothing swapped
    torch.testing.assert_close(video, render(plain), rtol=1e-4, atol=1e-4)


def sm90_signature(kernel, pointer: str, rope: str, constants: dict) -> dict:
    """The argument types of `kernel` for `triton.compile`: pointers to `pointer` (the tables to `rope`)."""
    types = {"eps": "fp32", "cos_ptr": f"*{rope}", "sin_ptr": f"*{rope}"}
    names = kernel.arg_names
    return {n: "constexpr" if n in constants else types.get(n, f"*{pointer}" if n.endswith("_ptr") else "i32")
            for n in names}  # fmt: skip


@pytest.mark.skipif(INTERPRETED, reason="compiles the real kernels (the interpreter has none)")
def test_the_kernels_compile_for_hopper_without_a_gpu(monkeypatch, tmp_path):
    """What the interpreter never checks: each kernel, as `warm_up` specialises it for the 1.3B model in bf16,
    compiles to an sm_90 binary (Triton's own compiler and ptxas, no GPU needed; an empty cache folder)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource).parameters:  # Triton < 3.3 (torch < 2.7) compiles otherwise
        pytest.skip(f"Triton {triton.__version__}: this test uses the compile API of Triton 3.3 and later")

    from memflow_cli.speed import glue

    dim = {"DIM": MODEL[0], "BLOCK": 2048}
    variants = [
        (glue._modulated_norm_kernel, {**dim, "RESIDUAL": False}),
        (glue._modulated_norm_kernel, {**dim, "RESIDUAL": True}),
        (glue._gated_residual_kernel, dim),
        (glue._rms_norm_kernel, {**dim, "ROPE": False, "HALF_HEAD": 1}),
        (glue._rms_norm_kernel, {**dim, "ROPE": True, "HALF_HEAD": MODEL[1] // 2}),
    ]
    for kernel, constants in variants:
        source = ASTSource(kernel, sm90_signature(kernel, "bf16", "fp32", constants), constexprs=constants)
        binary = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": glue.WARPS})
        assert binary.asm["cubin"] and f".entry {kernel.__name__}" in binary.asm["ptx"]


@pytest.mark.skipif(torch.cuda.is_available() or INTERPRETED, reason="runs the tests above where they run")
def test_the_kernels_in_tritons_interpreter():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", __file__]
    run = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1] and "failed" not in run.stdout.splitlines()[-1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("graphs", [True, False], ids=["triton-graphed", "triton"])
def test_the_triton_paths_render_the_eager_bf16_video(graphs):
    """bf16 on the GPU, the fast path built as `load_engine` builds it: no kernel compiled after the load, every
    repeated pass captured where it has graphs, and the video within bf16 noise of the plain eager model's
    (relative L2, as test_gpu_fast)."""
    import warnings

    from memflow_cli.model.build import build_transformer
    from memflow_cli.speed import choose_fast_path
    from memflow_cli.speed.graphs import GraphedPasses

    config = TransformerConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_len=32)
    device = torch.device("cuda")
    fast = choose_fast_path(config, device, torch.bfloat16, compile=None if graphs else False, glue=True)
    assert fast.name == ("triton-graphed" if graphs else "triton") and isinstance(fast.kernels.glue, TritonGlue)
    assert fast.kernels.glue.warm_up_s is not None
    torch.manual_seed(0)
    state = {k: v.to(device, torch.bfloat16) for k, v in CausalWanTransformer(config).state_dict().items()}
    plain = build_transformer(config, dict(state), Kernels())
    model = build_transformer(config, state, fast.kernels)
    settings = GenerationSettings(memory=MemorySettings(record_interval=1, sma=True), geometry=VideoGeometry(64, 96))
    prompts = torch.randn(2, 32, config.text_dim, generator=torch.Generator().manual_seed(1))
    made: list[GraphedPasses] = []

    def graphed(run_pass):
        made.append(GraphedPasses(run_pass))
        return made[-1]

    def video(model: CausalWanTransformer, passes) -> torch.Tensor:
        generator = MemFlowGenerator(model, settings, passes=passes)
        noise = SeededNoise(3, generator.noise_shape(), device, torch.bfloat16)
        with fast.sdpa_priority():
            return torch.cat(list(generator.generate(prompts, 12, noise, switch_chunks=(8,))), dim=1).float()

    jit_misses: list[str] = []

    def on_jit_miss(*args, **kwargs) -> bool:
        jit_misses.append(str(kwargs.get("repr")))
        return False  # compile as usual

    runtime = triton.knobs.runtime
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "CUDA graph capture failed" would be a warning
        runtime.jit_cache_hook = on_jit_miss
        try:
            ours = video(model, graphed if graphs else None)
        finally:
            runtime.jit_cache_hook = None
    assert jit_misses == []  # `warm_up` compiled every kernel the render ran: no JIT in the middle of a render
    expected = video(plain, None)
    if graphs:
        (passes,) = made
        assert passes.graphs and not passes.uncapturable
    error = ((ours - expected).norm() / expected.norm()).item()
    assert error < 2e-2, error
