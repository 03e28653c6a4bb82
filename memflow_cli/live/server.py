"""`--serve`: one page that plays the session as it is made, shows the prompt and timeline, and takes prompts.

Standard library only. `GET /` is the page (everything inline); `GET /video` a `multipart/x-mixed-replace`
stream of PNG frames (an `<img>` plays it) paced by the playback clock; `GET /events` Server-Sent Events
with the frame on screen, the current prompt and the timeline; `POST /prompt` queues the next prompt.

The render never waits for a viewer: frames go to each client through a small queue of its own, and a
client too slow to take them loses the oldest. A client that goes away only ends its own handler. The
handlers and the player take no decision: prompts and viewers go to the session loop as events
(`events.py`), and a posted prompt is answered as the loop says.

Loopback binds need nothing else; any other bind needs `public=True` and then every request must carry
the random token (`?token=...`, printed once in the URL), or it gets 403.
"""

from __future__ import annotations

import ipaddress
import json
import queue
import secrets
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from ..text import ascii_int, one_line
from .events import Answer, EventQueue, PromptAccepted, PromptRejected, PromptTyped, ViewerJoined, ViewerLeft
from .page import PAGE

CLIENT_QUEUE = 4  # frames (or events) waiting for one client; beyond, the oldest is dropped
MAX_PROMPT_BODY = 16 * 1024  # bytes of a POST /prompt body
BOUNDARY = "memflowframe"
PROMPT_ANSWER_S = 5.0  # how long a posted prompt waits for the session loop's answer
_END = None  # queue sentinel: the session is over
_ENDED_POLL_S = 1.0  # how often a stream with nothing to send looks whether the session is over


class ServeError(ValueError):
    """A --serve address that cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_address(text: str) -> Address:
    """`[HOST:]PORT` -> Address (host 127.0.0.1 when left out); raises ServeError."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    number = ascii_int(port)  # not "８０"
    if number is None or not 0 <= number <= 65535:
        raise ServeError(f"--serve {one_line(text)}: give a port (0-65535), optionally after HOST:, like 8000 or "
                         "0.0.0.0:8000")
    return Address(host, number)


def reachable_hosts(unspecified: str) -> list[str]:
    """This machine's name, then its addresses of the family of `unspecified` (0.0.0.0: IPv4, ::: IPv6)."""
    name = socket.gethostname()
    family = socket.AF_INET6 if ":" in unspecified else socket.AF_INET
    try:
        found = {info[4][0] for info in socket.getaddrinfo(name, None, family, socket.SOCK_STREAM)}
    except OSError:  # a name that does not resolve on this machine
        found = set()
    addresses = sorted(address for address in found if not ipaddress.ip_address(address.split("%")[0]).is_loopback)
    return [name, *addresses] if name else [*addresses] or ["127.0.0.1"]


def check_bind(address: Address, public: bool) -> None:
    """A non-loopback bind only with `public`; raises ServeError."""
    if not address.loopback and not public:
        raise ServeError(
            f"--serve {address.host}:{address.port} would let other machines watch and steer the session; "
            "add --public to allow it (a random token is then required in the URL), or serve on 127.0.0.1"
        )


