"""The fast model is built, not patched: each engine builder and the checkpoint loader build the transformer
with the fast path's kernels, its weights already in their layers' form, and nothing changes it afterwards."""

from __future__ import annotations

from dataclasses import replace

import torch

from memflow_cli import engine as engine_module
from memflow_cli.checkpoint import load_transformer
from memflow_cli.engine import Video, load_engine
from memflow_cli.model.transformer import CausalWanTransformer, Kernels
from memflow_cli.settings import GenerationSettings, TransformerConfig
from memflow_cli.speed import EAGER, FastPath
from memflow_cli.speed.linear import LinearGELU

from .test_checkpoint import CONFIG, LORA, save_base
from .test_checkpoint import lora_sd as lora_sd  # noqa: F401 - a fixture
from .test_checkpoint import weights as weights  # noqa: F401 - a fixture

PROMPTS = ("a red fox trots across a snowy field", "the fox stops at the edge of a pine forest")


class CountingStep:
    """A `Kernels.block_step` that runs each step as it is and counts the calls (as `compiled` wraps them)."""

    def __init__(self):
        self.calls: dict[str, int] = {}

    def __call__(self, step):
        def run(*args, **kwargs):
            self.calls[step.__name__] = self.calls.get(step.__name__, 0) + 1
            return step(*args, **kwargs)

        return run


def accelerated(block_step: CountingStep) -> FastPath:
    """The graphed/compiled paths' layers, runnable on the CPU (LinearGELU runs its plain form there)."""
    return replace(EAGER, kernels=Kernels(linear_gelu=LinearGELU, fused_qkv=True, block_step=block_step))


def structure(model: torch.nn.Module) -> list[tuple[str, type, tuple[int, ...], torch.dtype]]:
    """Every module's name and type, and every tensor's name, shape and dtype."""
    modules = [(name, type(module), (), torch.float32) for name, module in model.named_modules()]
    return modules + [(name, type(t), tuple(t.shape), t.dtype) for name, t in model.state_dict().items()]


def stream_video(engine, chunks: int = 4) -> list[torch.Tensor]:
    engine.encode(PROMPTS)
    video = Video(engine.embeddings(PROMPTS), chunks=chunks, switch_chunks=(2,))
    settings = GenerationSettings(geometry=engine.geometry)
    return [chunk.latents for chunk in engine.stream(video, settings, seed=0, decode=False)]


def test_the_demo_engine_builds_its_transformer_with_the_fast_paths_layers_and_never_changes_it(monkeypatch):
    with load_engine("demo", "cpu") as plain_engine:
        expected = stream_video(plain_engine)
    steps = CountingStep()
    monkeypatch.setattr(engine_module, "_fast_path", lambda config, device, speed: accelerated(steps))
    with load_engine("demo", "cpu") as engine:
        model = engine.transformer
        block = model.blocks[0]
        assert isinstance(block.self_attn.qkv, torch.nn.Linear) and not hasattr(block.self_attn, "q")
        assert type(block.ffn[0]) is LinearGELU and isinstance(block.ffn[1], torch.nn.Identity)
        built = structure(model)
        tensors = {name: tensor.data_ptr() for name, tensor in model.state_dict().items()}
        latents = stream_video(engine)
        assert structure(model) == built  # no module replaced, no tensor converted while the video streamed
        assert {name: tensor.data_ptr() for name, tensor in model.state_dict().items()} == tensors
    # every pass ran its blocks' steps through what the kernels gave at construction
    assert steps.calls["attention_inputs"] == steps.calls["after_attention"] > 0
    for ours, theirs in zip(latents, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)  # the same seeded weights, other layers


def test_load_transformer_builds_the_final_form_from_a_checkpoints_names(tmp_path, weights, lora_sd):  # noqa: F811
    base = save_base(tmp_path / "base.pt", weights)
    lora = tmp_path / "lora.pt"
    torch.save(lora_sd, lora)
    plain = load_transformer(base, lora, CONFIG, LORA)
    fast = load_transformer(base, lora, CONFIG, LORA, kernels=Kernels(linear_gelu=LinearGELU, fused_qkv=True))
    for plain_block, block in zip(plain.blocks, fast.blocks, strict=True):
        source = plain_block.self_attn
        assert torch.equal(block.self_attn.qkv.weight, torch.cat([source.q.weight, source.k.weight, source.v.weight]))
        assert torch.equal(block.self_attn.qkv.bias, torch.cat([source.q.bias, source.k.bias, source.v.bias]))
        assert type(block.ffn[0]) is LinearGELU and torch.equal(block.ffn[0].weight, plain_block.ffn[0].weight)
    names = set(fast.state_dict())
    assert "blocks.0.self_attn.qkv.weight" in names and "blocks.0.self_attn.q.weight" not in names
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())


def test_building_on_the_meta_device_loads_no_python_decompositions():
    """A load builds the model on the meta device: arithmetic there would import torch's Python
    decompositions and dynamo (about a second of every load); the real build keeps Wan's initialisation."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from memflow_cli.model.transformer import CausalWanTransformer\n"
        "from memflow_cli.settings import TransformerConfig\n"
        "with torch.device('meta'):\n"
        "    model = CausalWanTransformer(TransformerConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2))\n"
        "assert model.blocks[0].modulation.is_meta and model.head.modulation.shape == (1, 2, 64)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    real = CausalWanTransformer(TransformerConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=1))
    modulation = real.blocks[0].modulation
    assert not modulation.is_meta and 0.08 < modulation.std().item() < 0.17  # randn / sqrt(64): std 0.125
