"""The generator against the official MemFlow inference, on the fixtures in MEMFLOW_PARITY_DIR.

Each scenario of the fixture's manifest is rendered through our own checkpoint
loader and chunk loop from the fixture's embeddings and noise, in float32 on
CPU, and must be within relative L2 1e-4 of the expected latents, whole and per chunk.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from memflow_cli.checkpoint import load_transformer
from memflow_cli.generator import MemFlowGenerator

from . import parity

BAR = 1e-4
MANIFEST = parity.manifest()

pytestmark = pytest.mark.skipif(
    not MANIFEST["scenarios"] and not parity.REQUIRED, reason=f"no parity fixtures at {parity.PARITY_DIR}"
)


def test_fixtures_present():
    """In CI, or when MEMFLOW_PARITY_DIR names a folder, missing fixtures are a failure, not a skip."""
    assert MANIFEST["scenarios"], f"no parity scenarios found in {parity.PARITY_DIR}/manifest.json"


@pytest.fixture(scope="module")
def model():
    d = parity.PARITY_DIR
    config = d / "config.json"
    return load_transformer(
        d / "base.pt",
        d / "lora.pt",
        config if config.is_file() else None,
        parity.lora_settings(MANIFEST),
        dtype=torch.float32,
    )


@pytest.fixture(scope="module")
def inputs():
    return parity.load_inputs()


def test_manifest_geometry_matches_derived_sizes():
    for scenario in MANIFEST["scenarios"].values():
        geometry = parity.scenario_settings(MANIFEST, scenario).geometry
        assert geometry.tokens_per_frame == MANIFEST["tokens_per_frame"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MANIFEST["scenarios"]))
def test_scenario_matches_official_latents(name, model, inputs):
    scenario = MANIFEST["scenarios"][name]
    settings = parity.scenario_settings(MANIFEST, scenario)
    frames = scenario.get("frames", MANIFEST["frames"])
    per_chunk = settings.geometry.frames_per_chunk
    embeds = parity.prompt_embeds(inputs)[scenario["prompts"]]
    expected = load_file(parity.PARITY_DIR / f"expected_{name}.safetensors")["latents"][:, :frames]

    generator = MemFlowGenerator(model, settings)
    chunks = list(
        generator.generate(
            embeds, frames // per_chunk, parity.fixed_noise(inputs, settings), parity.switch_chunks(scenario, settings)
        )
    )

    errors = [
        parity.relative_l2(chunk, expected[:, i * per_chunk : (i + 1) * per_chunk]) for i, chunk in enumerate(chunks)
    ]
    assert max(errors) <= BAR, f"per-chunk relative L2 errors: {[f'{e:.2e}' for e in errors]}"
    assert parity.relative_l2(torch.cat(chunks, dim=1), expected) <= BAR
