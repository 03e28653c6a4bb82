"""The official MemFlow scenarios of share 1 (`parity.scenario_share`): see test_parity.py."""

from __future__ import annotations

import pytest

from . import parity

MANIFEST = parity.manifest()


@pytest.mark.slow
@pytest.mark.parametrize("name", parity.scenario_share(MANIFEST, 1))
def test_scenario_matches_official_latents(name, parity_renders):
    parity.assert_matches_official(name, parity_renders)
