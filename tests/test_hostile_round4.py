"""Hostile input, round 4 (issue 29): each class of input through the real commands and the real page server.

Every refusal is one line on stderr (`error: ... — fix`), exit code 2 (or a 4xx from the page),
no traceback, and no file created or changed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .cli_helpers import DEMO, memflow
from .live import taken, waiting

SEGMENTS = "segments:\n  - start: 0s\n    prompt: a lighthouse at dusk\n"


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def refused(result, *words: str) -> str:
    """The one error line of a refused command, checked to hold `words`."""
    assert result.exit_code == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
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


# ---------------------------------------------------------------------------------------------------------------------
# 2. control characters from the page, 3. HTTP framing of the page server


@pytest.fixture
def page():
    from .live import served

    with served() as (server, loop, _):
        yield server, loop


def exchange(server, raw: bytes, close_after_send: bool = False) -> bytes:
    """Send `raw` on a socket of its own; the whole reply (the requests ask the server to close)."""
    import socket

    port = server._httpd.server_address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(raw)
        if close_after_send:
            connection.shutdown(socket.SHUT_WR)  # the client is gone: no more body will come
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    return reply


def post(body: bytes, *headers: str) -> bytes:
    head = "\r\n".join(["POST /prompt HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers, "", ""])
    return head.encode() + body


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def test_a_body_shorter_than_its_length_queues_nothing(page) -> None:
    server, loop = page
    for _ in range(8):
        reply = exchange(server, post(b"a storm", "Content-Length: 64"), close_after_send=True)
        assert status_of(reply) == 400 and b"nothing was queued" in reply
    assert waiting(loop) == []


@pytest.mark.parametrize(
    "headers",
    [
        ("Transfer-Encoding: chunked",),
        ("Transfer-Encoding: chunked", "Content-Length: 13"),
        ("Content-Length: 13", "Transfer-Encoding: identity"),
        ("Content-Length: 13", "Content-Length: 13"),
        ("Content-Length: +13",),
        ("Content-Length: 1_3",),
    ],
    ids=["chunked", "chunked and a length", "identity", "two lengths", "a signed length", "an underscored length"],
)
def test_a_body_framed_otherwise_than_by_one_length_is_refused(page, headers) -> None:
    server, loop = page
    reply = exchange(server, post(b"7\r\na storm\r\n0\r\n\r\n", *headers), close_after_send=True)
    assert status_of(reply) in (400, 411)
    assert waiting(loop) == []


def test_exactly_content_length_bytes_are_one_prompt(page) -> None:
    server, loop = page
    reply = exchange(server, post(b"a storm rolls in", "Content-Length: 16"))
    assert status_of(reply) == 202
    assert taken(loop) == ["a storm rolls in"] and waiting(loop) == []


@pytest.mark.parametrize("prompt", ["\x1b]0;owned\x07\x1b[2J", "a\rforged", "a\x00b", "a\u2028b", "\x9b2J"])
def test_page_prompts_with_control_characters_are_refused(page, prompt: str) -> None:
    server, loop = page
    body = prompt.encode()
    reply = exchange(server, post(body, f"Content-Length: {len(body)}"))
    assert status_of(reply) == 400 and b"control character" in reply
    assert waiting(loop) == []


def test_page_prompts_keep_tabs_and_newlines_as_text(page) -> None:
    server, loop = page
    body = b"a storm\n\trolls in"
    assert status_of(exchange(server, post(body, f"Content-Length: {len(body)}"))) == 202
    assert taken(loop) == ["a storm\n\trolls in"]


def test_the_page_shows_prompts_as_text() -> None:
    from memflow_cli.live.page import PAGE

    assert "innerHTML" not in PAGE and "outerHTML" not in PAGE and "insertAdjacentHTML" not in PAGE
    assert "document.write" not in PAGE


def test_a_public_bind_on_every_interface_prints_addresses_others_can_use() -> None:
    from .live import served

    with served("0.0.0.0:0", public=True) as (server, _, _):
        assert server.urls and all("0.0.0.0" not in url and f"?token={server.token}" in url for url in server.urls)
        assert server.url == server.urls[0]


# ---------------------------------------------------------------------------------------------------------------------
# 4. two outputs, one sidecar


def fake_render(video: Path, seed: int) -> None:
    """A finished render's files as memflow leaves them: the video and its sidecar."""
    video.write_bytes(b"video")
    video.with_suffix(".json").write_text(json.dumps({"memflow_version": "0", "seed": seed}), encoding="utf-8")


