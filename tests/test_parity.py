"""The generator against the official MemFlow inference, on the fixtures in MEMFLOW_PARITY_DIR.

Each scenario of the fixture's manifest is rendered through our own checkpoint
loader and chunk loop from the fixture's embeddings and noise, in float32 on
CPU, and must be within relative L2 1e-4 of the expected latents, whole and per chunk.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from . import parity

BAR = 1e-4
MANIFEST = parity.manifest()

pytestmark = pytest.mark.skipif(
    not MANIFEST["scenarios"] and not parity.REQUIRED, reason=f"no parity fixtures at {parity.PARITY_DIR}"
)


def test_fixtures_present():
    """In CI, or when MEMFLOW_PARITY_DIR names a folder, missing fixtures are a failure, not a skip."""
    assert MANIFEST["scenarios"], f"no parity scenarios found in {parity.PARITY_DIR}/manifest.json"


def test_manifest_geometry_matches_derived_sizes():
    for scenario in MANIFEST["scenarios"].values():
        geometry = parity.scenario_settings(MANIFEST, scenario).geometry
        assert geometry.tokens_per_frame == MANIFEST["tokens_per_frame"]


# the snapshot test resumes three_prompts from its second switch: on the same pytest-xdist worker it renders once
SCENARIOS = [
    pytest.param(name, marks=pytest.mark.xdist_group("parity-three-prompts") if name == "three_prompts" else ())
    for name in sorted(MANIFEST["scenarios"])
]


@pytest.mark.slow
@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_matches_official_latents(name, parity_renders):
    scenario = MANIFEST["scenarios"][name]
    per_chunk = MANIFEST["frames_per_chunk"]
    frames = scenario.get("frames", MANIFEST["frames"])
    expected = load_file(parity.PARITY_DIR / f"expected_{name}.safetensors")["latents"][:, :frames]

    chunks = parity_renders.scenario(name).chunks

    errors = [
        parity.relative_l2(chunk, expected[:, i * per_chunk : (i + 1) * per_chunk]) for i, chunk in enumerate(chunks)
    ]
    assert max(errors) <= BAR, f"per-chunk relative L2 errors: {[f'{e:.2e}' for e in errors]}"
    assert parity.relative_l2(torch.cat(chunks, dim=1), expected) <= BAR
