"""Hostile input, round 5: what a prober found with stories and files the earlier rounds did not try.

An output spelled in other case while the first spelling's render runs or left its partial file; a link at the
lock file's place; a prompt of millions of words; control characters in `check --json`'s lines.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from memflow_cli.output import (
    MAX_SIDECAR_BYTES,
    OutputBusyError,
    OutputExistsError,
    lock_path,
    partial_path,
    reserved_output,
)
from memflow_cli.script import MAX_YAML_TEXT, Segment, Story
from memflow_cli.text import json_line, shown, text_problem
from memflow_cli.tokens import COUNTED_LIMITS, HEAD_CHARS_PER_TOKEN, HEAD_WORDS_PER_TOKEN, prompt_cuts, prompt_head

from .cli_helpers import DEMO, TAE, memflow
from .test_hostile_round4 import SEGMENTS, files_under, refused, write

# ---------------------------------------------------------------------------------------------------------------------
# One output in any case: one lock, and a partial file of another spelling is that output's


def test_the_lock_is_named_by_the_case_folded_name() -> None:
    assert lock_path(Path("d/Clip.mp4")) == lock_path(Path("d/CLIP.MP4")) == Path("d/.clip.mp4.lock")


def test_a_render_in_another_spelling_waits_for_no_file_to_show_it_is_busy(tmp_path: Path) -> None:
    with reserved_output(tmp_path / "clip.mp4"):  # nothing written yet: the lock alone tells
        for other in ("Clip.mp4", "CLIP.MP4"):
            with pytest.raises(OutputBusyError, match="is writing"):
                with reserved_output(tmp_path / other):
                    pass
    assert files_under(tmp_path) == {}


def test_another_spellings_partial_video_is_refused_and_kept(tmp_path: Path) -> None:
    script = write(tmp_path, "story.yaml", SEGMENTS)
    partial_path(tmp_path / "clip.mp4").write_bytes(b"frames of a stopped render")
    before = files_under(tmp_path)
    for extra in ((), ("--overwrite",)):
        error = refused(memflow("render", script, "-o", tmp_path / "Clip.mp4", *DEMO, *TAE, *extra), "one output")
        assert ".clip.partial.mp4" in error
    assert files_under(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------------
# The lock file is memflow's own: never written through a link


def test_a_symbolic_link_at_the_lock_files_place_is_refused_and_its_file_untouched(tmp_path: Path) -> None:
    victim = write(tmp_path, "notes.txt", "a user's notes\n")
    lock = lock_path(tmp_path / "v.mp4")
    os.symlink(victim, lock)
    with pytest.raises(OutputExistsError, match=f"{lock.name} is where memflow locks v.mp4, but it is a link") as error:
        with reserved_output(tmp_path / "v.mp4"):
            pass
    assert error.value.hint and "remove it" in error.value.hint
    script = write(tmp_path, "story.yaml", SEGMENTS)
    refused(memflow("render", script, "-o", tmp_path / "v.mp4", *DEMO, *TAE), lock.name)
    assert victim.read_text() == "a user's notes\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([lock.name, "notes.txt", "story.yaml"])


def test_a_hard_link_at_the_lock_files_place_is_let_go_and_its_file_never_written(tmp_path: Path) -> None:
    """A user's file linked there, or a backup's link to a lock a killed render left: memflow lets its own name
    go and makes a fresh lock; the other name's file keeps its bytes."""
    victim = write(tmp_path, "notes.txt", "a user's notes\n")
    os.link(victim, lock_path(tmp_path / "v.mp4"))
    with reserved_output(tmp_path / "v.mp4"):
        assert lock_path(tmp_path / "v.mp4").read_text().strip() == str(os.getpid())
    assert victim.read_text() == "a user's notes\n" and victim.stat().st_nlink == 1


def test_a_busy_output_is_said_busy_whatever_links_its_lock_has(tmp_path: Path) -> None:
    with reserved_output(tmp_path / "v.mp4"):
        os.link(lock_path(tmp_path / "v.mp4"), tmp_path / "backup-of-the-lock")  # `cp -al` while it renders
        with pytest.raises(OutputBusyError, match="is writing"):
            with reserved_output(tmp_path / "v.mp4"):
                pass