@pytest.mark.parametrize("first,second", [("X.MP4", "X.mp4"), ("x.mp4", "X.mp4"), ("Story.Mp4", "STORY.mp4")])
def test_a_second_spelling_of_an_output_is_refused(tmp_path: Path, first: str, second: str) -> None:
    script = write(tmp_path, "story.yaml", SEGMENTS)
    fake_render(tmp_path / first, seed=0)
    before = files_under(tmp_path)
    for extra in ((), ("--overwrite",), ("--skip-existing",)):
        error = refused(memflow("render", script, "-o", tmp_path / second, "--seed", "5", *DEMO, *extra), first)
        assert "one output" in error
    assert files_under(tmp_path) == before  # the first video's sidecar still says seed 0


def test_stories_whose_outputs_fold_to_one_name_are_refused_by_check_and_render(tmp_path: Path) -> None:
    one = write(tmp_path, "one.yaml", f"title: Storm\n{SEGMENTS}")
    two = write(tmp_path, "two.yaml", f"title: STORM\n{SEGMENTS}")
    out_dir = tmp_path / "renders"
    refused(memflow("check", one, two, "--out-dir", out_dir), "two stories would both write")
    refused(memflow("render", one, two, "--out-dir", out_dir, *DEMO), "two stories would both write")
    assert not out_dir.exists()


def test_one_output_in_any_case_has_one_lock() -> None:
    from memflow_cli.output import lock_path, sidecar_path

    assert lock_path(Path("d/X.MP4")) == lock_path(Path("d/X.mp4"))
    assert sidecar_path(Path("d/X.MP4")) == sidecar_path(Path("d/X.mp4")) == Path("d/X.json")


# ---------------------------------------------------------------------------------------------------------------------
# 5. numbers as a person means them


def story_json(tmp_path: Path, text: str) -> dict:
    result = memflow("check", "--json", write(tmp_path, "story.yaml", text))
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_leading_zeros_are_decimal(tmp_path: Path) -> None:
    record = story_json(tmp_path, "seed: 010\nduration: 012\n" + SEGMENTS + "  - start: 010\n    prompt: b\n")
    assert record["seed"] == 10  # YAML 1.1 read 8
    assert record["chunks"] == 16  # 12 s: 16 chunks of 0.75 s (YAML 1.1: 10 s, 14 chunks)


def test_settings_with_leading_zeros_are_decimal(tmp_path: Path) -> None:
    from memflow_cli.script import load_scripts

    story = load_scripts(write(tmp_path, "story.yaml", SEGMENTS + "settings:\n  bank_size: 010\n  shift: 05.0\n"))[0]
    assert story.settings == {"bank_size": 10, "shift": 5.0}


NOT_NUMBERS = {
    "a hexadecimal seed": ("seed: 0x10\n" + SEGMENTS, 1, "seed"),
    "an octal seed": ("seed: 0o10\n" + SEGMENTS, 1, "seed"),
    "an underscored seed": ("seed: 1_000\n" + SEGMENTS, 1, "seed"),
    "a binary seed": ("seed: 0b101\n" + SEGMENTS, 1, "seed"),
    "a hexadecimal start": ("duration: 30s\n" + SEGMENTS + "  - start: 0x10\n    prompt: b\n", 5, "segments[1].start"),
    "a hexadecimal duration": ("duration: 0x10\n" + SEGMENTS, 1, "duration"),
    "an underscored duration": ("duration: 1_0\n" + SEGMENTS, 1, "duration"),
    "spaces inside a time": ("duration: 30s\n" + SEGMENTS + "  - start: 0 . 7 5 s\n    prompt: b\n", 5, "start"),
    "a space between units": ("duration: 1m 30s\n" + SEGMENTS, 1, "duration"),
    "Arabic-Indic digits": ("duration: ١٠s\n" + SEGMENTS, 1, "duration"),
    "full-width digits": ("duration: ５s\n" + SEGMENTS, 1, "duration"),
    "a duration of 1e20": ("duration: 1e20\n" + SEGMENTS, 1, "24h"),
    "a duration of 99999h": ("duration: 99999h\n" + SEGMENTS, 1, "24h"),
    "a duration of 24h and a second": ("duration: 24:00:01\n" + SEGMENTS, 1, "24h"),
    "a start beyond a day": ("duration: 30s\n" + SEGMENTS + "  - start: 25h\n    prompt: b\n", 5, "24h"),
}


@pytest.mark.parametrize("case", NOT_NUMBERS, ids=list(NOT_NUMBERS))
def test_numbers_that_mean_something_else_are_refused(tmp_path: Path, case: str) -> None:
    text, line, word = NOT_NUMBERS[case]
    script = write(tmp_path, "story.yaml", text)
    refused(memflow("check", script), f"{script}:{line}:", word)
    refused(memflow("render", script, "--out-dir", tmp_path / "renders", *DEMO), f"{script}:{line}:", word)
    assert not (tmp_path / "renders").exists()


