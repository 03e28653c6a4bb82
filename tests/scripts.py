"""Story scripts shared by several test modules, and `memflow check` run on hostile ones under limits."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("MEMFLOW_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
SHARED_STORIES = sorted(path for path in (SHARED / "stories").glob("*") if path.suffix in (".yaml", ".yml", ".jsonl"))
NO_SHARED = pytest.param(None, marks=pytest.mark.skip(reason=f"no shared stories under {SHARED}"))

REPO = Path(__file__).resolve().parents[1]
CHECK_SECONDS = 20  # `memflow check` starts in about 1 s on an idle core; hostile input must not add much
CHECK_MEMORY = 2 * 2**30  # address space of the whole process, libraries included


@dataclass(frozen=True)
class Checked:
    code: int
    stdout: str
    stderr: str


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CHECK_MEMORY, CHECK_MEMORY))


def run_check(*args: str | Path, cwd: Path) -> Checked:
    """`memflow check ARGS` in a subprocess with a time limit and an address-space limit."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "COLUMNS": "400"}
    result = subprocess.run(
        [sys.executable, "-m", "memflow_cli", "check", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=CHECK_SECONDS, preexec_fn=_limit_memory,
    )  # fmt: skip
    return Checked(result.returncode, result.stdout, result.stderr)