def test_a_folder_at_the_lock_files_place_is_refused(tmp_path: Path) -> None:
    lock_path(tmp_path / "v.mp4").mkdir()
    with pytest.raises(OutputExistsError, match="v.mp4, but it is a folder"):
        with reserved_output(tmp_path / "v.mp4"):
            pass


# ---------------------------------------------------------------------------------------------------------------------
# A prompt of millions of words: bounded counting


def test_a_prompt_of_a_million_words_is_counted_in_bounded_pieces() -> None:
    words = 1_000_000
    seen: list[int] = []

    def counter(text: str) -> int:  # a word a token, and end-of-sequence
        seen.append(len(text.split()))
        return len(text.split()) + 1

    segment = Segment(0.0, " ".join(f"w{index}" for index in range(words)))
    story = Story(Path("story.yaml"), "story", 0, 10.0, (segment,))
    (cut,) = prompt_cuts(story, 512, counter)
    head_words = HEAD_WORDS_PER_TOKEN * COUNTED_LIMITS * 512
    assert cut.kept_words == 511 and cut.last_kept.endswith("w510") and cut.words == words
    assert cut.at_least and cut.tokens == head_words + 1
    assert max(seen) <= head_words and len(seen) <= 40
    assert f"{words} words, at least {head_words + 1} tokens; the text encoder reads 512" in cut.describe()
    (estimated,) = prompt_cuts(story, 512)
    assert estimated.at_least and estimated.words == words and 0 < estimated.kept_words < 511


def test_a_tokenizer_that_drops_characters_still_finds_the_cut() -> None:
    """Words of no tokens (characters a tokenizer drops) before the cut: the search widens, the cut is exact."""

    def counter(text: str) -> int:
        return sum(1 for word in text.split() if word != "~") + 1

    prompt = " ".join(["~"] * 2000 + [f"w{index}" for index in range(600)])
    (cut,) = prompt_cuts(Story(Path("s.yaml"), "s", 0, 10.0, (Segment(0.0, prompt),)), 512, counter)
    assert cut.kept_words == 2000 + 511 and cut.last_kept.endswith("w510")


def test_check_warns_about_a_huge_prompt_at_once(tmp_path: Path) -> None:
    script = tmp_path / "huge.jsonl"
    script.write_text(json.dumps({"prompts": ["word " * 2_000_000, "灯" * 1_000_000]}, ensure_ascii=False) + "\n")
    result = memflow("check", script)
    assert result.exit_code == 0, result.stderr
    assert "segment 0 (at 0s): 2000000 words, at least " in result.stderr
    assert "segment 1 (at 10s): 1 words, at least " in result.stderr and "tokens by a rough count" in result.stderr


def test_a_prompts_head_holds_its_first_tokens_and_is_the_prompt_when_short() -> None:
    assert prompt_head("a  few words\n", 512) == "a  few words\n"  # as it is, whitespace and all
    words = " ".join(f"w{index}" for index in range(10_000))
    assert prompt_head(words, 100) == " ".join(f"w{index}" for index in range(HEAD_WORDS_PER_TOKEN * 100))
    run = "灯" * 100_000  # no whitespace: cut by characters
    assert prompt_head("x " + run, 100) == "x " + run[: HEAD_CHARS_PER_TOKEN * 100 - 1]


def test_the_text_encoder_reads_a_huge_prompt_as_its_head(tmp_path: Path) -> None:
    """The first tokens of a prompt of megabytes are those of its head: tokenised in time of the head."""
    from memflow_cli.demo import build_demo_text_encoder
    from memflow_cli.text_encoder import clean_prompt

    encoder = build_demo_text_encoder()
    prompt = "a lighthouse at dusk, " * 400_000
    ids, mask = encoder.tokenize([prompt])
    start = clean_prompt(prompt[:200_000])  # more than the encoder reads, far less than the prompt
    whole = encoder.tokenizer(start, truncation=True, max_length=encoder.max_length)["input_ids"]
    assert ids[0, : len(whole)].tolist() == whole and int(mask.sum()) == encoder.max_length


# ---------------------------------------------------------------------------------------------------------------------
# Control characters: the regex classes are Unicode's categories; JSON lines stay JSON


