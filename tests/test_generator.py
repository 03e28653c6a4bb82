"""The chunk loop on a tiny random model: determinism, memory modes, streaming shapes, bad arguments."""

from __future__ import annotations

import pytest
import torch

from memflow_cli.generator import MemFlowGenerator, ScriptedPrompts, SeededNoise
from memflow_cli.model.build import build_transformer
from memflow_cli.model.transformer import CausalWanTransformer, Kernels
from memflow_cli.settings import GenerationSettings, MemorySettings, SettingsError, TransformerConfig, VideoGeometry
from memflow_cli.speed.attention import heads_last
from memflow_cli.speed.linear import LinearGELU

from .attention import flash_layout_sdpa

CONFIG = TransformerConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, text_dim=16, text_len=8)
GEOMETRY = VideoGeometry(height=32, width=48)  # latent 4x6 -> 6 tokens per frame


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CausalWanTransformer(CONFIG).eval().requires_grad_(False)


def render(model, memory: MemorySettings, chunks: int = 6, seed: int = 3, switch_chunks=()) -> torch.Tensor:
    generator = MemFlowGenerator(model, GenerationSettings(memory=memory, geometry=GEOMETRY))
    prompts = torch.randn((len(switch_chunks) + 1, 5, CONFIG.text_dim), generator=torch.Generator().manual_seed(1))
    noise = SeededNoise(seed, generator.noise_shape(), "cpu", torch.float32)
    return torch.cat(list(generator.generate(prompts, chunks, noise, switch_chunks)), dim=1)


def test_chunks_have_the_latent_shape(model):
    video = render(model, MemorySettings(), chunks=4)
    assert video.shape == (1, 12, 16, 4, 6)
    assert torch.isfinite(video).all()


def test_same_seed_same_video_other_seed_other_video(model):
    memory = MemorySettings(record_interval=1)
    assert torch.equal(render(model, memory), render(model, memory))
    assert not torch.allclose(render(model, memory), render(model, memory, seed=4))


def test_memory_modes_differ_once_the_window_is_full(model):
    nam, sink, none = (render(model, MemorySettings(mode=m), chunks=8) for m in ("nam", "sink", "none"))
    first = slice(0, 3)  # chunk 0 sees only itself in every mode
    assert torch.allclose(nam[:, first], sink[:, first]) and torch.allclose(sink[:, first], none[:, first])
    assert not torch.allclose(nam, sink) and not torch.allclose(sink, none)


def test_bank_without_a_sink_is_never_attended(model):
    """With sink 0 the released code ignores the bank: nam then computes exactly what `none` does."""
    without_sink = render(model, MemorySettings(mode="nam", sink=0, record_interval=1), chunks=8)
    local_only = render(model, MemorySettings(mode="none"), chunks=8)
    assert torch.equal(without_sink, local_only)


def test_prompt_switch_changes_only_later_chunks(model):
    steady = render(model, MemorySettings(), chunks=6, switch_chunks=(6,))  # a switch that never comes
    switched = render(model, MemorySettings(), chunks=6, switch_chunks=(4,))
    assert torch.allclose(steady[:, :12], switched[:, :12])
    assert not torch.allclose(steady[:, 12:], switched[:, 12:])


def test_a_story_switching_later_resumes_from_a_switchable_point_of_one_that_goes_on(model):
    """A point at a chunk where the prompt goes on (`switchable`) is where another story could switch: a story that
    does switch there, resumed from it, equals that story rendered whole. Chunk 0-3 are the same in both."""
    settings = GenerationSettings(memory=MemorySettings(record_interval=1), geometry=GEOMETRY)
    prompts = torch.randn((2, 5, CONFIG.text_dim), generator=torch.Generator().manual_seed(1))

    def stream(embeds, switches, **kwargs):
        generator = MemFlowGenerator(model, settings)
        noise = SeededNoise(3, generator.noise_shape(), "cpu", torch.float32)
        prompts = ScriptedPrompts(embeds, switches, 6)
        return list(generator.stream(prompts, noise, interactive=True, **kwargs))

    points = []
    going_on = stream(prompts[:1], (), boundaries=points.append, switchable={4})
    assert [point.chunk for point in points] == [4, 6]  # the asked one and the end
    switching = stream(prompts, (4,))
    resumed = stream(prompts, (4,), resume=points[0])
    assert all(torch.equal(a, b) for a, b in zip(going_on[:4], switching[:4], strict=True))
    assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(resumed, switching[4:], strict=True))
    assert not torch.allclose(switching[4], going_on[4])


def test_switch_count_must_match_prompts(model):
    generator = MemFlowGenerator(model, GenerationSettings(geometry=GEOMETRY))
    noise = SeededNoise(0, generator.noise_shape(), "cpu", torch.float32)
    with pytest.raises(ValueError, match="3 prompts need 2 switch chunks"):
        next(generator.generate(torch.zeros(3, 5, CONFIG.text_dim), 4, noise, (2,)))


def test_window_must_hold_a_chunk_beside_the_sink():
    with pytest.raises(SettingsError, match="window"):
        GenerationSettings(memory=MemorySettings(window=5, sink=3))


def test_fused_qkv_projection_renders_the_same_video(model):
    memory = MemorySettings(record_interval=1, sma=True)
    expected = render(model, memory, switch_chunks=(3,))
    fused = build_transformer(CONFIG, dict(model.state_dict()), Kernels(fused_qkv=True))  # the checkpoint's names

    attn = fused.blocks[0].self_attn
    assert attn.qkv.weight.shape == (3 * CONFIG.dim, CONFIG.dim) and not hasattr(attn, "q")
    source = model.blocks[0].self_attn
    assert torch.equal(attn.qkv.weight, torch.cat([source.q.weight, source.k.weight, source.v.weight]))
    torch.testing.assert_close(render(fused, memory, switch_chunks=(3,)), expected, rtol=1e-5, atol=1e-5)


def test_fused_ffn_activation_renders_the_same_video(model):
    memory = MemorySettings(record_interval=1)
    expected = render(model, memory, switch_chunks=(3,))
    fused = CausalWanTransformer(CONFIG, Kernels(linear_gelu=LinearGELU)).eval().requires_grad_(False)
    fused.load_state_dict(model.state_dict())
    names = sorted(model.state_dict())

    assert isinstance(fused.blocks[0].ffn[0], LinearGELU) and isinstance(fused.blocks[0].ffn[1], torch.nn.Identity)
    assert sorted(fused.state_dict()) == names  # checkpoints keep Wan's names
    torch.testing.assert_close(render(fused, memory, switch_chunks=(3,)), expected, rtol=1e-5, atol=1e-5)


def test_a_flash_attn_layout_kernel_renders_the_same_video(model):
    """Self-attention through a kernel with flash-attn's calling convention (how flash-attn 3 is plugged in)."""
    memory = MemorySettings(record_interval=1, sma=True)
    expected = render(model, memory, switch_chunks=(3,))
    flash_model = CausalWanTransformer(CONFIG, Kernels(attention=heads_last(flash_layout_sdpa)))
    flash_model.load_state_dict(model.state_dict())
    flash = render(flash_model.eval().requires_grad_(False), memory, switch_chunks=(3,))
    torch.testing.assert_close(flash, expected, rtol=1e-5, atol=1e-5)
