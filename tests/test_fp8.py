"""FP8 linear layers: the row-wise quantisation arithmetic, the model built with them, and where FP8 is refused.

The arithmetic is checked against values computed by hand. torch's CPU build also has a row-wise scaled
FP8 matmul, so where it does, the layers themselves run here on the CPU through the same `_scaled_mm` call
as on a GPU (the CLI still refuses `--fp8` off the GPU: the CPU kernel is a reference, not fast).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from memflow_cli.decoders import DecoderChoice, DecoderRequest
from memflow_cli.engine import load_engine
from memflow_cli.generator import MemFlowGenerator, SeededNoise
from memflow_cli.model.build import build_transformer
from memflow_cli.model.transformer import PLAIN_KERNELS, CausalWanTransformer, Kernels
from memflow_cli.output import sidecar_path
from memflow_cli.render import render_story
from memflow_cli.script import load_scripts
from memflow_cli.settings import GenerationSettings, MemorySettings, TransformerConfig, VideoGeometry
from memflow_cli.speed import fp8
from memflow_cli.speed.compile_cache import CompileChoice
from memflow_cli.speed.fp8 import (
    Fp8Linear,
    dequantise_rows,
    fp8_kernels,
    fp8_unsupported_reason,
    quantise_rows,
    quantise_with_scales,
    reference_matmul,
)
from memflow_cli.speed.linear import LinearGELU

from .test_cli import DEMO, memflow, write_story
from .video import probe_video


def as_linear_gelu(linear: torch.nn.Linear) -> LinearGELU:
    """The same weights as `linear`, as the fast path's Linear with the tanh GELU in its epilogue."""
    weight = linear.weight
    fused = LinearGELU(linear.in_features, linear.out_features, device=weight.device, dtype=weight.dtype)
    fused.load_state_dict(linear.state_dict())
    return fused


E4M3 = torch.float8_e4m3fn


def cpu_has_rowwise_fp8_matmul() -> bool:
    try:
        ones = torch.ones(16, 16).to(E4M3)
        torch._scaled_mm(ones, ones.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


needs_cpu_fp8 = pytest.mark.skipif(
    not cpu_has_rowwise_fp8_matmul(), reason=f"torch {torch.__version__} has no row-wise FP8 matmul on the CPU"
)


# ---------------------------------------------------------------------------------------------------------------------
# The arithmetic, by hand


def test_each_row_is_scaled_so_its_largest_magnitude_is_448():
    x = torch.tensor([[1.0, -2.0, 4.0, 0.0], [0.5, 0.25, -0.125, 3.1]])
    values, scales = quantise_rows(x)
    assert values.dtype == E4M3 and scales.dtype == torch.float32 and scales.shape == (2, 1)
    torch.testing.assert_close(scales, torch.tensor([[4.0 / 448], [3.1 / 448]]))
    # 1, -2, 4 at scale 4/448 are 112, -224, 448: exact in e4m3 (1.75 x 2^6, 2^7, 2^8)
    assert values[0].float().tolist() == [112.0, -224.0, 448.0, 0.0]
    # 0.5, 0.25, -0.125 at scale 3.1/448 are 72.26, 36.13, -18.06: e4m3 steps there are 8, 4 and 2
    assert values[1].float().tolist() == [72.0, 36.0, -18.0, 448.0]
    assert dequantise_rows(values, scales)[0].tolist() == [1.0, -2.0, 4.0, 0.0]
    torch.testing.assert_close(dequantise_rows(values, scales)[1, 0], torch.tensor(72 * 3.1 / 448))


def test_an_all_zero_row_comes_back_as_zeros():
    values, scales = quantise_rows(torch.zeros(2, 32))
    assert torch.isfinite(scales).all() and (scales > 0).all()
    assert dequantise_rows(values, scales).eq(0).all()


def test_values_past_the_e4m3_range_saturate_at_448():
    values = quantise_with_scales(torch.tensor([[1000.0, -1000.0, 10.0, 449.0]]), torch.tensor([[1.0]]))
    assert values.float().tolist() == [[448.0, -448.0, 10.0, 448.0]]


def test_reference_matmul_by_hand():
    x_values, x_scales = torch.tensor([[2.0, 4.0]]).to(E4M3), torch.tensor([[0.5]])  # x = [1, 2]
    w_values = torch.tensor([[1.0, 1.0], [2.0, -2.0]]).to(E4M3)
    w_scales = torch.tensor([[1.0], [0.25]])  # w = [[1, 1], [0.5, -0.5]]
    bias = torch.tensor([1.0, 0.0])
    out = reference_matmul(x_values, x_scales, w_values, w_scales, bias)
    assert out.tolist() == [[4.0, -0.5]]  # [1 + 2 + 1, 0.5 - 1]


# ---------------------------------------------------------------------------------------------------------------------
# The layer, through torch's CPU kernel


@needs_cpu_fp8
def test_fp8_linear_computes_the_dequantised_matmul():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = Fp8Linear.from_linear(linear)
    x = torch.randn(2, 5, 64)
    out = layer(x)
    assert out.shape == (2, 5, 48) and out.dtype == torch.float32
    x_values, x_scales = quantise_rows(x.flatten(0, 1))
    expected = reference_matmul(x_values, x_scales, layer.weight, layer.weight_scale, linear.bias)
    torch.testing.assert_close(out.flatten(0, 1), expected, rtol=1e-5, atol=1e-5)
    error = ((out - linear(x)).norm() / linear(x).norm()).item()
    assert 1e-3 < error < 6e-2  # quantised, not exact, and within e4m3's 3 mantissa bits
    assert sorted(layer.state_dict()) == ["bias", "weight", "weight_scale"]  # e4m3 values and their scales
    assert layer.weight.dtype == E4M3 and layer.weight_scale.shape == (48, 1)


@needs_cpu_fp8
def test_fp8_linear_in_bf16_adds_the_bias_in_bf16():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 16).bfloat16()
    layer = Fp8Linear.from_linear(linear)
    x = torch.randn(7, 32).bfloat16()
    out = layer(x)
    assert out.dtype == torch.bfloat16
    x_values, x_scales = quantise_rows(x)
    expected = reference_matmul(x_values, x_scales, layer.weight, layer.weight_scale, linear.bias)
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


