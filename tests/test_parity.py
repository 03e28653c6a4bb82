"""The generator against the official MemFlow inference, on the fixtures in MEMFLOW_PARITY_DIR.

Each scenario of the fixture's manifest is rendered through our own checkpoint
loader and chunk loop from the fixture's embeddings and noise, in float32 on
CPU, and must be within relative L2 1e-4 of the expected latents, whole and per chunk.
This file takes the scenario it also resumes from a snapshot and its family (`parity.families`: a scenario
whose first switch comes after another's first chunks resumes from that one's state there, as a story edited
at its switch does); test_parity_share_1.py takes the others (`parity.scenario_share`), so that two pytest-xdist
workers share them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memflow_cli.generator import MemFlowGenerator, ScriptedPrompts

from . import parity

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


def test_every_scenario_is_in_one_share_and_every_share_in_its_file():
    shares = [parity.resumed_family(MANIFEST)]
    shares += [parity.scenario_share(MANIFEST, share) for share in range(1, parity.SHARES + 1)]
    assert sorted(name for share in shares for name in share) == sorted(MANIFEST["scenarios"])
    files = sorted(path.name for path in Path(__file__).parent.glob("test_parity_share_*.py"))
    assert files == [f"test_parity_share_{share}.py" for share in range(1, parity.SHARES + 1)]


@pytest.mark.slow
@pytest.mark.parametrize("name", parity.resumed_family(MANIFEST))
def test_scenario_matches_official_latents(name, parity_renders):
    parity.assert_matches_official(name, parity_renders)


# A snapshot (`snapshots.py`) at full resolution, from the render of the scenario above (`parity_renders` keeps it:
# under pytest-xdist's --dist loadfile one worker runs this file and renders it once).


@pytest.mark.slow  # the scenario's render above, then 1 chunk from the snapshot
@pytest.mark.skipif(not MANIFEST["scenarios"], reason=f"no parity fixtures at {parity.PARITY_DIR}")
def test_the_parity_models_three_prompt_scenario_resumes_exactly_at_its_second_switch(parity_renders):
    """The official scenario whose bank is compressed right after a switch (with an all-zero text query)."""
    man = parity.manifest()
    scenario = man["scenarios"][parity.RESUMED]
    settings = parity.scenario_settings(man, scenario)
    switches = parity.switch_chunks(scenario, settings)
    full = parity_renders.scenario(parity.RESUMED)  # through `generate`: interactive, as the scenario switches
    state = full.boundaries[-2]  # at the last switch
    assert state.chunk == switches[-1]
    inputs = parity_renders.inputs
    prompts = ScriptedPrompts(parity.prompt_embeds(inputs)[scenario["prompts"]], switches, switches[-1] + 1)
    generator = MemFlowGenerator(parity_renders.model, settings)
    tail = list(generator.stream(prompts, parity.fixed_noise(inputs, settings), interactive=True, resume=state))
    assert len(tail) == 1 and torch.equal(tail[0], full.chunks[switches[-1]])