def png(frame: np.ndarray, level: int = 1) -> bytes:
    """An RGB frame [H, W, 3] uint8 as PNG bytes (no filter, zlib `level`)."""
    height, width, _ = frame.shape
    rows = np.empty((height, 1 + width * 3), dtype=np.uint8)
    rows[:, 0] = 0  # filter type 0 on every row
    rows[:, 1:] = frame.reshape(height, width * 3)

    def part(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + part(b"IHDR", header) + part(b"IDAT", zlib.compress(rows.tobytes(), level)) + \
        part(b"IEND", b"")  # fmt: skip


def _put_dropping_oldest(q: queue.Queue, item: Any) -> None:
    while True:
        try:
            q.put_nowait(item)
            return
        except queue.Full:
            try:
                q.get_nowait()
            except queue.Empty:
                pass


def _publish(viewers: frozenset[queue.Queue], item: Any) -> None:
    """To every viewer's queue; never blocks (a full queue loses its oldest item)."""
    for q in viewers:
        _put_dropping_oldest(q, item)


class LiveServer:
    """The page's server and its player thread; use as a context manager (`start`/`close`).

    Its threads only move bytes: a handler puts what a viewer sends (a prompt, joining, leaving) on the session's
    queue (`events`) and answers with what the session loop says; the player sends each frame when it is due
    to the viewers the loop last listed (`watch`). Nothing here takes a lock: the viewer lists and the status are
    replaced whole, never changed in place.
    """

    def __init__(self, address: Address, events: EventQueue, *, public: bool = False, fps: int = 16,
                 clock: Callable[[], float] = time.perf_counter):  # fmt: skip
        check_bind(address, public)
        self.address = address
        self.events = events
        self.token = secrets.token_urlsafe(16) if public else None
        self.fps = fps
        self.clock = clock
        self.ended = False  # the last frame has played: the streams end
        self._video_viewers: frozenset[queue.Queue] = frozenset()
        self._event_viewers: frozenset[queue.Queue] = frozenset()
        self._status: dict[str, Any] = {"frame": 0, "time_s": 0.0, "prompt": "", "segments": [], "ended": False}
        self._playlist: queue.Queue = queue.Queue()  # (due, frame array, status) in order; unbounded, frames are few
        self._httpd = _server_class(address.host)((address.host, address.port), _handler(self))
        self._threads = [
            threading.Thread(target=self._httpd.serve_forever, name="memflow-live-http", daemon=True),
            threading.Thread(target=self._play, name="memflow-live-player", daemon=True),
        ]

    @property
    def url(self) -> str:
        """The page's address; for a bind on every interface (0.0.0.0, ::), under this machine's name."""
        return self.urls[0]

    @property
    def urls(self) -> list[str]:
        """Addresses of the page other machines can use: the bound host, or for 0.0.0.0 / :: the machine's
        name and its addresses (an address nobody can connect to is never printed)."""
        host, port = self._httpd.server_address[:2]
        hosts = reachable_hosts(str(host)) if ipaddress.ip_address(str(host)).is_unspecified else [str(host)]
        query = f"?token={self.token}" if self.token else ""
        return [f"http://{f'[{name}]' if ':' in name else name}:{port}/{query}" for name in hosts]

    def start(self) -> LiveServer:
        for thread in self._threads:
            thread.start()
        return self

    # -- what the session loop hands over ------------------------------------------------------------------------

    def show(self, frames: np.ndarray, first_frame: int, due: Sequence[float], segments: list[dict[str, Any]]) -> None:
        """Frames [N, H, W, 3] of the video, from frame `first_frame`, to play at `due`; never blocks."""
        for offset, (frame, at) in enumerate(zip(frames, due, strict=True)):
            self._playlist.put((at, first_frame + offset, frame, segments))

    def watch(self, video: frozenset[queue.Queue], events: frozenset[queue.Queue]) -> None:
        """The viewers now: the queues of the video streams and of the event streams."""
        self._video_viewers, self._event_viewers = video, events

    @property
    def viewers(self) -> int:
        """Video streams open now (as the session loop last counted them)."""
        return len(self._video_viewers)

    def end(self) -> None:
        """The session is over: streams finish once the last frame has played."""
        self._playlist.put(_END)

    # -- the player ----------------------------------------------------------------------------------------

    def _play(self) -> None:
        while (item := self._playlist.get()) is not _END:
            due, index, frame, segments = item
            late = self.clock() - due
            if late < 0:
                time.sleep(-late)
            self._status = status = _status_at(index, segments, self.fps)
            video = self._video_viewers
            if video and (late < 1.0 / self.fps or self._playlist.empty()):  # behind: skip the picture
                _publish(video, png(np.asarray(frame)))
            _publish(self._event_viewers, status)
        self._status = {**self._status, "ended": True}
        _publish(self._event_viewers, self._status)
        self.ended = True
        _publish(self._video_viewers | self._event_viewers, _END)

    def status(self) -> dict[str, Any]:
        return dict(self._status)

    # -- lifetime --------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop serving and free the port; also for a server bound but never started."""
        self._playlist.put(_END)
        player, http = self._threads[1], self._threads[0]
        if player.is_alive():
            player.join(timeout=5.0)
        self.ended = True
        if http.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _status_at(index: int, segments: list[dict[str, Any]], fps: int) -> dict[str, Any]:
    """What the page shows with frame `index`: its time, the prompt on screen, the timeline."""
    time_s = index / fps
    current = [s for s in segments if s["start_s"] <= time_s + 1e-9]
    return {"frame": index, "time_s": round(time_s, 3), "prompt": current[-1]["prompt"] if current else "",
            "segment": len(current) - 1, "segments": segments, "ended": False}  # fmt: skip


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a viewer's stream never holds the session's end

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A viewer that left or sent nonsense ends only its own request: no traceback on the session's terminal."""
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError)):
            print(one_line(f"live: a request from {client_address[0]} failed: {type(error).__name__}: {error}"),
                  file=sys.stderr)


def _from_this_machine(host: str | None, origin: str | None) -> bool:
    """Whether a request without a token comes from a page of this loopback session: its Host is a loopback
    name (a site that rebinds its name to 127.0.0.1 still sends its own), and an Origin, if sent, is that host
    (another site's page posting here sends its own)."""
    name = urlsplit(f"//{host}").hostname if host else None
    if name is None or not is_loopback(name):
        return False
    return origin is None or origin == f"http://{host}"


class _Server6(_Server):
    address_family = socket.AF_INET6


def _server_class(host: str) -> type[ThreadingHTTPServer]:
    return _Server6 if ":" in host else _Server


