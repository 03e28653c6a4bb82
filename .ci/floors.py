"""Print the lowest version memflow-cli declares of each of its dependencies, as pip pins (`name==version`).

Reads the metadata of the installed project (`pip install -e ".[dev]"` first), so the pins are exactly the
lower bounds of pyproject.toml. `.ci/run` installs them into a second environment and runs the suite there:
every lower bound must be a version the suite passes with. A requirement without a lower bound (`>=`) is
an error.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import requires

REQUIREMENT = re.compile(r"^([A-Za-z0-9_.-]+)\s*(?:\[[^\]]*\])?\s*\(?([^;)]*)\)?\s*(?:;.*)?$")


def floors(project: str = "memflow-cli") -> list[str]:
    pins = []
    for requirement in requires(project) or []:
        if _optional(requirement):
            continue
        name, spec = REQUIREMENT.match(requirement).groups()
        lower = [part.strip()[2:].strip() for part in spec.split(",") if part.strip().startswith(">=")]
        if len(lower) != 1:
            sys.exit(f"{project}: {requirement!r} needs exactly one lower bound (>=)")
        pins.append(f"{name}=={lower[0]}")
    return pins


def _optional(requirement: str) -> bool:
    """A requirement of an extra other than `dev` (e.g. `hopper`, a GPU-only pin): not installed by CI."""
    marker = requirement.partition(";")[2]
    return "extra ==" in marker and "dev" not in marker


if __name__ == "__main__":
    print("\n".join(floors()))
