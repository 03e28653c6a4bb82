"""Hostile input, round 4 (issue 29): each class of input through the real commands and the real page server.

Every refusal is one line on stderr (`error: ...` and perhaps its hint), exit code 2 (or a 4xx from the page),
no traceback, and no file created or changed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .cli_helpers import DEMO, memflow

SEGMENTS = "segments:\n  - start: 0s\n    prompt: a lighthouse at dusk\n"


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def refused(result, *words: str) -> str:
    """The one error line of a refused command, checked to hold `words`."""
    assert result.exit_code == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: "), result.stderr
    assert all(line.startswith("  hint: ") for line in lines[1:]), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# 1. Text that cannot be encoded, 2. control characters in scripts

UNUSABLE_TEXT = {
    "a lone surrogate in a prompt": ("story.yaml", 'segments:\n  - start: 0s\n    prompt: "a \\ud800"\n', 3, "prompt"),
    "a lone low surrogate in the title": ("story.yaml", f'title: "x\\udfff"\n{SEGMENTS}', 1, "title"),
    "a surrogate in a settings key": ("story.yaml", f'{SEGMENTS}settings:\n  "\\ud83d": 1\n', 5, "settings"),
    "a surrogate in a JSONL prompt": ("p.jsonl", '{"prompts": ["fine", "a \\ud800"]}\n', 1, "prompts[1]"),
    "a surrogate in a JSONL key": ("p.jsonl", '{"prompts": ["a"]}\n{"\\udc00": 1, "prompts": ["b"]}\n', 2, None),
    "an escape sequence in a prompt": ("story.yaml", 'segments:\n  - start: 0s\n    prompt: "\\e]0;x\\a\\e[2J"\n', 3,
                                       "prompt"),
    "a carriage return in a JSONL prompt": ("p.jsonl", '{"prompts": ["a\\rforged line"]}\n', 1, "prompts[0]"),
    "a C1 control in the title": ("story.yaml", f'title: "a\\x9bb"\n{SEGMENTS}', 1, "title"),
    "a newline in the title": ("story.yaml", f'title: "two\\nlines"\n{SEGMENTS}', 1, "title"),
    "a line separator in a prompt": ("story.yaml", 'segments:\n  - start: 0s\n    prompt: "a\\u2028b"\n', 3, "prompt"),
}


@pytest.mark.parametrize("case", UNUSABLE_TEXT, ids=list(UNUSABLE_TEXT))
def test_unusable_text_is_one_line_naming_file_line_and_field(tmp_path: Path, case: str) -> None:
    name, text, line, field = UNUSABLE_TEXT[case]
    script = write(tmp_path, name, text)
    before = files_under(tmp_path)
    error = refused(memflow("check", script), f"{script}:{line}:")
    if field:
        assert f"{field}: " in error
    assert "\x1b" not in error and "\r" not in error and "\u2028" not in error
    out_dir = tmp_path / "renders"
    refused(memflow("render", script, "--out-dir", out_dir, *DEMO), f"{script}:{line}:")
    assert not out_dir.exists()  # nothing created
    assert files_under(tmp_path) == before


def test_tabs_and_newlines_in_a_prompt_are_text(tmp_path: Path) -> None:
    text = "segments:\n  - start: 0s\n    prompt: |\n      a lighthouse\n      \tat dusk\n"
    script = write(tmp_path, "story.yaml", text)
    result = memflow("check", "--json", script)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["segments"] == 1