@needs_cpu_fp8
def test_the_gelu_variant_applies_the_tanh_gelu_after_the_matmul():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 64)
    plain, with_gelu = Fp8Linear.from_linear(linear), Fp8Linear.from_linear(as_linear_gelu(linear), gelu=True)
    x = torch.randn(3, 32)
    torch.testing.assert_close(with_gelu(x), F.gelu(plain(x), approximate="tanh"))


# ---------------------------------------------------------------------------------------------------------------------
# A transformer built with FP8 layers

CONFIG = TransformerConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, text_dim=16, text_len=8)
GEOMETRY = VideoGeometry(height=32, width=48)


def tiny_model(config: TransformerConfig = CONFIG, kernels: Kernels = PLAIN_KERNELS) -> CausalWanTransformer:
    """The seeded tiny model's weights, in a model built with `kernels`."""
    torch.manual_seed(0)
    return build_transformer(config, CausalWanTransformer(config).state_dict(), kernels)


def render(model: CausalWanTransformer, chunks: int = 5) -> torch.Tensor:
    generator = MemFlowGenerator(model, GenerationSettings(memory=MemorySettings(record_interval=1), geometry=GEOMETRY))
    prompts = torch.randn((2, 5, CONFIG.text_dim), generator=torch.Generator().manual_seed(1))
    noise = SeededNoise(3, generator.noise_shape(), "cpu", torch.float32)
    return torch.cat(list(generator.generate(prompts, chunks, noise, switch_chunks=(3,))), dim=1)


ACCELERATED = Kernels(linear_gelu=LinearGELU, fused_qkv=True)  # the graphed and compiled paths' layers


