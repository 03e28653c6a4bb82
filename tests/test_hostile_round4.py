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


# ---------------------------------------------------------------------------------------------------------------------
# 2. control characters from the page, 3. HTTP framing of the page server


@pytest.fixture
def page():
    from memflow_cli.live.prompts import PromptInbox
    from memflow_cli.live.server import LiveServer, parse_address

    warnings: list[str] = []
    with PromptInbox(None, warnings.append) as inbox, LiveServer(parse_address("0"), inbox) as server:
        yield server, inbox


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
    server, inbox = page
    for _ in range(8):
        reply = exchange(server, post(b"a storm", "Content-Length: 64"), close_after_send=True)
        assert status_of(reply) == 400 and b"nothing was queued" in reply
    assert inbox.pending() == 0


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
    server, inbox = page
    reply = exchange(server, post(b"7\r\na storm\r\n0\r\n\r\n", *headers), close_after_send=True)
    assert status_of(reply) in (400, 411)
    assert inbox.pending() == 0


def test_exactly_content_length_bytes_are_one_prompt(page) -> None:
    server, inbox = page
    reply = exchange(server, post(b"a storm rolls in", "Content-Length: 16"))
    assert status_of(reply) == 202
    assert inbox.take().prompt == "a storm rolls in" and inbox.pending() == 0


@pytest.mark.parametrize("prompt", ["\x1b]0;owned\x07\x1b[2J", "a\rforged", "a\x00b", "a\u2028b", "\x9b2J"])
def test_page_prompts_with_control_characters_are_refused(page, prompt: str) -> None:
    server, inbox = page
    body = prompt.encode()
    reply = exchange(server, post(body, f"Content-Length: {len(body)}"))
    assert status_of(reply) == 400 and b"control character" in reply
    assert inbox.pending() == 0


def test_page_prompts_keep_tabs_and_newlines_as_text(page) -> None:
    server, inbox = page
    body = b"a storm\n\trolls in"
    assert status_of(exchange(server, post(body, f"Content-Length: {len(body)}"))) == 202
    assert inbox.take().prompt == "a storm\n\trolls in"


def test_the_page_shows_prompts_as_text() -> None:
    from memflow_cli.live.page import PAGE

    assert "innerHTML" not in PAGE and "outerHTML" not in PAGE and "insertAdjacentHTML" not in PAGE
    assert "document.write" not in PAGE


def test_a_public_bind_on_every_interface_prints_addresses_others_can_use() -> None:
    from memflow_cli.live.prompts import PromptInbox
    from memflow_cli.live.server import LiveServer, parse_address

    with PromptInbox(None, print) as inbox, LiveServer(parse_address("0.0.0.0:0"), inbox, public=True) as server:
        assert server.urls and all("0.0.0.0" not in url and f"?token={server.token}" in url for url in server.urls)
        assert server.url == server.urls[0]