def test_the_control_characters_are_unicodes_categories() -> None:
    for code in range(0x110000):
        char = chr(code)
        control = unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp")
        assert (text_problem(f"a{char}") is not None) == control, hex(code)


def test_a_huge_text_is_checked_and_shown_at_once() -> None:
    text = "word " * 3_000_000 + "\x85"
    assert text_problem(text) == "holds the control character \\x85 at character 15000001"
    assert shown(text).endswith("word \\x85")


def test_check_json_lines_are_json_with_the_terminals_characters_escaped(tmp_path: Path) -> None:
    folder = tmp_path / "dir\x85x\u202ey"
    folder.mkdir()
    script = write(folder, "t.yaml", f"title: ok\n{SEGMENTS}")
    result = memflow("check", "--json", script)
    assert result.exit_code == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert "\x85" not in line and "\u202e" not in line and "\\u0085x\\u202ey" in line
    assert json.loads(line)["script"] == str(script)
    assert json.loads(json_line({"é": "\u2028ü\t"})) == {"é": "\u2028ü\t"} and "é" in json_line("é")


# ---------------------------------------------------------------------------------------------------------------------
# Times as the scripts write them


@pytest.mark.parametrize("given,seconds", [("10s", 10.0), ("1m", 60.0), ("0:20", 20.0), ("12.5", 12.5)])
def test_segment_seconds_takes_the_times_scripts_take(tmp_path: Path, given: str, seconds: float) -> None:
    script = write(tmp_path, "p.jsonl", '{"prompts": ["a", "b"]}\n')
    result = memflow("check", script, "--json", "--segment-seconds", given)
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["chunks"] == math.ceil(2 * seconds / 0.75)  # two segments of that length, on the chunk grid


@pytest.mark.parametrize("given", ["abc", "nan", "-1", "1e3", ""])
def test_a_segment_length_that_is_no_time_is_one_line_naming_the_option(tmp_path: Path, given: str) -> None:
    script = write(tmp_path, "p.jsonl", '{"prompts": ["a"]}\n')
    refused(memflow("check", script, "--segment-seconds", given), f"--segment-seconds {given}:")


def test_messages_tell_apart_times_that_differ_below_a_millisecond(tmp_path: Path) -> None:
    close = write(tmp_path, "close.yaml", SEGMENTS.replace("start: 0s", "start: 0.0004s"))
    refused(memflow("check", close), "starts at 0.0004s, not at 0s")


# ---------------------------------------------------------------------------------------------------------------------
# Output folders


def test_a_script_given_twice_is_named_as_such(tmp_path: Path) -> None:
    script = write(tmp_path, "s.yaml", SEGMENTS)
    for command in ("check", "render"):
        model = DEMO[:2] if command == "render" else ()
        error = refused(memflow(command, script, tmp_path / "." / "s.yaml", "--out-dir", tmp_path / "d", *model))
        assert f"{script} is given twice" in error and "name each script once" in error
    assert not (tmp_path / "d").exists()


def test_check_refuses_an_out_dir_that_is_a_file_as_render_does(tmp_path: Path) -> None:
    script = write(tmp_path, "s.yaml", SEGMENTS)
    notes = write(tmp_path, "notes", "a file")
    for command, model in (("check", ()), ("render", DEMO[:2])):
        refused(memflow(command, script, "--out-dir", notes, *model), f"--out-dir {notes}: it is a file")
    assert notes.read_text() == "a file"


def test_a_run_that_writes_nothing_leaves_no_out_dir_it_made(tmp_path: Path) -> None:
    script = write(tmp_path, "s.yaml", SEGMENTS)
    result = memflow("render", script, "--out-dir", tmp_path / "new" / "sub", "--model", tmp_path / "no-weights")
    assert result.exit_code == 1 and "no such weights folder" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["s.yaml"]
    (tmp_path / "kept").mkdir()
    memflow("render", script, "--out-dir", tmp_path / "kept", "--model", tmp_path / "no-weights")
    assert (tmp_path / "kept").is_dir()  # a folder the user made stays


# ---------------------------------------------------------------------------------------------------------------------
# Scripts as other tools write them


