"""The generator against the official MemFlow inference, on the fixtures in MEMFLOW_PARITY_DIR.

Each scenario of the fixture's manifest is rendered through our own checkpoint
loader and chunk loop from the fixture's embeddings and noise, in float32 on
CPU, and must be within relative L2 1e-4 of the expected latents, whole and per chunk.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from memflow_cli.generator import MemFlowGenerator, ScriptedPrompts

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


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MANIFEST["scenarios"]))
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


# A snapshot (`snapshots.py`) at full resolution; the file keeps the rendered scenarios: under pytest-xdist's
# --dist loadfile one worker runs them all and renders each once.


@pytest.mark.slow  # the scenario's render above (`parity_renders` keeps it), then 1 chunk from the snapshot
@pytest.mark.skipif(not MANIFEST["scenarios"], reason=f"no parity fixtures at {parity.PARITY_DIR}")
def test_the_parity_models_three_prompt_scenario_resumes_exactly_at_its_second_switch(parity_renders):
    """The official scenario whose bank is compressed right after a switch (with an all-zero text query)."""
    man = parity.manifest()
    scenario = man["scenarios"]["three_prompts"]
    settings = parity.scenario_settings(man, scenario)
    switches = parity.switch_chunks(scenario, settings)
    full = parity_renders.scenario("three_prompts")  # through `generate`: interactive, as the scenario switches
    state = full.boundaries[-2]  # at the last switch
    assert state.chunk == switches[-1]
    inputs = parity_renders.inputs
    prompts = ScriptedPrompts(parity.prompt_embeds(inputs)[scenario["prompts"]], switches, switches[-1] + 1)
    generator = MemFlowGenerator(parity_renders.model, settings)
    tail = list(generator.stream(prompts, parity.fixed_noise(inputs, settings), interactive=True, resume=state))
    assert len(tail) == 1 and torch.equal(tail[0], full.chunks[switches[-1]])
