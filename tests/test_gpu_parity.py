"""bf16 on the GPU stays faithful: the parity scenarios within relative L2 2e-2 of the float32 expectation."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from memflow_cli.checkpoint import load_transformer
from memflow_cli.fast import accelerate, attention_kernels, passes_for
from memflow_cli.generator import MemFlowGenerator

from . import parity

BF16_BAR = 2e-2
MANIFEST = parity.manifest()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not MANIFEST["scenarios"], reason=f"no parity fixtures at {parity.PARITY_DIR}"),
]


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", sorted(MANIFEST["scenarios"]))
def test_bf16_gpu_close_to_float32_expectation(name, compile):
    d = parity.PARITY_DIR
    device = torch.device("cuda")
    model = load_transformer(
        d / "base.pt", d / "lora.pt", d / "config.json", parity.lora_settings(MANIFEST),
        device=device, dtype=torch.bfloat16,
    )  # fmt: skip
    accelerate(model, compile=compile)
    scenario = MANIFEST["scenarios"][name]
    settings = parity.scenario_settings(MANIFEST, scenario)
    inputs = parity.load_inputs()
    frames = scenario.get("frames", MANIFEST["frames"])
    expected = load_file(d / f"expected_{name}.safetensors")["latents"][:, :frames]
    generator = MemFlowGenerator(model, settings, passes=passes_for(compile))  # compiled: the whole fast path
    noise = parity.fixed_noise(inputs, settings)
    embeds = parity.prompt_embeds(inputs)[scenario["prompts"]]
    with attention_kernels(device):
        chunks = generator.generate(
            embeds, frames // settings.geometry.frames_per_chunk, noise, parity.switch_chunks(scenario, settings)
        )
        latents = torch.cat([c.float().cpu() for c in chunks], dim=1)
    error = parity.relative_l2(latents, expected)
    print(f"{name} ({'compiled' if compile else 'eager'}): bf16 relative L2 {error:.3e}")
    assert error <= BF16_BAR
