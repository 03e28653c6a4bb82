"""Story scripts shared by several test modules, and `memflow check` run on hostile ones under limits."""

from __future__ import annotations

import json
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


_CHECK_EACH = """
import json, sys, time
from typer.testing import CliRunner
from memflow_cli.cli import app

runner = CliRunner()
for path in sys.argv[1:]:
    start = time.perf_counter()
    result = runner.invoke(app, ["check", path])
    crash = result.exception if not isinstance(result.exception, SystemExit) else None
    record = {"path": path, "code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr[-4000:],
              "seconds": time.perf_counter() - start, "crash": repr(crash) if crash else None}
    print(json.dumps(record), flush=True)
"""


@dataclass(frozen=True)
class CheckedInProcess:
    code: int
    stdout: str
    stderr: str
    seconds: float
    crash: str | None  # an exception that escaped the command (a traceback for the user)


def check_each(paths: list[str], cwd: Path) -> dict[str, CheckedInProcess]:
    """`memflow check PATH` for each path, one after the other in one subprocess under the limits above."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "COLUMNS": "400"}
    result = subprocess.run(
        [sys.executable, "-c", _CHECK_EACH, *paths], capture_output=True, text=True, cwd=cwd, env=env,
        timeout=CHECK_SECONDS + 5 * len(paths), preexec_fn=_limit_memory,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    return {record.pop("path"): CheckedInProcess(**record) for record in records}
