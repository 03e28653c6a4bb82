"""The reporting helpers: quieting the libraries costs no import on the way to the model's loading."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROBE = """
import os, sys
from memflow_cli.report import quiet_libraries
quiet_libraries()
print(sorted(m for m in ("diffusers", "transformers") if m in sys.modules))
print(os.environ.get("DIFFUSERS_VERBOSITY"), os.environ.get("TRANSFORMERS_VERBOSITY"))
import transformers.utils.logging as logging
print(logging.get_verbosity() == logging.ERROR)
"""


def test_quiet_libraries_imports_neither_library_and_each_starts_at_the_error_level():
    environment = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TRANSFORMERS_VERBOSITY": "critical"}
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                            env={**environment, "PYTHONPATH": ":".join(sys.path)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    imported, levels, transformers_at_error = result.stdout.splitlines()
    assert imported == "[]"
    assert levels == "error critical"  # a level the user set wins
    assert transformers_at_error == "False"  # critical, as the user asked


def test_quiet_libraries_sets_a_library_already_imported():
    probe = "import transformers\n" + PROBE.replace("print(os.environ", "#")
    environment = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": ":".join(sys.path)}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=environment)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["['transformers']", "True"]



def test_every_command_starts_with_the_libraries_quiet():
    """The command line sets the libraries' level once, at its start (here before `check`, which loads none)."""
    story = Path(__file__).resolve().parents[1] / "scripts_examples" / "lighthouse.yaml"
    probe = ("import os, sys\nfrom typer.testing import CliRunner\nfrom memflow_cli.cli import app\n"
             f"assert CliRunner().invoke(app, ['check', {str(story)!r}]).exit_code == 0\n"
             "print(os.environ.get('DIFFUSERS_VERBOSITY'), os.environ.get('TRANSFORMERS_VERBOSITY'))")  # fmt: skip
    environment = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": ":".join(sys.path)}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=environment)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["error", "error"]
