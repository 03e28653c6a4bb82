"""Prompts that arrive while a live session renders: lines on stdin (a terminal or a pipe) and the page's box.

A reader thread takes stdin lines as they come (so each is timed when it arrives, even while a chunk is
being made) and puts them on the session's queue, where the page's prompts go too; the session loop
checks and queues them (`loop.py`). Before each chunk the generation thread calls `sync()`, which waits
until every byte already written to stdin is read and put on the queue: prompts written before a chunk
boundary are always seen at that boundary, so a session fed from a pipe is deterministic.

A line is one prompt, stripped of surrounding spaces and a leading byte order mark (`checked_prompt`). A blank
line is ignored, and a line longer than `MAX_PROMPT_CHARS` or not UTF-8 is refused: either way one line on
stderr, and the session goes on.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable

from ..text import PROMPT_WHITESPACE, blank, text_problem
from .events import EventQueue, LineNotText, LineTooLong, PromptTyped

MAX_PROMPT_CHARS = 2000  # a prompt longer than this is refused (the text encoder reads 512 tokens at most)
MAX_PENDING = 64  # prompts waiting for their chunk: one more is refused (each takes a chunk, 0.75 s of video)
_READ_BYTES = 65536
# What stdin may bring between two chunk boundaries: more waits in the pipe, and a writer that never pauses
# (`cat /dev/urandom`, `yes`) is held there by the pipe, so memory, the queue and each boundary's wait stay bounded.
_BYTES_PER_CHUNK = 4 * _READ_BYTES
_MAX_LINE_BYTES = 4 * MAX_PROMPT_CHARS + 4  # UTF-8: at most 4 bytes a character (and a CR)
_SYNC_POLL_S = 0.002


class PromptRefused(ValueError):
    """A prompt line that is not used; the message says why, in one line."""


def checked_prompt(text: str, source: str = "stdin") -> str:
    """The prompt of a line (surrounding spaces and a leading byte order mark dropped); raises PromptRefused for a
    blank or too long one, in words for its `source` ("stdin" or "page")."""
    prompt = text.removeprefix(BOM).strip()
    if blank(prompt):  # nothing, or only invisible characters (a script refuses them too)
        raise PromptRefused(EMPTY_PAGE_PROMPT if source == "page" else "ignored an empty prompt line (type the prompt, "
                            "then Enter)")  # fmt: skip
    if problem := text_problem(prompt, PROMPT_WHITESPACE):
        raise PromptRefused(f"refused a prompt that {problem}; the story goes on with the current prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PromptRefused(
            f"refused a prompt of {len(prompt)} characters: at most {MAX_PROMPT_CHARS} are read; the story goes on "
            "with the current prompt"
        )
    return prompt


BOM = "\ufeff"  # a byte order mark: some editors and Windows tools start a text with it
EMPTY_PAGE_PROMPT = "the prompt is empty: write what happens next"
LINE_TOO_LONG = (f"refused a prompt line of more than {MAX_PROMPT_CHARS} characters: at most {MAX_PROMPT_CHARS} are "
                 "read; the story goes on with the current prompt")  # fmt: skip
STDIN_FULL = (f"refused prompt lines: {MAX_PENDING} prompts are waiting for their chunks already; lines are dropped "
              "until one of them has its chunk")  # fmt: skip
PAGE_FULL = f"{MAX_PENDING} prompts are waiting for their chunks already: send it later"


def line_not_text(byte: int) -> str:
    """The warning for a stdin line that is not UTF-8 (`byte`: its first bad byte, 1 the first)."""
    return (f"refused a prompt line that is not UTF-8 text (byte {byte}): save or type it as UTF-8; the story goes "
            "on with the current prompt")  # fmt: skip


class StdinReader:
    """Reads prompt lines from stdin (`fd`; None: nothing to read) on a thread of its own, and puts each on the
    session's queue as it comes (`PromptTyped`, timed on arrival; `LineTooLong` for one dropped): it decides
    nothing. Use as a context manager (the thread stops on exit).
    """

    def __init__(self, fd: int | None, events: EventQueue, clock: Callable[[], float] = time.perf_counter):
        self._fd = fd
        self._events = events
        self._clock = clock
        self._reading = threading.Lock()  # held while bytes are read from stdin and until their lines are put
        self._allowance = threading.Condition()
        self._left = _BYTES_PER_CHUNK  # bytes the thread may still read before the next boundary (`sync`)
        self._buffer = bytearray()
        self._skipping = False  # inside a line already dropped as too long: dropped up to its end
        self._eof = fd is None
        self._closed = threading.Event()
        self._stop_r, self._stop_w = os.pipe()  # stops the thread
        self._thread: threading.Thread | None = None
        if fd is not None:
            self._thread = threading.Thread(target=self._read, name="memflow-live-stdin", daemon=True)
            self._thread.start()

    def sync(self) -> None:
        """Return once every byte already written to stdin has been read and its lines put on the queue, up to
        `_BYTES_PER_CHUNK` bytes since the last boundary (the rest is read for the next ones)."""
        if self._fd is None:
            return
        while not self._eof and not self._closed.is_set() and _readable(self._fd) and self._left > 0:
            time.sleep(_SYNC_POLL_S)  # the thread is about to read it
        with self._reading:  # ... or is reading it now
            pass
        with self._reading, self._allowance:  # the next chunk's bytes (the reader counts under `_reading`)
            self._left = _BYTES_PER_CHUNK
            self._allowance.notify()

    def _read(self) -> None:
        assert self._fd is not None
        while not self._closed.is_set():
            try:
                select.select([self._fd, self._stop_r], [], [])
            except (OSError, ValueError):
                break
            if self._closed.is_set():
                break
            if not _readable(self._fd):
                continue
            with self._allowance:  # this boundary's bytes are read: the rest waits in the pipe for the next one
                while self._left <= 0 and not self._closed.is_set():
                    self._allowance.wait()
            if self._closed.is_set():
                break
            with self._reading:
                try:
                    data = os.read(self._fd, min(_READ_BYTES, self._left))
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                self._left -= len(data)
                self._take_bytes(data)
                if not data:
                    self._eof = True  # the end of piped input does not end the session
                    return

    def _take_bytes(self, data: bytes) -> None:
        now = self._clock()
        if not data:  # end of input: a last line without its newline still counts
            if self._buffer and not self._skipping:
                self._line(bytes(self._buffer), now)
            self._buffer.clear()
            return
        *lines, rest = data.split(b"\n")
        for piece in lines:
            if self._skipping:
                self._skipping = False  # the end of the dropped line
            else:
                self._line(bytes(self._buffer) + piece, now)
            self._buffer.clear()
        if not self._skipping:
            self._buffer += rest
            if len(self._buffer) > _MAX_LINE_BYTES:
                self._events.put(LineTooLong())
                self._buffer.clear()
                self._skipping = True

    def _line(self, raw: bytes, now: float) -> None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:  # refused as a script's text is, not read with U+FFFD in its place
            self._events.put(LineNotText(error.start + 1))
            return
        self._events.put(PromptTyped(text, now, "stdin"))

    def close(self) -> None:
        self._closed.set()
        with self._allowance:
            self._allowance.notify()
        os.write(self._stop_w, b"!")
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> StdinReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _readable(fd: int) -> bool:
    try:
        ready, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError):
        return False
    return bool(ready)