def test_interactive_null_is_the_default(tmp_path: Path) -> None:
    script = write(tmp_path, "s.yaml", SEGMENTS + "settings:\n  interactive: null\n")
    result = memflow("check", "--json", script)
    assert result.exit_code == 0, result.stderr
    wrong = write(tmp_path, "w.yaml", SEGMENTS + "settings:\n  interactive: 3\n")
    refused(memflow("check", wrong), "must be true or false, or null")


def test_jsonl_files_with_old_mac_line_ends_are_read_line_by_line(tmp_path: Path) -> None:
    script = tmp_path / "cr.jsonl"
    script.write_bytes(b'{"prompts": ["a"]}\r{"prompts": ["b"]}\r\n{"prompts": ["c"]}\n')
    result = memflow("check", "--json", script)
    assert result.exit_code == 0, result.stderr
    assert [json.loads(line)["line"] for line in result.stdout.splitlines()] == [1, 2, 3]


def test_a_character_yaml_does_not_allow_is_named_with_its_line(tmp_path: Path) -> None:
    script = tmp_path / "nul.yaml"
    script.write_bytes(b'segments:\n  - start: 0\n    prompt: "a\x00b"\n')
    error = refused(memflow("check", script), f"{script}:3: not valid YAML: the character U+0000 is not allowed")
    assert "<unicode string>" not in error and "\\x0a" not in error


def test_a_date_is_shown_as_written(tmp_path: Path) -> None:
    script = write(tmp_path, "d.yaml", "segments:\n  - start: 2024-01-01\n    prompt: a\n")
    refused(memflow("check", script), "segments[0].start: the date 2024-01-01 is not a time")


@pytest.mark.parametrize("title", ["\\u202egnp.exe", "a\\u2067b"])
def test_a_title_that_reorders_its_file_name_is_refused(tmp_path: Path, title: str) -> None:
    script = write(tmp_path, "t.yaml", f'title: "{title}"\n{SEGMENTS}')
    refused(memflow("check", script), "title: the title holds", "reorders the text after it")


@pytest.mark.parametrize("invisible", ["\\u200b", "\\ufeff \\u2060", "\\u00ad"])
def test_a_prompt_or_title_of_invisible_characters_is_blank(tmp_path: Path, invisible: str) -> None:
    prompt = write(tmp_path, "p.yaml", f'segments:\n  - start: 0\n    prompt: "{invisible}"\n')
    refused(memflow("check", prompt), "the prompt is blank")
    title = write(tmp_path, "t.yaml", f'title: "{invisible}"\n{SEGMENTS}')
    refused(memflow("check", title), "the title must be non-blank text")


# ---------------------------------------------------------------------------------------------------------------------
# What sits at a sidecar's place is read within bounds, and text repeated by aliases counts


@pytest.mark.parametrize("kind", ["nested", "fifo", "endless", "huge"])
def test_a_sidecar_place_holding_what_memflow_never_wrote_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    script = write(tmp_path, "s.yaml", SEGMENTS)
    sidecar = tmp_path / "v.json"
    if kind == "nested":
        sidecar.write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "fifo":
        os.mkfifo(sidecar)  # a read would wait for a writer forever
    elif kind == "endless":
        sidecar.symlink_to("/dev/zero")
    else:
        with sidecar.open("wb") as file:
            file.truncate(MAX_SIDECAR_BYTES + 1)  # sparse: no disk used
    for extra in ((), ("--overwrite",), ("--skip-existing",)):
        refused(memflow("render", script, "-o", tmp_path / "v.mp4", *DEMO, *TAE, *extra), "was not written by memflow")
    result = memflow("check", script, "--against", tmp_path / "v.mp4")
    assert result.exit_code == 0 and "Traceback" not in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["s.yaml", "v.json"]


def test_a_long_prompt_repeated_by_aliases_is_refused_at_once(tmp_path: Path) -> None:
    prompt = "lighthouse " * 17_000
    lines = ["segments:", f'  - {{start: 0, prompt: &p "{prompt}"}}']
    lines += [f"  - {{start: {index * 0.75}, prompt: *p}}" for index in range(1, 2000)]
    script = write(tmp_path, "aliases.yaml", "\n".join(lines) + "\n")
    refused(memflow("check", script), f"more than {MAX_YAML_TEXT} characters (aliases count as what they repeat)")


