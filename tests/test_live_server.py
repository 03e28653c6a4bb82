"""The page's server alone: who may bind where, the token, prompts posted, and viewers that leave or lag."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
import zlib
from urllib.parse import urlsplit

import numpy as np
import pytest

from memflow_cli.live.server import (
    BOUNDARY,
    MAX_PROMPT_BODY,
    LiveServer,
    ServeError,
    check_bind,
    parse_address,
    png,
)

from .live import served, taken, waiting


def request(
    server: LiveServer, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(server.address.host, server._httpd.server_address[1], timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        reply = connection.getresponse()
        return reply.status, reply.read()
    finally:
        connection.close()


def frames(count: int, value: int = 0) -> np.ndarray:
    return np.full((count, 8, 12, 3), value, dtype=np.uint8)


def test_only_loopback_binds_without_public():
    assert parse_address("8000").host == "127.0.0.1" and parse_address("[::1]:0").host == "::1"
    for loopback in ("8000", "127.0.0.1:8000", "localhost:8000", "[::1]:8000"):
        check_bind(parse_address(loopback), public=False)
    for other in ("0.0.0.0:8000", "192.168.1.5:8000", "example.org:80"):
        with pytest.raises(ServeError, match="add --public"):
            check_bind(parse_address(other), public=False)
        check_bind(parse_address(other), public=True)
    with pytest.raises(ServeError):
        parse_address("eighty")


def test_a_public_server_answers_403_without_its_token():
    with served("0.0.0.0:0", public=True) as (server, loop, _):
        token = server.token
        assert token and len(token) >= 16 and f"?token={token}" in server.url
        for path in ("/", "/video", "/events", "/status", "/?token=wrong"):
            assert request(server, "GET", path)[0] == 403
        assert request(server, "POST", "/prompt", b"sneaky")[0] == 403
        assert waiting(loop) == []
        status, page = request(server, "GET", f"/?token={token}")
        assert status == 200 and b"<form" in page
        assert request(server, "POST", f"/prompt?token={token}", b"a storm")[0] == 202
        assert taken(loop) == ["a storm"]


def test_the_page_is_self_contained():
    with served("0") as (server, loop, _):
        status, page = request(server, "GET", "/")
    assert status == 200
    assert b"http://" not in page and b"https://" not in page and b"<link" not in page  # nothing from elsewhere


def test_posted_prompts_are_checked_and_bounded():
    with served("0") as (server, loop, _):
        assert request(server, "POST", "/prompt", b"  the tide turns \n")[0] == 202
        status, body = request(server, "POST", "/prompt", b"   ")
        assert status == 400 and "empty" in json.loads(body)["error"]
        assert request(server, "POST", "/prompt", b"x" * (MAX_PROMPT_BODY + 1))[0] == 413
        status, body = request(server, "POST", "/prompt", b"a \xff prompt")
        assert status == 400
        assert json.loads(body) == {"error": "the prompt is not UTF-8 text (byte 3); nothing was queued"}
        assert taken(loop) == ["the tide turns"] and waiting(loop) == []


def test_a_loopback_session_refuses_other_sites_pages_and_rebound_names():
    with served("0") as (server, loop, _):
        here = f"127.0.0.1:{server._httpd.server_address[1]}"
        other_site = {"Host": here, "Origin": "https://example.org"}
        rebound = {"Host": f"attacker.example:{server._httpd.server_address[1]}"}
        assert request(server, "POST", "/prompt", b"sneaky", other_site)[0] == 403
        assert request(server, "GET", "/status", None, rebound)[0] == 403
        assert waiting(loop) == []
        same_page = {"Host": here, "Origin": f"http://{here}"}
        assert request(server, "POST", "/prompt", b"from the page", same_page)[0] == 202
        assert taken(loop) == ["from the page"]


def test_malformed_requests_are_answered_without_a_traceback(capfd):
    with served("0.0.0.0:0", public=True) as (server, loop, _):
        assert request(server, "GET", "/?token=%C3%A9")[0] == 403  # not ASCII: compared as bytes
        token = server.token
        status, _ = request(server, "POST", f"/prompt?token={token}", b"x", {"Content-Length": "\u00b2"})
        assert status in (400, 411)
        assert waiting(loop) == []
    assert "Traceback" not in capfd.readouterr().err


def test_png_frames_decode_to_the_pixels():
    frame = np.arange(8 * 12 * 3, dtype=np.uint8).reshape(8, 12, 3)
    data = png(frame)
    assert data.startswith(b"\x89PNG")
    idat = data[data.index(b"IDAT") + 4 : data.index(b"IEND") - 8]
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(8, 1 + 12 * 3)
    assert (rows[:, 0] == 0).all() and np.array_equal(rows[:, 1:].reshape(8, 12, 3), frame)


def read_stream(sock: socket.socket, done, timeout: float = 10.0) -> bytes:
    """Read from a /video stream until `done(data so far)`, the stream ends or `timeout` passes between reads."""
    sock.settimeout(timeout)
    data = b""
    while not done(data):
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return data


def read_parts(sock: socket.socket, parts: int, timeout: float = 10.0) -> int:
    """Read from a /video stream until `parts` frames have begun; returns how many did."""
    boundary = f"--{BOUNDARY}".encode()
    return read_stream(sock, lambda data: data.count(boundary) >= parts, timeout).count(boundary)


def largest_part(sock: socket.socket, at_least: int, timeout: float = 10.0) -> int:
    """Read from a /video stream until a frame of at least `at_least` bytes has begun; returns the largest frame's
    size (its Content-Length) seen by then."""

    def largest(data: bytes) -> int:
        return max((int(length) for length in re.findall(rb"Content-Length: (\d+)\r\n", data)), default=0)

    return largest(read_stream(sock, lambda data: largest(data) >= at_least, timeout))


def open_stream(server: LiveServer, path: str = "/video") -> socket.socket:
    host, port = server._httpd.server_address[:2]
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    return sock


def test_viewers_that_leave_or_never_read_disturb_neither_the_render_nor_other_viewers():
    with served("0") as (server, loop, _):
        leaver, stalled, watcher = open_stream(server), open_stream(server), open_stream(server)
        deadline = time.monotonic() + 10
        while server.viewers < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        now = time.perf_counter()
        server.show(frames(4), 0, [now + i / 16 for i in range(4)], [{"start_s": 0.0, "prompt": "p", "source": "x"}])
        assert read_parts(leaver, 1) >= 1
        leaver.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        leaver.close()  # gone mid-stream (a reset)
        # a long stream of big frames: the session hands them over without waiting for anyone
        big = np.random.default_rng(0).integers(0, 255, (192, 240, 320, 3), dtype=np.uint8)
        started = time.perf_counter()
        for start in range(0, 192, 12):
            server.show(big[start : start + 12], 4 + start, [time.perf_counter() + 0.001 * i for i in range(12)], [])
        assert time.perf_counter() - started < 1.0
        # the viewer that reads keeps getting frames: at least one of the big ones (the player drops a picture over
        # 1/16 s late while newer ones wait, and these are all due within 0.2 s: on a busy CPU only the last may
        # show); a viewer held up by the stalled one would get none of them
        assert largest_part(watcher, at_least=big[0].size // 2, timeout=10.0) >= big[0].size // 2
        deadline = time.monotonic() + 20
        while json.loads(request(server, "GET", "/status")[1])["frame"] < 195:  # playback went through to the end
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stalled.close()
        watcher.close()
    assert urlsplit(server.url).port  # closed cleanly, while a viewer never read a byte