def test_every_per_token_linear_of_a_block_is_built_in_fp8_and_the_rest_stays():
    plain = tiny_model()
    model = tiny_model(kernels=fp8_kernels(ACCELERATED))
    for plain_block, block in zip(plain.blocks, model.blocks, strict=True):
        attention, cross = block.self_attn, block.cross_attn
        assert isinstance(attention.qkv, Fp8Linear) and isinstance(attention.o, Fp8Linear)
        assert isinstance(cross.q, Fp8Linear) and isinstance(cross.o, Fp8Linear)
        assert type(cross.k) is torch.nn.Linear and type(cross.v) is torch.nn.Linear  # text keys/values: once a prompt
        assert isinstance(block.ffn[0], Fp8Linear) and block.ffn[0].gelu and isinstance(block.ffn[1], torch.nn.Identity)
        assert isinstance(block.ffn[2], Fp8Linear) and not block.ffn[2].gelu
        # the weights quantised at load, one scale per output channel: fused q/k/v rows are q's, k's, v's
        qkv = torch.cat([getattr(plain_block.self_attn, name).weight for name in "qkv"])
        values, scales = quantise_rows(qkv)
        assert torch.equal(attention.qkv.weight.float(), values.float())
        assert torch.equal(attention.qkv.weight_scale, scales)
        assert torch.equal(block.ffn[2].bias, plain_block.ffn[2].bias)
        assert torch.equal(cross.k.weight, plain_block.cross_attn.k.weight)
    assert type(model.head.head) is torch.nn.Linear and type(model.text_embedding[0]) is torch.nn.Linear
    assert next(model.parameters()).dtype == torch.float32  # the model's dtype is still what reports read


def test_the_eager_layout_keeps_its_separate_gelu():
    block = tiny_model(kernels=fp8_kernels(PLAIN_KERNELS)).blocks[0]
    assert all(isinstance(getattr(block.self_attn, name), Fp8Linear) for name in "qkvo")
    assert isinstance(block.ffn[0], Fp8Linear) and not block.ffn[0].gelu
    assert isinstance(block.ffn[1], torch.nn.GELU) and block.ffn[1].approximate == "tanh"


def test_layers_whose_sizes_the_fp8_kernel_cannot_take_stay_as_they_are():
    config = TransformerConfig(dim=40, ffn_dim=80, num_heads=2, num_layers=1, freq_dim=32, text_dim=16, text_len=8)
    model = tiny_model(config, fp8_kernels(ACCELERATED))
    assert not any(isinstance(module, Fp8Linear) for module in model.modules())
    assert type(model.blocks[0].ffn[0]) is LinearGELU


@needs_cpu_fp8
def test_an_fp8_model_renders_close_to_the_float32_one():
    expected = render(tiny_model())
    fp8_video = render(tiny_model(kernels=fp8_kernels(PLAIN_KERNELS)))
    error = ((fp8_video - expected).norm() / expected.norm()).item()
    assert torch.isfinite(fp8_video).all()
    assert 1e-4 < error < 5e-2
    fused = render(tiny_model(kernels=fp8_kernels(ACCELERATED)))  # per-output-channel scales: fusing changes little
    assert ((fused - fp8_video).norm() / fp8_video.norm()).item() < 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# Where FP8 cannot run


def test_fp8_is_refused_off_the_gpu():
    assert fp8_unsupported_reason(torch.device("cpu"), torch.float32) == (
        "needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper or later); this run uses cpu"
    )


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int], count: int = 1) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_fp8_is_refused_on_a_gpu_older_than_ada(monkeypatch):
    fake_gpu(monkeypatch, "Tesla V100-SXM2-16GB", (7, 0))
    reason = fp8_unsupported_reason(torch.device("cuda"), torch.bfloat16)
    assert reason == "needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper or later); " + (
        "Tesla V100-SXM2-16GB is 7.0"
    )
    fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0))
    assert fp8_unsupported_reason(torch.device("cuda"), torch.bfloat16).endswith("NVIDIA A100-SXM4-80GB is 8.0")