@pytest.mark.parametrize("steps", ["1000,,500", "1000,750,", ",,,"])
def test_an_empty_step_is_refused_not_dropped(tmp_path: Path, steps: str) -> None:
    script = write(tmp_path, "s.yaml", SEGMENTS + f'settings:\n  steps: "{steps}"\n')
    refused(memflow("check", script), "settings.steps", "has an empty step")


def test_the_check_table_shows_a_prompt_on_one_line(tmp_path: Path) -> None:
    lines = "\\n".join(f"line {index} of the prompt" for index in range(40))
    script = write(tmp_path, "s.yaml", f'segments:\n  - start: 0\n    prompt: "{lines}"\n')
    result = memflow("check", script)
    assert result.exit_code == 0, result.stderr
    assert "line 0 of the prompt line 1 of" in result.stdout  # the newline is a space
    assert "line 5 of" not in result.stdout and len(result.stdout.splitlines()) < 15  # not forty lines of a cell


@pytest.mark.parametrize("stories", [50, 51])
def test_check_prints_a_line_a_story_beyond_fifty_tables(tmp_path: Path, stories: int) -> None:
    script = tmp_path / "many.jsonl"
    script.write_text("".join(json.dumps({"prompts": [f"story {i}", "and on"]}) + "\n" for i in range(stories)))
    result = memflow("check", script)
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("many-")]
    if stories == 50:
        assert len(lines) == 50 and "┏" in result.stdout  # a table each (its title line starts with the name)
    else:
        assert "┏" not in result.stdout and len(lines) == 51
        assert lines[6] == f"many-007  ({script}:7, seed 0): 2 segments, 27 chunks, 321 video frames, 20.06 s"


def test_a_duration_too_short_for_one_chunk_says_so(tmp_path: Path) -> None:
    script = write(tmp_path, "tiny.yaml", "duration: 1e-17\n" + SEGMENTS)
    refused(memflow("check", script), "duration: the duration (1e-17s) is too short for one chunk of video (0.75s)")


@pytest.mark.parametrize("prompt", [
    "&nbsp; " * 2100 + "a lighthouse at dusk",  # words the cleaning turns into whitespace
    ("&#" + "0" * 300 + "65; ") * 1000,  # entities that unescape to one character from hundreds
])  # fmt: skip
def test_a_huge_prompt_whose_cleaning_drops_words_is_encoded_as_the_whole_prompt(prompt: str) -> None:
    from memflow_cli.demo import build_demo_text_encoder
    from memflow_cli.text_encoder import clean_prompt

    encoder = build_demo_text_encoder()
    ids, mask = encoder.tokenize([prompt])
    whole = encoder.tokenizer(clean_prompt(prompt), truncation=True, max_length=encoder.max_length)["input_ids"]
    assert ids[0, : len(whole)].tolist() == whole and int(mask.sum()) == len(whole)


def test_steps_may_mix_commas_and_spaces(tmp_path: Path) -> None:
    script = write(tmp_path, "s.yaml", SEGMENTS + 'settings:\n  steps: "1000 750, 500 250"\n')
    assert memflow("check", script).exit_code == 0


def test_check_names_every_bad_script_a_line_each(tmp_path: Path) -> None:
    good = write(tmp_path, "good.yaml", SEGMENTS)
    first = write(tmp_path, "first.yaml", "segments: []\n")
    second = write(tmp_path, "second.yaml", SEGMENTS.replace("0s", "1s"))
    result = memflow("check", first, good, second)
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"error: {first}")
    assert lines[1].startswith(f"error: {second}:2: segments[0].start")


@pytest.mark.parametrize("key", ["~", "1", "null"])
def test_an_unknown_key_is_named_as_written(tmp_path: Path, key: str) -> None:
    script = write(tmp_path, "k.yaml", SEGMENTS + f"{key}: 3\n")
    refused(memflow("check", script), f"{script}:4: {key}: unknown key '{key}'")


