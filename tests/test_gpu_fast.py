"""The fast path's GPU-only kernels compute what the plain modules compute (skipped without a GPU)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from memflow_cli.decode import StreamingDecoder
from memflow_cli.generator import MemFlowGenerator, SeededNoise
from memflow_cli.model.build import build_transformer
from memflow_cli.model.transformer import CausalWanTransformer
from memflow_cli.settings import GenerationSettings, MemorySettings, TransformerConfig, VideoGeometry
from memflow_cli.speed import choose_fast_path
from memflow_cli.speed.attention import (
    FLASH_ATTENTION_3,
    FLASH_ATTENTION_3_MODULES,
    SDPA,
    flash_attention_3,
    self_attention_kernel,
)
from memflow_cli.speed.decoder import channels_last_convs, fused_decoder_kernels
from memflow_cli.speed.graphs import GraphedPasses
from memflow_cli.speed.linear import LinearGELU
from memflow_cli.vae_stream import padded_channels, residual_sum, upsample_nearest
from memflow_cli.wan_vae import WanVAE, WanVAEConfig
from memflow_cli.weights import WAN21_VAE_CONFIG

from .attention import flash_layout_sdpa

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_linear_gelu_epilogue_is_the_tanh_gelu():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512).cuda()
    x = torch.randn(3, 40, 256, device="cuda")
    fused = LinearGELU(256, 512).cuda()
    fused.load_state_dict(linear.state_dict())
    with torch.no_grad():
        ours = fused(x)
        tanh = F.gelu(linear(x), approximate="tanh")
        erf = F.gelu(linear(x))
    assert ours.shape == (3, 40, 512)
    torch.testing.assert_close(ours, tanh, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, erf, rtol=1e-4, atol=1e-5)


def _decode(decoder: StreamingDecoder, latents: torch.Tensor) -> torch.Tensor:
    return torch.cat([decoder.decode_float(chunk) for chunk in latents.split(3, dim=1)])


def test_compiled_decoder_kernels_are_as_faithful_as_the_eager_ones():
    """bf16 decodes, eager and compiled, against the float32 decode of the same random VAE (Wan2.1's layout).

    Its last stage has the real 96 channels, so the compiled path computes them with tiled filters.
    """
    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig.from_diffusers(WAN21_VAE_CONFIG)).to("cuda").eval()
    channels_last_convs(vae)
    latents = torch.randn(1, 7, 16, 12, 20, device="cuda")
    expected = _decode(StreamingDecoder(vae), latents)
    vae.to(torch.bfloat16)
    eager = _decode(StreamingDecoder(vae), latents)
    kernels = fused_decoder_kernels()
    widths = {conv.out_channels for conv in vae.decoder.modules() if isinstance(conv, torch.nn.Conv3d)}
    assert padded_channels(96, kernels.channel_tile) == 128 and 96 in widths  # the tiled filters are exercised
    compiled_decoder = StreamingDecoder(vae, kernels=kernels)
    compiled = _decode(compiled_decoder, latents)

    def error(x: torch.Tensor, reference: torch.Tensor = expected) -> float:
        return ((x - reference).norm() / reference.norm()).item()

    assert compiled.shape == expected.shape == (25, 3, 96, 160)
    assert error(compiled) < 5e-2
    assert error(compiled) <= 1.1 * error(eager)

    # new weights in the 96-channel convs, and a reset: the next video is decoded with them, not stale tiled copies
    with torch.no_grad():
        for conv in vae.decoder.modules():
            if isinstance(conv, torch.nn.Conv3d) and conv.out_channels == 96:
                conv.weight.mul_(-1.0)
    eager_after = _decode(StreamingDecoder(vae), latents)
    compiled_decoder.reset()
    compiled_after = _decode(compiled_decoder, latents)
    assert error(compiled_after, eager_after) < 5e-2
    assert error(compiled_after, eager_after) < 0.5 * error(compiled, eager_after)


def test_compiled_residual_sum_and_upsample_round_like_eager():
    """The fused bias + residual rounds where eager PyTorch rounds; the upsample copies the same values."""
    kernels = fused_decoder_kernels()
    torch.manual_seed(0)
    layout = torch.channels_last_3d
    x, shortcut = (
        torch.randn(1, 32, 3, 24, 40, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=layout)
        for _ in range(2)
    )
    bias = torch.randn(32, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(kernels.residual(x, bias, shortcut), residual_sum(x, bias, shortcut))
    images = x.transpose(1, 2).flatten(0, 1)  # [3, 32, 24, 40], channels last
    upsampled = kernels.upsample(images, (2.0, 2.0), "nearest-exact")
    assert upsampled.shape == (3, 32, 48, 80)
    assert torch.equal(upsampled, upsample_nearest(images, (2.0, 2.0), "nearest-exact"))


@pytest.mark.parametrize("sma", [False, True], ids=["nam", "nam+sma"])
def test_cuda_graph_replays_render_the_video_of_plain_passes(sma):
    config = TransformerConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_len=32)
    torch.manual_seed(0)
    model = CausalWanTransformer(config).cuda().eval().requires_grad_(False)
    settings = GenerationSettings(memory=MemorySettings(record_interval=1, sma=sma), geometry=VideoGeometry(64, 96))
    prompts = torch.randn(2, 32, config.text_dim, generator=torch.Generator().manual_seed(1))

    def render(cuda_graphs: bool) -> torch.Tensor:
        generator = MemFlowGenerator(model, settings, passes=GraphedPasses if cuda_graphs else None)
        noise = SeededNoise(3, generator.noise_shape(), "cuda", torch.float32)
        return torch.cat(list(generator.generate(prompts, 12, noise, switch_chunks=(8,))), dim=1)

    expected = render(cuda_graphs=False)
    torch.testing.assert_close(render(cuda_graphs=True), expected, rtol=1e-5, atol=1e-5)


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not HOPPER, reason="flash-attn 3 runs on Hopper GPUs only")
def test_flash_attn_3_is_taken_on_hopper_once_it_agrees_with_sdpa(monkeypatch):
    cuda = torch.device("cuda")
    for name in FLASH_ATTENTION_3_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # None: not installed
    assert self_attention_kernel(cuda, 12, 128, torch.bfloat16)[0] == SDPA
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", SimpleNamespace(flash_attn_func=flash_layout_sdpa))
    assert self_attention_kernel(cuda, 12, 128, torch.bfloat16)[0] == f"{FLASH_ATTENTION_3} (fa3_fwd_interface)"
    assert self_attention_kernel(cuda, 12, 128, torch.float32)[0] == SDPA  # no float32 kernels


@pytest.mark.skipif(not HOPPER or flash_attention_3() is None, reason="needs flash-attn 3 on a Hopper GPU")
def test_flash_attn_3_renders_what_sdpa_renders():
    """Where flash-attn 3 is installed: bf16 with CUDA graphs, flash-attn 3 against SDPA for self-attention."""
    config = TransformerConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_len=32)
    torch.manual_seed(0)
    model = CausalWanTransformer(config).to("cuda", torch.bfloat16).eval().requires_grad_(False)
    settings = GenerationSettings(memory=MemorySettings(record_interval=1, sma=True), geometry=VideoGeometry(64, 96))
    prompts = torch.randn(2, 32, config.text_dim, generator=torch.Generator().manual_seed(1))

    def render(model: CausalWanTransformer) -> torch.Tensor:
        generator = MemFlowGenerator(model, settings, passes=GraphedPasses)
        noise = SeededNoise(3, generator.noise_shape(), "cuda", torch.bfloat16)
        return torch.cat(list(generator.generate(prompts, 12, noise, switch_chunks=(8,))), dim=1).float()

    expected = render(model)
    fast = choose_fast_path(config, torch.device("cuda"), torch.bfloat16, compile=False)
    assert fast.self_attention == f"{FLASH_ATTENTION_3} ({flash_attention_3()[0]})"
    flash_model = CausalWanTransformer(config, fast.kernels).to("cuda", torch.bfloat16).eval().requires_grad_(False)
    flash_model.load_state_dict(model.state_dict())
    error = ((render(flash_model) - expected).norm() / expected.norm()).item()
    assert error < 2e-2


def test_steady_state_chunks_and_later_switches_compile_nothing_new():
    """The fast path compiles while the cache and bank fill and at the first switch, then never again.

    Once warm (window and bank full, one re-cache done), further chunks and a second switch must run on the
    graphs already built: dynamo is told to fail on any recompile, and no new graph may appear.
    """
    import torch._dynamo.utils

    config = TransformerConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_len=32)
    device = torch.device("cuda")
    fast = choose_fast_path(config, device, torch.bfloat16, compile=True)
    torch.manual_seed(0)
    weights = {k: v.to(device, torch.bfloat16) for k, v in CausalWanTransformer(config).state_dict().items()}
    model = build_transformer(config, weights, fast.kernels)
    settings = GenerationSettings(memory=MemorySettings(record_interval=1, sma=True), geometry=VideoGeometry(64, 96))
    prompts = torch.randn(3, 32, config.text_dim, generator=torch.Generator().manual_seed(1))
    generator = MemFlowGenerator(model, settings, passes=fast.graphed_passes)
    noise = SeededNoise(3, generator.noise_shape(), device, torch.bfloat16)
    counters = torch._dynamo.utils.counters
    with fast.sdpa_priority():
        chunks = generator.generate(prompts, 16, noise, switch_chunks=(6, 12))
        warm = [next(chunks) for _ in range(9)]  # window (4 chunks) and bank (3 frames) full, first switch done
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0  # the warm-up did compile
        with torch._dynamo.config.patch(error_on_recompile=True):
            steady = list(chunks)  # chunks 9..15, the second switch at 12 among them
    assert len(warm) + len(steady) == 16
    assert counters["stats"]["unique_graphs"] == graphs
    assert all(torch.isfinite(chunk).all() for chunk in steady)


@pytest.mark.parametrize("sma", [False, True], ids=["nam", "nam+sma"])
def test_the_default_path_replays_cuda_graphs_of_its_eager_passes_and_compiles_nothing(sma):
    """The graphed path (the default on CUDA): every repeated pass captured (no capture falls back to eager),
    nothing compiled by dynamo, and the video of the same layers run without graphs."""
    import warnings

    import torch._dynamo.utils

    config = TransformerConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_len=32)
    device = torch.device("cuda")
    fast = choose_fast_path(config, device, torch.bfloat16)
    assert fast.name == "graphed" and not fast.compile and fast.kernels.fused_qkv
    torch.manual_seed(0)
    weights = {k: v.to(device, torch.bfloat16) for k, v in CausalWanTransformer(config).state_dict().items()}
    model = build_transformer(config, weights, fast.kernels)
    settings = GenerationSettings(memory=MemorySettings(record_interval=1, sma=sma), geometry=VideoGeometry(64, 96))
    prompts = torch.randn(2, 32, config.text_dim, generator=torch.Generator().manual_seed(1))
    made: list[GraphedPasses] = []

    def graphed(run_pass):
        made.append(GraphedPasses(run_pass))
        return made[-1]

    def render(passes) -> torch.Tensor:
        generator = MemFlowGenerator(model, settings, passes=passes)
        noise = SeededNoise(3, generator.noise_shape(), device, torch.bfloat16)
        with fast.sdpa_priority():
            return torch.cat(list(generator.generate(prompts, 12, noise, switch_chunks=(8,))), dim=1).float()

    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "CUDA graph capture failed" would be a warning
        video = render(graphed)
    expected = render(None)
    (passes,) = made
    assert passes.graphs and not passes.uncapturable
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before
    print(f"graphed vs plain passes, same layers: equal={torch.equal(video, expected)}, {len(passes.graphs)} graphs")
    torch.testing.assert_close(video, expected, rtol=1e-2, atol=1e-2)