def test_fp8_is_refused_for_a_gpu_that_is_not_there(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA H200", (9, 0), count=1)
    assert fp8_unsupported_reason(torch.device("cuda:1"), torch.bfloat16).endswith(
        "there is no cuda:1 (this machine has 1 CUDA GPU(s))"
    )


def test_fp8_is_refused_for_a_float32_model(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA H200", (9, 0))
    assert fp8_unsupported_reason(torch.device("cuda"), torch.float32) == "runs bf16 models only; this one is float32"


def test_fp8_is_refused_by_a_torch_without_scaled_matmuls(monkeypatch):
    monkeypatch.delattr(torch, "_scaled_mm")
    reason = fp8_unsupported_reason(torch.device("cuda"), torch.bfloat16)
    assert reason == f"needs torch's FP8 matmul (torch._scaled_mm), which torch {torch.__version__} does not have"


@needs_cpu_fp8
def test_the_trial_matmul_passes_a_faithful_kernel():
    assert fp8._trial_matmul_failure(torch.device("cpu"), "the CPU") is None


def test_the_trial_matmul_reports_a_kernel_that_fails(monkeypatch):
    def unsupported(*args, **kwargs):
        raise RuntimeError("Rowwise scaling is not currently supported on your device\nmore detail")

    monkeypatch.setattr(fp8, "scaled_matmul", unsupported)
    assert fp8._trial_matmul_failure(torch.device("cpu"), "NVIDIA L4") == (
        f"failed a test call on NVIDIA L4: torch {torch.__version__} has no row-wise scaled FP8 matmul for it "
        "(Rowwise scaling is not currently supported on your device)"
    )


def test_the_trial_matmul_reports_a_kernel_that_computes_something_else(monkeypatch):
    def scales_swapped(x_values, x_scales, w_values, w_scales, bias, out_dtype):
        wrong = x_values.float() @ w_values.float().T  # forgets both scales
        return (wrong + bias.float()).to(out_dtype)

    monkeypatch.setattr(fp8, "scaled_matmul", scales_swapped)
    reason = fp8._trial_matmul_failure(torch.device("cpu"), "NVIDIA H200")
    assert reason is not None and reason.startswith(f"failed a test call on NVIDIA H200: torch {torch.__version__}")
    assert reason.endswith("away from float32 (relative L2)")


# ---------------------------------------------------------------------------------------------------------------------
# The commands


def test_render_fp8_off_the_gpu_is_one_line_and_nothing_written(tmp_path: Path):
    script = write_story(tmp_path / "fox.yaml", ["0s"], "3s")
    result = memflow("render", script, *DEMO, "-o", tmp_path / "fox.mp4", "--fp8")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: --fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper or later); this run uses cpu"
        " — leave out --fp8 to run the linear layers in bf16",
    ]
    assert sorted(tmp_path.iterdir()) == [script]


def test_render_fp8_is_refused_before_any_weights_are_looked_for(tmp_path: Path):
    script = write_story(tmp_path / "fox.yaml", ["0s"], "3s")
    missing = tmp_path / "no-weights-here"
    result = memflow("render", script, "--model", missing, "--device", "cpu", "-o", tmp_path / "fox.mp4", "--fp8")
    assert result.exit_code == 2  # a missing weights folder alone is exit code 1
    assert result.stderr.startswith("error: --fp8 needs a CUDA GPU") and str(missing) not in result.stderr


def test_bench_fp8_off_the_gpu_is_refused_without_a_measurement():
    result = memflow("bench", *DEMO, "--frames", "3", "--fp8")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --fp8 needs a CUDA GPU of compute capability 8.9 or newer")
    assert result.stdout == ""


@needs_cpu_fp8
def test_an_fp8_engine_renders_a_story_and_says_so_in_the_sidecar(tmp_path: Path):
    """The engine's FP8 hook, run through torch's CPU kernel (the CLI keeps --fp8 to GPUs); decoded by the demo's
    TAEHV decoder (the decoder is not the subject)."""
    tae = DecoderRequest(DecoderChoice.TAE)
    engine = load_engine("demo", "cpu", compile=CompileChoice.fixed(False), fp8=True, decoder=tae)
    assert engine.fp8 and isinstance(engine.transformer.blocks[0].ffn[0], Fp8Linear)
    (story,) = load_scripts(write_story(tmp_path / "fox.yaml", ["0s", "1s"], "3s"), 10.0, engine.geometry)
    target = tmp_path / "fox.mp4"
    result = render_story(engine, story, target, GenerationSettings(geometry=engine.geometry), seed=0)
    info = probe_video(result.path)
    assert (info.frames, info.width, info.height) == (result.timeline.video_frames, 96, 64)
    assert json.loads(sidecar_path(target).read_text(encoding="utf-8"))["fp8"] is True