def _handler(server: LiveServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "memflow-live"

        def log_message(self, format: str, *args: Any) -> None:  # the terminal is the session's
            pass

        timeout = 30  # seconds a request may take to arrive; the streams clear it (`_stream_head`)

        def _allowed(self) -> bool:
            if server.token is None:
                if _from_this_machine(self.headers.get("Host"), self.headers.get("Origin")):
                    return True
                refused = b"403: only pages of this session, opened on this machine\n"
                self._send(403, refused, "text/plain; charset=utf-8")
                return False
            given = parse_qs(urlsplit(self.path).query).get("token", [""])[0]
            if secrets.compare_digest(given.encode(), server.token.encode()):
                return True
            self._send(403, b"403: this session needs the token of its URL\n", "text/plain; charset=utf-8")
            return False

        def _send(self, code: int, body: bytes, kind: str) -> None:
            if code >= 400:
                self.close_connection = True  # a body left unread must not be read as the next request
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.headers.get_all("Transfer-Encoding") or self.headers.get_all("Content-Length", ["0"]) != ["0"]:
                self._refuse(400, "a GET request carries no body")  # which would be read as the next request
                return
            if not self._allowed():
                return
            route = urlsplit(self.path).path
            if route == "/":
                self._send(200, PAGE.encode("utf-8"), "text/html; charset=utf-8")
            elif route == "/video":
                self._video()
            elif route == "/events":
                self._events()
            elif route == "/status":
                self._send(200, json.dumps(server.status()).encode(), "application/json")
            else:
                self._send(404, b"404: not here\n", "text/plain; charset=utf-8")

        def do_POST(self) -> None:
            if not self._allowed():
                return
            if urlsplit(self.path).path != "/prompt":
                self._send(404, b"404: not here\n", "text/plain; charset=utf-8")
                return
            body = self._body()
            if body is None:
                return
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as error:  # refused as a script's text is, not read with U+FFFD in its place
                reason = f"the prompt is not UTF-8 text (byte {error.start + 1}); nothing was queued"
                self._send(400, json.dumps({"error": reason}).encode(), "application/json")
                return
            answer: Answer[PromptAccepted | PromptRejected] = Answer()
            server.events.put(PromptTyped(text, server.clock(), "page", answer))
            try:
                said = answer.wait(PROMPT_ANSWER_S)
            except queue.Empty:  # the session is not taking prompts (it is being written down)
                self._send(503, json.dumps({"error": "the session takes no prompts now"}).encode(), "application/json")
                return
            if isinstance(said, PromptRejected):
                self._send(400, json.dumps({"error": said.reason}).encode(), "application/json")
                return
            self._send(202, json.dumps({"queued": said.prompt}).encode(), "application/json")

        def _refuse(self, code: int, text: str) -> None:
            """Answer `code` and close: after a request whose body cannot be framed, the stream is not trusted."""
            self.close_connection = True
            self._send(code, f"{code}: {text}\n".encode(), "text/plain; charset=utf-8")

        def _body(self) -> bytes | None:
            """The request's body, exactly Content-Length bytes; None (refused, answered) for anything else.

            Nothing is taken from a body framed any other way (`Transfer-Encoding`, several or odd lengths),
            too long, or shorter than it said (the client went away or stopped sending): no part of it is queued.
            """
            if self.headers.get_all("Transfer-Encoding"):
                self._refuse(411, "send the prompt with a Content-Length, not a Transfer-Encoding")
                return None
            lengths = self.headers.get_all("Content-Length") or []
            if len(lengths) != 1 or not (lengths[0].isascii() and lengths[0].isdigit()):
                self._refuse(411, "send the prompt with one Content-Length")
                return None
            length = int(lengths[0])
            if length > MAX_PROMPT_BODY:
                self._refuse(413, "the prompt is too long")
                return None
            try:
                body = self.rfile.read(length)
            except (TimeoutError, ConnectionError):
                body = b""
            if len(body) != length:
                self._refuse(400, f"the body ended after {len(body)} of its {length} bytes; nothing was queued")
                return None
            return body

        def _stream_head(self, kind: str) -> None:
            self.connection.settimeout(None)  # a stream lasts the session; a gone viewer fails its writes
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

        def _video(self) -> None:
            with closing(self._viewing("video", f"multipart/x-mixed-replace; boundary={BOUNDARY}")) as frames:
                for data in frames:
                    head = f"--{BOUNDARY}\r\nContent-Type: image/png\r\nContent-Length: {len(data)}\r\n\r\n"
                    self.wfile.write(head.encode() + data + b"\r\n")
                    self.wfile.flush()

        def _events(self) -> None:
            with closing(self._viewing("events", "text/event-stream", server.status())) as statuses:
                for status in statuses:
                    self.wfile.write(f"data: {json.dumps(status)}\n\n".encode())
                    self.wfile.flush()

        def _viewing(self, kind: str, content: str, first: Any = None) -> Iterator[Any]:
            """What the player sends this viewer, until the session ends; the viewer joins the session loop's
            list while it lasts (closed: it left)."""
            q: queue.Queue = queue.Queue(maxsize=CLIENT_QUEUE)
            server.events.put(ViewerJoined(q, kind))
            try:
                self._stream_head(content)
                if first is not None:
                    yield first
                while not (server.ended and q.empty()):
                    try:
                        item = q.get(timeout=_ENDED_POLL_S)
                    except queue.Empty:
                        continue
                    if item is _END:
                        return
                    yield item
            finally:
                server.events.put(ViewerLeft(q, kind))

    return Handler
