"""Hostile or mistaken scripts: one line naming the file, exit code 2, in bounded time and memory.

Each input here hung `memflow check`, ate gigabytes or ended in a RecursionError traceback before scripts
were read with limits. The subprocess runs under an address-space limit and a timeout (tests/scripts.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memflow_cli.script import MAX_NESTING, MAX_YAML_VALUES, ScriptError, load_scripts

from .scripts import CHECK_SECONDS, CheckedInProcess, check_each, run_check

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
    "a flat list of 100k values": "segments: [" + "1," * 100_000 + "1]\n",
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
    "2000 stories of 2000 prompts": ('{"prompts": [' + ", ".join(['"a"'] * 2000) + "]}\n") * 2000,
}


HOSTILE = {
    **{f"story.yaml: {name}": ("story.yaml", text) for name, text in HOSTILE_YAML.items()},
    **{f"prompts.jsonl: {name}": ("prompts.jsonl", text) for name, text in HOSTILE_JSONL.items()},
}
SPECIAL = ("a link to /dev/zero", "a FIFO", "a 50 MB YAML file", "a 50 MB JSONL file")


def make_special(folder: Path, name: str) -> Path:
    suffix = ".jsonl" if "JSONL" in name else ".yaml"
    path = folder / f"{name.replace(' ', '_').replace('/', '_')}{suffix}"
    if name == "a link to /dev/zero":
        path.symlink_to("/dev/zero")
    elif name == "a FIFO":
        os.mkfifo(path)  # nothing ever writes to it: opening it for reading would wait forever
    else:
        with path.open("wb") as file:
            file.truncate(50 * 2**20)  # sparse: costs no disk
    return path


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, CheckedInProcess]]:
    """Every hostile script, checked in one subprocess (one start-up of Python instead of one per file)."""
    folder = tmp_path_factory.mktemp("hostile")
    paths = {}
    for index, (case, (name, text)) in enumerate(HOSTILE.items()):
        (folder / str(index)).mkdir()
        paths[case] = write_text(folder / str(index), name, text).relative_to(folder)
    for case in SPECIAL:
        paths[case] = make_special(folder, case).relative_to(folder)
    results = check_each([str(path) for path in paths.values()], cwd=folder)
    return {case: (str(path), results[str(path)]) for case, path in paths.items()}


@pytest.mark.parametrize("case", [*HOSTILE, *SPECIAL])
def test_a_hostile_script_is_refused_in_one_line_in_bounded_time(checked, case: str):
    path, result = checked[case]
    assert result.crash is None
    assert result.code == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # the error and its fix, on one line
    assert lines[0].startswith(f"error: {path}")
    assert len(lines[0]) < 400
    assert result.seconds < CHECK_SECONDS / 2


@pytest.mark.parametrize(("case", "message"), [
    ("a link to /dev/zero", "is a device, not a regular file"),
    ("a FIFO", "is a pipe, not a regular file"),
    ("a 50 MB YAML file", "the file is larger than 256 KiB, the most a .yaml script may hold"),
    ("a 50 MB JSONL file", "the file is larger than 16 MiB, the most a .jsonl script may hold"),
])  # fmt: skip
def test_a_script_that_is_no_regular_file_or_too_large_is_refused_unread(checked, case: str, message: str):
    assert message in checked[case][1].stderr


def test_the_memflow_command_refuses_an_alias_bomb_in_one_line(tmp_path: Path):
    write_text(tmp_path, "story.yaml", HOSTILE_YAML["alias bomb as a settings key"])
    result = run_check("story.yaml", cwd=tmp_path)
    assert (result.code, result.stdout) == (2, "")
    assert result.stderr == (
        f"error: story.yaml:5: the story holds more than {MAX_YAML_VALUES} values (aliases count as what they "
        "repeat) — write a shorter story, or split it into several scripts\n"
    )


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
