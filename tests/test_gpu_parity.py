"""bf16 on the GPU stays faithful: the parity scenarios within relative L2 2e-2 of the float32 expectation."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from memflow_cli.checkpoint import load_transformer
from memflow_cli.generator import MemFlowGenerator
from memflow_cli.loading import read_transformer_config
from memflow_cli.speed import choose_fast_path

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
    config = read_transformer_config(d / "config.json")
    fast = choose_fast_path(config, device, torch.bfloat16, compile=compile)
    model = load_transformer(
        d / "base.pt", d / "lora.pt", config, parity.lora_settings(MANIFEST),
        device=device, dtype=torch.bfloat16, kernels=fast.kernels,
    )  # fmt: skip
    scenario = MANIFEST["scenarios"][name]
    settings = parity.scenario_settings(MANIFEST, scenario)
    inputs = parity.load_inputs()
    frames = scenario.get("frames", MANIFEST["frames"])
    expected = load_file(d / f"expected_{name}.safetensors")["latents"][:, :frames]
    # compiled: the whole fast path (compiled steps, CUDA graphs)
    generator = MemFlowGenerator(model, settings, run_pass=fast.pass_function(model), passes=fast.graphed_passes)
    noise = parity.fixed_noise(inputs, settings)
    embeds = parity.prompt_embeds(inputs)[scenario["prompts"]]
    with fast.sdpa_priority():
        chunks = generator.generate(
            embeds, frames // settings.geometry.frames_per_chunk, noise, parity.switch_chunks(scenario, settings)
        )
        latents = torch.cat([c.float().cpu() for c in chunks], dim=1)
    error = parity.relative_l2(latents, expected)
    print(f"{name} ({'compiled' if compile else 'eager'}): bf16 relative L2 {error:.3e}")
    assert error <= BF16_BAR