@pytest.mark.parametrize(("arguments", "said"), [
    (["render", "x.yaml", "-o", "x.mp4", "--bogus"], "--bogus"),
    (["render"], "SCRIPT"),
    (["bogus"], "bogus"),
])  # fmt: skip
def test_a_usage_mistake_is_one_error_line_from_the_installed_command(arguments: list[str], said: str) -> None:
    result = subprocess.run([sys.executable, "-m", "memflow_cli", *arguments], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and said in line and "--help`" in line


def test_memflow_alone_shows_its_help_and_help_exits_0() -> None:
    alone = subprocess.run([sys.executable, "-m", "memflow_cli"], capture_output=True, text=True, timeout=120)
    assert "Commands:" in alone.stdout + alone.stderr and "check" in alone.stdout + alone.stderr
    helped = subprocess.run([sys.executable, "-m", "memflow_cli", "check", "--help"], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert helped.returncode == 0 and "Usage:" in helped.stdout


def test_the_preview_decoders_download_without_a_network_is_one_line_at_once_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memflow_cli.weights import fetch

    monkeypatch.setattr(fetch.urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    result = memflow("weights", "download", "--decoder", "tae", "--to", tmp_path / "tae")
    assert result.exit_code == 1 and "cannot reach" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "tae").exists()


@pytest.mark.parametrize("model", ["demo", "random"])
def test_verifying_a_built_in_model_says_it_has_no_files(model: str) -> None:
    refused(memflow("weights", "verify", "--model", model), f"--model {model}: that model is built with random weights")


def test_a_title_that_yaml_reads_as_a_number_says_to_quote_it(tmp_path: Path) -> None:
    script = write(tmp_path, "t.yaml", f"title: 2024\n{SEGMENTS}")
    refused(memflow("check", script), "title: the title must be text, got the number 2024", 'quote it: title: "2024"')


def test_the_missing_preview_decoder_names_the_weights_folder_too(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    (tmp_path / "weights").mkdir()
    result = memflow("weights", "verify", "--decoder", "tae", "--model", tmp_path / "weights")
    assert result.exit_code == 1, result.stderr  # missing weights, as for the model's own files
    assert f"are neither in {tmp_path / 'weights'} nor in the Hugging Face cache" in result.stderr


@pytest.mark.parametrize("mark", ["\\u200f", "\\u200e", "\\u061c"])
def test_a_title_with_a_direction_mark_of_hebrew_or_arabic_text_is_text(tmp_path: Path, mark: str) -> None:
    script = write(tmp_path, "t.yaml", f'title: "מגדלור{mark} 2"\n{SEGMENTS}')
    result = memflow("check", "--json", script)
    assert result.exit_code == 0, result.stderr


def test_a_script_file_name_that_reorders_its_video_name_is_refused_without_a_title(tmp_path: Path) -> None:
    script = write(tmp_path, "evil\u202e4pm.yaml", SEGMENTS)
    refused(memflow("check", script), "the file name holds \\u202e, which reorders the text after it")


def test_names_equal_only_under_unicode_case_folding_are_two_outputs(tmp_path: Path) -> None:
    """`Straße` and `Strasse` are two files on every file system: only case makes two names one output."""
    with reserved_output(tmp_path / "Straße.mp4"):
        with reserved_output(tmp_path / "Strasse.mp4"):
            assert lock_path(tmp_path / "Straße.mp4") != lock_path(tmp_path / "Strasse.mp4")
    (tmp_path / "Straße.mp4").write_bytes(b"video")
    with reserved_output(tmp_path / "Strasse.mp4"):
        pass


def test_a_segment_length_shorter_than_a_chunk_names_the_option(tmp_path: Path) -> None:
    script = write(tmp_path, "p.jsonl", '{"prompts": ["a"]}\n')
    refused(memflow("check", script, "--segment-seconds", "0.5"), "--segment-seconds 0.5: shorter than one chunk")


@pytest.mark.parametrize(("arguments", "command"), [
    (["render", "x.yaml", "-o", "x.mp4", "--seed"], "memflow render"),
    (["weights", "verify", "--model"], "memflow weights verify"),
])  # fmt: skip
def test_a_missing_option_value_names_its_commands_help(arguments: list[str], command: str) -> None:
    result = subprocess.run([sys.executable, "-m", "memflow_cli", *arguments], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert "requires an argument — see" in line and line.endswith(f"see `{command} --help`")
