"""Prompts that arrive while a live session renders: lines on stdin (a terminal or a pipe) and the page's box.

A reader thread takes stdin lines as they come (so each is timed when it arrives, even while a chunk is
being made) and queues them; the page's prompts join the same queue. Before each chunk the session
calls `sync()`, which waits until every byte already written to stdin is read and queued: prompts
written before a chunk boundary are always seen at that boundary, so a session fed from a pipe is
deterministic.

A line is one prompt, stripped of surrounding spaces. A blank line is ignored and a line longer than
`MAX_PROMPT_CHARS` is refused: either way one line on stderr (`warn`), and the session goes on.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..text import PROMPT_WHITESPACE, text_problem

MAX_PROMPT_CHARS = 2000  # a prompt longer than this is refused (the text encoder reads 512 tokens at most)
MAX_PENDING = 64  # prompts waiting for their chunk: one more is refused (each takes a chunk, 0.75 s of video)
_READ_BYTES = 65536
_MAX_LINE_BYTES = 4 * MAX_PROMPT_CHARS + 4  # UTF-8: at most 4 bytes a character (and a CR)
_SYNC_POLL_S = 0.002


class PromptRefused(ValueError):
    """A prompt line that is not used; the message says why, in one line."""


@dataclass(frozen=True)
class Arrival:
    """A prompt as it arrived."""

    prompt: str
    received_s: float  # time.perf_counter() when it arrived
    source: str  # "stdin" or "page"


def checked_prompt(text: str) -> str:
    """The prompt of a line (surrounding spaces dropped); raises PromptRefused for a blank or too long one."""
    prompt = text.strip()
    if not prompt:
        raise PromptRefused("ignored an empty prompt line (type the prompt, then Enter)")
    if problem := text_problem(prompt, PROMPT_WHITESPACE):
        raise PromptRefused(f"refused a prompt that {problem}; the story goes on with the current prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PromptRefused(
            f"refused a prompt of {len(prompt)} characters: at most {MAX_PROMPT_CHARS} are read; the story goes on "
            "with the current prompt"
        )
    return prompt


class PromptInbox:
    """The queue of arrived prompts, fed by a stdin reader thread (`stdin_fd`, if any) and by `post`.

    `wait(timeout)` sleeps until the timeout, a new prompt or `wake()`; use as a context manager (the
    reader thread stops and the wake-up pipe closes on exit).
    """

    def __init__(
        self, stdin_fd: int | None, warn: Callable[[str], None], clock: Callable[[], float] = time.perf_counter
    ):
        self._fd = stdin_fd
        self._warn = warn
        self._clock = clock
        self._queue: deque[Arrival] = deque()
        self._lock = threading.Lock()  # held while bytes are read from stdin and until their lines are queued
        self._queued = threading.Lock()  # guards `_queue` and `_arrived`; `wait` wakes through the pipe
        self._buffer = bytearray()
        self._skipping = False  # inside a line already refused as too long: dropped up to its end
        self._overflowing = False  # stdin lines are being dropped: the queue was full
        self._eof = stdin_fd is None
        self._closed = threading.Event()
        self._wake_r, self._wake_w = os.pipe()  # wakes `wait`
        self._stop_r, self._stop_w = os.pipe()  # stops the reader thread
        os.set_blocking(self._wake_w, False)
        self._arrived: Callable[[str], None] | None = None
        self._reader: threading.Thread | None = None
        if stdin_fd is not None:
            self._reader = threading.Thread(target=self._read_stdin, name="memflow-live-stdin", daemon=True)
            self._reader.start()

    # -- arrivals --------------------------------------------------------------------------------------

    def post(self, text: str, source: str = "page") -> Arrival:
        """Queue a prompt from elsewhere than stdin; raises PromptRefused (nothing queued) for a bad one."""
        arrival = Arrival(checked_prompt(text), self._clock(), source)
        if not self._push(arrival):
            raise PromptRefused(f"{MAX_PENDING} prompts are waiting for their chunks already: send it later")
        return arrival

    def take(self) -> Arrival | None:
        """The oldest prompt not taken yet, or None."""
        with self._queued:
            return self._queue.popleft() if self._queue else None

    def pending(self) -> int:
        with self._queued:
            return len(self._queue)

    @contextmanager
    def notifying(self, arrived: Callable[[str], None]) -> Iterator[None]:
        """Within the block, `arrived(prompt)` is called for every prompt waiting at its start and, on the
        thread that queues it, for every prompt queued. It must return quickly: it is told, it does not decide."""
        with self._queued:
            self._arrived = arrived
            waiting = [arrival.prompt for arrival in self._queue]
        try:
            for prompt in waiting:
                arrived(prompt)
            yield
        finally:
            with self._queued:
                self._arrived = None

    def _push(self, arrival: Arrival) -> bool:
        """Queue `arrival`; False (nothing queued) where `MAX_PENDING` prompts are waiting already."""
        with self._queued:
            if len(self._queue) >= MAX_PENDING:
                return False
            self._queue.append(arrival)
            arrived = self._arrived
        if arrived is not None:
            try:
                arrived(arrival.prompt)
            except Exception as error:  # noqa: BLE001 - told, not asked: the prompt is queued whatever it does
                self._warn(f"could not start encoding a prompt as it came ({error}): it is encoded at its chunk")
        self.wake()
        return True

    # -- waiting ---------------------------------------------------------------------------------------

    def wake(self) -> None:
        """End a `wait` now (a new prompt, or the session stopping); safe from a signal handler."""
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending anyway) or closed

    def wait(self, timeout: float) -> None:
        """Sleep up to `timeout` seconds; returns early on a new prompt or a `wake()`."""
        if timeout > 0:
            try:
                ready, _, _ = select.select([self._wake_r], [], [], timeout)
            except InterruptedError:  # a signal: let the caller look again
                return
            if ready:
                os.read(self._wake_r, _READ_BYTES)

    def sync(self) -> None:
        """Return once every byte already written to stdin has been read and its lines queued."""
        if self._fd is None:
            return
        while not self._eof and not self._closed.is_set() and _readable(self._fd):
            time.sleep(_SYNC_POLL_S)  # the reader thread is about to read it
        with self._lock:  # ... or is reading it now
            pass

    # -- the stdin reader ------------------------------------------------------------------------------

    def _read_stdin(self) -> None:
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
            with self._lock:
                try:
                    data = os.read(self._fd, _READ_BYTES)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
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
                self._skipping = False  # the end of the refused line
            else:
                self._line(bytes(self._buffer) + piece, now)
            self._buffer.clear()
        if not self._skipping:
            self._buffer += rest
            if len(self._buffer) > _MAX_LINE_BYTES:
                self._warn(f"refused a prompt line of more than {MAX_PROMPT_CHARS} characters: at most "
                           f"{MAX_PROMPT_CHARS} are read; the story goes on with the current prompt")
                self._buffer.clear()
                self._skipping = True

    def _line(self, raw: bytes, now: float) -> None:
        text = raw.decode("utf-8", errors="replace")
        try:
            prompt = checked_prompt(text)
        except PromptRefused as refused:
            self._warn(str(refused))
            return
        if self._push(Arrival(prompt, now, "stdin")):
            self._overflowing = False
        elif not self._overflowing:  # one warning for a run of refused lines
            self._overflowing = True
            self._warn(f"refused prompt lines: {MAX_PENDING} prompts are waiting for their chunks already; "
                       "lines are dropped until one of them has its chunk")

    # -- lifetime --------------------------------------------------------------------------------------

    def close(self) -> None:
        self._closed.set()
        os.write(self._stop_w, b"!")
        if self._reader is not None:
            self._reader.join(timeout=1.0)
        for fd in (self._wake_r, self._wake_w, self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> PromptInbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _readable(fd: int) -> bool:
    try:
        ready, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError):
        return False
    return bool(ready)