def test_a_day_is_the_longest_video_everywhere(tmp_path: Path) -> None:
    assert story_json(tmp_path, "duration: 24h\n" + SEGMENTS)["duration_s"] > 86399
    script = write(tmp_path, "ok.yaml", SEGMENTS)
    for option in ("24h1s", "99999h", "86401", "24:00:01"):
        refused(memflow("render", script, "-o", tmp_path / "x.mp4", "--duration", option, *DEMO), "--duration", "24h")
    refused(memflow("live", "--prompt", "a", "-o", tmp_path / "y.mp4", "--duration", "25h", *DEMO), "24h")
    assert files_under(tmp_path).keys() == {"ok.yaml", "story.yaml"}


def test_a_zero_length_says_what_it_is(tmp_path: Path) -> None:
    result = memflow("live", "--prompt", "a", "-o", tmp_path / "y.mp4", "--duration", "0", *DEMO)
    refused(result, "--duration", "longer than 0s")
    assert "preview" not in result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# 6. devices checked before anything loads


@pytest.mark.parametrize("device", ["mps", "meta", "cpu:7", "xpu", "cuda:x", "CUDA", "cuda:0:1", " cpu", "gpu", ""])
def test_devices_memflow_cannot_use_are_one_line_before_anything_loads(tmp_path: Path, device: str) -> None:
    import time

    script = write(tmp_path, "story.yaml", SEGMENTS)
    started = time.perf_counter()
    refused(memflow("render", script, "-o", tmp_path / "x.mp4", "--model", "demo", "--device", device), "--device")
    refused(memflow("render", script, "-o", tmp_path / "y.mp4", *DEMO, "--decode-device", device), "--decode-device")
    refused(memflow("live", "--prompt", "a", "-o", tmp_path / "z.mp4", "--model", "demo", "--device", device))
    assert time.perf_counter() - started < 20  # no model was built
    assert files_under(tmp_path).keys() == {"story.yaml"}


