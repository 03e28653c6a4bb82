"""Hostile or mistaken scripts: one line naming the file, exit code 2, in bounded time and memory.

Each input here hung `memflow check`, ate gigabytes or ended in a RecursionError traceback before scripts
were read with limits. The subprocess runs under an address-space limit and a timeout (tests/scripts.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memflow_cli.script import MAX_NESTING, MAX_YAML_VALUES, ScriptError, load_scripts

from .scripts import run_check

SEGMENT = "segments:\n  - start: 0s\n    prompt: a lighthouse at dusk\n"


def laughs(levels: int = 9) -> str:
    """Nine lists, each of nine aliases to the one before: 9**9 values once expanded, 500 bytes as written."""
    lists = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    lists += [f"&a{level} [{', '.join([f'*a{level - 1}'] * 9)}]" for level in range(1, levels + 1)]
    return f"[{', '.join(lists)}]"


def write_text(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


HOSTILE_YAML = {
    "alias bomb in the title": f"title: {laughs()}\n{SEGMENT}",
    "alias bomb as a settings key": f"{SEGMENT}settings:\n  ? {laughs()}\n  : 1\n",
    "alias bomb as a prompt": f"segments:\n  - start: 0s\n    prompt: {laughs()}\n",
    "alias bomb in the steps": f"{SEGMENT}settings:\n  steps: {laughs()}\n",
    "an alias inside its own value": "segments: &loop [*loop]\n",
    "100k nested lists": "segments: " + "[" * 100_000 + "]" * 100_000 + "\n",
    "5000 nested mappings": "segments: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n",
    "200 nested block mappings": "segments:\n" + "\n".join("  " * depth + "a:" for depth in range(1, 201)) + " 1\n",
    "a flat list of 400k values": "segments: [" + "1, " * 400_000 + "1]\n",
    "a seed of 5000 digits": "seed: " + "7" * 5000 + "\n" + SEGMENT,
    "a start of 5000 digits": "segments:\n  - start: " + "7" * 5000 + "\n    prompt: a\n",
    "a key of 100k characters": SEGMENT + "k" * 100_000 + "x: 1\n",
    "shift nan": SEGMENT + "settings:\n  shift: .nan\n",
    "shift inf": SEGMENT + "settings:\n  shift: .inf\n",
    "a bank of 100 million frames": SEGMENT + "settings:\n  bank_size: 100000000\n",
}

HOSTILE_JSONL = {
    "100k nested lists": '{"prompts": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
    "a number of 5000 digits": '{"prompts": ["a"], "x": ' + "7" * 5000 + "}\n",
    "a key of 100k characters": '{"' + "k" * 100_000 + '": 1}\n',
    "10001 stories": '{"prompts": ["a"]}\n' * 10_001,
    "a story of 100k prompts": '{"prompts": [' + ", ".join(['"a"'] * 100_000) + "]}\n",
}


def assert_refused_in_one_line(result, name: str) -> None:
    assert result.code == 2, result.stderr[-2000:]
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) in (1, 2), result.stderr[-2000:]  # the error, and maybe a hint
    assert lines[0].startswith(f"error: {name}")
    assert len(lines[0]) < 400


@pytest.mark.parametrize("text", HOSTILE_YAML.values(), ids=HOSTILE_YAML.keys())
def test_hostile_yaml_is_refused_in_one_line(tmp_path: Path, text: str):
    write_text(tmp_path, "story.yaml", text)
    assert_refused_in_one_line(run_check("story.yaml", cwd=tmp_path), "story.yaml")


@pytest.mark.parametrize("text", HOSTILE_JSONL.values(), ids=HOSTILE_JSONL.keys())
def test_hostile_jsonl_is_refused_in_one_line(tmp_path: Path, text: str):
    write_text(tmp_path, "prompts.jsonl", text)
    assert_refused_in_one_line(run_check("prompts.jsonl", cwd=tmp_path), "prompts.jsonl")


def test_a_script_that_is_dev_zero_is_refused_unread(tmp_path: Path):
    (tmp_path / "story.yaml").symlink_to("/dev/zero")
    result = run_check("story.yaml", cwd=tmp_path)
    assert_refused_in_one_line(result, "story.yaml")
    assert "is a device, not a regular file" in result.stderr


def test_a_script_that_is_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path):
    os.mkfifo(tmp_path / "story.yaml")
    result = run_check("story.yaml", cwd=tmp_path)
    assert_refused_in_one_line(result, "story.yaml")
    assert "is a pipe, not a regular file" in result.stderr


@pytest.mark.parametrize("name", ["story.yaml", "prompts.jsonl"])
def test_a_50_mb_script_is_refused_by_its_size(tmp_path: Path, name: str):
    with (tmp_path / name).open("wb") as file:
        file.truncate(50 * 2**20)  # sparse: costs no disk
    result = run_check(name, cwd=tmp_path)
    assert_refused_in_one_line(result, name)
    assert "the file is larger than" in result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# The messages, in process


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return Path()


def error_of(path: Path) -> str:
    with pytest.raises(ScriptError) as caught:
        load_scripts(path)
    return str(caught.value)


def test_an_alias_bomb_names_the_limit_and_the_line(folder: Path):
    path = write_text(folder, "story.yaml", f"{SEGMENT}settings:\n  steps: {laughs()}\n")
    assert error_of(path) == (
        f"story.yaml:5: the story holds more than {MAX_YAML_VALUES} values (aliases count as what they repeat) "
        "— write a shorter story, or split it into several scripts"
    )


def test_aliases_that_stay_small_still_work(folder: Path):
    text = (
        "segments:\n  - start: 0s\n    prompt: &keeper The old keeper climbs the stairs.\n"
        "  - start: 10s\n    prompt: *keeper\n"
    )
    (story,) = load_scripts(write_text(folder, "story.yaml", text))
    assert [segment.prompt for segment in story.segments] == ["The old keeper climbs the stairs."] * 2


def test_nesting_names_the_depth_and_the_line(folder: Path):
    path = write_text(folder, "story.yaml", "title: x\nsegments: " + "[" * 100 + "]" * 100 + "\n")
    assert error_of(path) == (
        f"story.yaml:2: lists and mappings nest more than {MAX_NESTING} levels deep here "
        "— a story nests four levels: story, segments, segment, value"
    )


def test_an_alias_inside_its_own_value_is_refused(folder: Path):
    path = write_text(folder, "story.yaml", "segments: &loop [*loop]\n")
    assert error_of(path) == (
        "story.yaml:1: the alias *loop repeats a value that contains it — write the value out instead of an alias"
    )


def test_a_key_that_is_a_list_is_refused_without_printing_it(folder: Path):
    path = write_text(folder, "story.yaml", f"{SEGMENT}? [a, b]\n: 1\n")
    assert error_of(path).startswith("story.yaml:4: a key must be a plain word, not a list or a mapping — known keys:")


def test_a_long_unknown_key_is_shortened(folder: Path):
    path = write_text(folder, "prompts.jsonl", '{"' + "k" * 100_000 + '": 1}\n')
    message = error_of(path)
    assert message.startswith("prompts.jsonl:1: " + "k" * 37 + "...: unknown key '" + "k" * 36 + "...")
    assert len(message) < 200


def test_a_huge_number_is_a_value_that_cannot_be_read(folder: Path):
    path = write_text(folder, "story.yaml", "seed: " + "7" * 5000 + "\n" + SEGMENT)
    assert (
        error_of(path)
        == "story.yaml:1: seed: cannot read this value: a number too long to read — write plain YAML values"
    )


def test_a_deep_json_line_is_refused(folder: Path):
    path = write_text(
        folder, "prompts.jsonl", '{"prompts": ["a"]}\n{"prompts": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
    )
    assert error_of(path).startswith("prompts.jsonl:2: not valid here: lists and objects nest too deep")


def test_a_long_time_is_not_a_time(folder: Path):
    path = write_text(folder, "story.yaml", "segments:\n  - start: '" + "1" * 100_000 + "s'\n    prompt: a\n")
    assert error_of(path).startswith("story.yaml:2: segments[0].start: '" + "1" * 36 + "... is not a time")