def test_a_missing_gpu_is_one_line(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 9:
        pytest.skip("this machine has a cuda:9")
    script = write(tmp_path, "story.yaml", SEGMENTS)
    refused(memflow("render", script, "-o", tmp_path / "x.mp4", "--model", "demo", "--device", "cuda:9"), "cuda:9")


# ---------------------------------------------------------------------------------------------------------------------
# 2. nothing from outside reaches the terminal as a control sequence


def test_script_names_with_escape_sequences_are_printed_escaped(tmp_path: Path) -> None:
    good = write(tmp_path, "a\x1b]0;owned\x07\x1b[2J.yaml", f"title: lighthouse\n{SEGMENTS}")
    result = memflow("check", good)
    assert result.exit_code == 0, result.stderr
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "\\x1b]0;owned\\x07" in result.stdout
    bad = write(tmp_path, "b\x1b[2J\rforged.yaml", "segments: 5\n")
    line = refused(memflow("check", bad), "\\x1b[2J\\x0dforged.yaml")
    assert "\x1b" not in line and "\r" not in line


def test_stdin_prompts_with_control_characters_are_refused_in_one_escaped_line() -> None:
    import os

    from memflow_cli.live.events import EventQueue
    from memflow_cli.live.loop import SessionLoop
    from memflow_cli.live.prompts import StdinReader

    from .live import Recorder, taken, waiting

    events, report = EventQueue(), Recorder()
    read, write_end = os.pipe()
    with StdinReader(read, events) as reader, SessionLoop(events, report) as loop:
        os.write(write_end, b"\x1b]0;owned\x07\x1b[2J\na storm\ta wind\n")
        os.close(write_end)
        reader.sync()
        assert taken(loop) == ["a storm\ta wind"] and waiting(loop) == []
    os.close(read)
    assert len(report.warnings) == 1 and "control character \\x1b" in report.warnings[0]


def test_the_consoles_escape_what_they_are_given() -> None:
    import io

    from memflow_cli.text import SafeConsole

    console = SafeConsole(file=io.StringIO(), highlight=False, emoji=False)
    console.print("[bold]title[/] \x1b[2J \x9b \u202e \ud800 line\nnext", soft_wrap=True)
    printed = console.file.getvalue()
    assert printed == "title \\x1b[2J \\x9b \\u202e \\ud800 line\nnext\n"


# ---------------------------------------------------------------------------------------------------------------------
# 7. leftovers


def test_overwrite_over_a_partial_that_is_a_folder_is_one_line_and_leaves_no_lock(tmp_path: Path) -> None:
    from memflow_cli.output import lock_path, partial_path

    script = write(tmp_path, "story.yaml", SEGMENTS)
    target = tmp_path / "out.mp4"
    partial_path(target).mkdir()
    refused(memflow("render", script, "-o", target, "--overwrite", *DEMO), "is a folder")
    assert partial_path(target).is_dir() and not lock_path(target).exists() and not target.exists()


def test_a_script_name_too_long_for_a_video_is_refused_by_check_as_by_render(tmp_path: Path) -> None:
    script = write(tmp_path, "s" * 245 + ".yaml", SEGMENTS)
    refused(memflow("check", script), "the file name is")
    refused(memflow("check", script, "--out-dir", tmp_path / "renders"), "the file name is")
    refused(memflow("render", script, "--out-dir", tmp_path / "renders", *DEMO), "the file name is")
    assert not (tmp_path / "renders").exists()


def test_jsonl_keys_given_twice_are_refused(tmp_path: Path) -> None:
    script = write(tmp_path, "p.jsonl", '{"prompts": ["a"]}\n{"prompts": ["b"], "prompts": ["c"]}\n')
    refused(memflow("check", script), f"{script}:2:", "given twice")


def test_yaml_merge_keys_are_one_line(tmp_path: Path) -> None:
    text = "segments:\n  - &first {start: 0s, prompt: a}\n  - <<: *first\n    start: 1s\n"
    script = write(tmp_path, "story.yaml", text)
    refused(memflow("check", script), f"{script}:3:", "merge keys")


def test_batch_render_names_a_folder_or_a_pipe_that_looks_like_a_script(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from .cli_helpers import BATCH_RENDER, REPO

    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "folder.yaml").mkdir()
    os.mkfifo(scripts / "pipe.jsonl")
    write(scripts, "Storm.yaml", SEGMENTS)
    write(scripts, "twin.yaml", f"title: storm\n{SEGMENTS}")
    check_only = f'#!/bin/sh\n[ "$1" = check ] && exec {sys.executable} -m memflow_cli "$@"\nexit 0\n'
    fake = write(tmp_path, "memflow.sh", check_only)  # memflow's own check; a render that does nothing
    fake.chmod(0o755)
    env = {**os.environ, "MEMFLOW": str(fake), "PYTHONPATH": str(REPO)}
    result = subprocess.run(["bash", BATCH_RENDER, scripts, tmp_path / "out"], capture_output=True, text=True,
                            env=env, timeout=120)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "folder.yaml: is a folder" in result.stderr and "pipe.jsonl: is a pipe" in result.stderr
    assert "twin.yaml" in result.stderr and "which" in result.stderr  # Storm.mp4 and storm.mp4 are one output
    assert "batch: 1 rendered, 0 skipped, 3 failed" in result.stdout


def test_weights_download_without_a_network_is_one_line_at_once(tmp_path: Path, monkeypatch) -> None:
    import socket
    import time

    from huggingface_hub import constants

    with socket.socket() as unused:  # a port nothing listens on: the connection is refused at once
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.perf_counter()
    result = memflow("weights", "download", "--to", tmp_path / "w")
    assert time.perf_counter() - started < 5  # the hub client retried for 26 s
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: cannot reach http://127.0.0.1:{port}") and "Retry" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()  # no folder, no .lock


# ---------------------------------------------------------------------------------------------------------------------
# 8. output details


def test_a_render_to_a_pipe_prints_no_bar_and_its_path_alone(tmp_path: Path) -> None:
    script = write(tmp_path, "story.yaml", "duration: 0.75s\n" + SEGMENTS)
    target = tmp_path / "out.mp4"
    result = memflow("render", script, "-o", target, *DEMO)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{target}\n"
    assert "━" not in result.stderr and "chunks" not in result.stderr  # no frame of a bar


def test_a_near_miss_of_demo_is_named(tmp_path: Path) -> None:
    script = write(tmp_path, "story.yaml", SEGMENTS)
    result = memflow("render", script, "-o", tmp_path / "x.mp4", "--model", "demoo", "--device", "cpu")
    assert result.exit_code != 0 and "did you mean --model demo?" in result.stderr


def test_one_chunk_is_one_chunk(tmp_path: Path) -> None:
    result = memflow("check", write(tmp_path, "story.yaml", "duration: 0.5s\n" + SEGMENTS))
    assert "1 chunk," in result.stdout and "1 chunks" not in result.stdout


def test_a_download_that_fails_midway_leaves_no_lock_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from memflow_cli.loading import WeightsError
    from memflow_cli.weights import fetch

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    kept = tmp_path / ".cache" / "huggingface" / "download" / "an earlier one.lock"
    kept.parent.mkdir(parents=True)
    kept.touch()

    def connection_lost(repo, name, *, local_dir=None, **kwargs):
        (Path(local_dir) / ".cache" / "huggingface" / "download" / f"{name}.lock").touch()
        raise OSError("connection reset")

    monkeypatch.setattr(fetch, "hf_hub_download", connection_lost)
    with pytest.raises(WeightsError, match="could not download"):
        fetch.download(tmp_path)
    assert [path.name for path in tmp_path.rglob("*.lock")] == ["an earlier one.lock"]


def test_paths_that_are_not_utf8_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    import os

    script = write(tmp_path, "story.yaml", SEGMENTS)
    not_utf8 = tmp_path / os.fsdecode(b"video-\xff.mp4")  # a surrogate escape: no sidecar could record it
    refused(memflow("render", script, "-o", not_utf8, *DEMO), "-o", "not UTF-8")
    named = tmp_path / os.fsdecode(b"script-\xff.yaml")
    named.write_text(SEGMENTS, encoding="utf-8")
    refused(memflow("check", named), "not UTF-8")
    untitled = write(tmp_path, "a\x1b[2J.yaml", SEGMENTS)  # its name would be its title
    refused(memflow("check", untitled), "control character \\x1b")
    assert files_under(tmp_path).keys() == {"story.yaml", os.fsdecode(b"script-\xff.yaml"), "a\x1b[2J.yaml"}


def test_stories_made_longer_than_a_day_by_their_defaults_are_refused(tmp_path: Path) -> None:
    jsonl = write(tmp_path, "p.jsonl", json.dumps({"prompts": ["a"] * 10}) + "\n")
    error = refused(memflow("check", jsonl, "--segment-seconds", "9000"), "24h")  # ten segments of 2.5 hours
    assert f"{jsonl}:1: prompts: 10 prompts of 9000s each last 90000s" in error and "--segment-seconds" in error
    refused(memflow("check", jsonl, "--segment-seconds", "86401"), "--segment-seconds 86401", "24h")
    late = write(tmp_path, "late.yaml", SEGMENTS + "  - start: '23:59:55'\n    prompt: b\n")  # + a 10 s segment
    error = refused(memflow("check", late), "24h")
    assert f"{late}:4: segments[1].start: without a duration the story ends a segment's length (10s)" in error
    assert "duration of 24h or less" in error
    refused(memflow("render", late, "--out-dir", tmp_path / "renders", *DEMO), "24h")
    assert not (tmp_path / "renders").exists()


def test_live_never_writes_its_replay_over_the_opening_script_in_another_case(tmp_path: Path) -> None:
    script = write(tmp_path, "story.yaml", SEGMENTS)
    other_spelling = write(tmp_path, "STORY.yaml", SEGMENTS)  # on a case-insensitive file system: the same file
    before = files_under(tmp_path)
    refused(memflow("live", script, "-o", tmp_path / "STORY.mp4", "--overwrite", *DEMO), "opening script")
    assert files_under(tmp_path) == before and other_spelling.exists()


def test_a_newline_in_an_unknown_key_does_not_print_a_second_line(tmp_path: Path) -> None:
    script = write(tmp_path, "story.yaml", SEGMENTS + '"forged\\nerror: all good": 1\n')
    result = memflow("check", script)
    line = refused(result, "unknown key")
    assert len(result.stderr.strip().splitlines()) == 1 and "forged\\x0aerror" in line


def test_a_get_with_a_body_is_refused_and_its_body_never_read_as_a_request(page) -> None:
    server, loop = page
    smuggled = b"POST /prompt HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 7\r\n\r\na storm"
    for framing in (f"Content-Length: {len(smuggled)}", "Transfer-Encoding: chunked"):
        head = f"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n{framing}\r\n\r\n".encode()
        reply = exchange(server, head + smuggled, close_after_send=True)
        assert status_of(reply) == 400 and reply.count(b"HTTP/1.1 ") == 1
    assert waiting(loop) == []


@pytest.mark.parametrize("serve", ["８０００", "127.0.0.1:٨٠٠٠", "80\n00", "+8000"])
def test_serve_ports_are_ascii_digits(tmp_path: Path, serve: str) -> None:
    result = memflow("live", "--prompt", "a", "-o", tmp_path / "x.mp4", "--serve", serve, *DEMO)
    refused(result, "--serve", "give a port")
    assert len(result.stderr.strip().splitlines()) == 1
