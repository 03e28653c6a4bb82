"""Starting a live session: its opening story, its files claimed, stdin, the page's server, the signals that end
it, and the replay line. Everything here happens before or around `session.run_live`; problems are PlanErrors
(one line for the user), and nothing prints: messages go to the `warn` given."""

from __future__ import annotations

import atexit
import io
import os
import select
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..companions import one_file
from ..output import OutputError, reserved_output
from ..plan import PlanError
from ..report import STOP_SIGNALS, Terminated
from ..request import CompileMode, GenerationOptions
from ..script import ScriptError, Segment, Story, load_scripts
from ..text import bidi_control, blank, text_problem
from .events import EventQueue, Stop, StopIgnored
from .prompts import MAX_PROMPT_CHARS, PromptRefused, checked_prompt
from .replay import is_replay_script
from .server import LiveServer

MAX_TITLE_BYTES = 200


def stdin_fd(warn: Callable[[str], None]) -> int | None:
    """Where prompt lines come from; None where there is no stdin, or it is a terminal this session runs in
    the background of (reading it would stop the process)."""
    try:
        fd = sys.stdin.fileno() if sys.stdin is not None else None
    except (io.UnsupportedOperation, ValueError, AttributeError):
        return None
    if fd is not None and os.isatty(fd):
        try:
            if os.tcgetpgrp(fd) != os.getpgrp():
                warn("running in the background of a terminal: prompts come from the page only")
                return None
        except OSError:
            return None
    return fd


def opening_story(script: Path | None, prompt: str | None, output: Path, geometry) -> tuple[Story, str]:
    """The opening story and the replay script's title."""
    if script is not None:
        try:
            stories = load_scripts(script, geometry=geometry)
        except ScriptError as error:
            raise PlanError(str(error)) from None
        if len(stories) != 1:
            raise PlanError(f"{script} holds {len(stories)} stories; a live session opens with one",
                            "give a .yaml story, or one line of the .jsonl file in a file of its own")  # fmt: skip
        return stories[0], stories[0].title
    assert prompt is not None
    try:
        text = checked_prompt(prompt)
    except PromptRefused:
        raise PlanError(f"--prompt: give a prompt of 1 to {MAX_PROMPT_CHARS} characters, no control characters but "
                        "tab and newline") from None  # fmt: skip
    title = output.stem.strip()
    if blank(title) or text_problem(title) or bidi_control(title):  # a title names a video: plain text on one line
        title = "live"
    while len(title.encode("utf-8")) > MAX_TITLE_BYTES:
        title = title[:-1]
    story = Story(path=Path("--prompt"), title=title, seed=0, duration_s=geometry.chunk_seconds,
                  segments=(Segment(0.0, text),))  # fmt: skip
    return story, title


def reserve_outputs(stack: ExitStack, output: Path, script: Path | None, overwrite: bool) -> None:
    """The video's files claimed as `render` claims them, and the replay script checked: nothing clobbered."""
    try:
        stack.enter_context(reserved_output(output, overwrite=overwrite))
    except OutputError as error:
        raise PlanError(str(error), error.hint) from None
    replay = output.with_suffix(".yaml")
    if script is not None and one_file(replay, script):
        raise PlanError(f"{replay} is the opening script; the replay script would replace it",
                        "choose another output name")  # fmt: skip
    if replay.is_dir():
        raise PlanError(f"cannot write {replay}: it is a folder", "choose another output name")
    if replay.exists() and not overwrite:
        whose = "an earlier live session's replay script" if is_replay_script(replay) else "not written by memflow"
        raise PlanError(f"{replay} exists ({whose}); the replay script would replace it, so nothing was rendered",
                        "move it away, or use --overwrite")  # fmt: skip


def bound_server(stack: ExitStack, address, events: EventQueue, public: bool, fps: int):
    """The page's server, listening before the model loads (a busy port is found at once), started later."""
    try:
        return stack.enter_context(closing(LiveServer(address, events, public=public, fps=fps)))
    except OSError as error:
        raise PlanError(f"--serve {address.host}:{address.port}: cannot listen there: {error.strerror or error}",
                        "choose another port (0 picks a free one)") from None


class SessionStop:
    """How far a session is, as the signal handler (`stop_on_signals`) reads it, and the stop that ends it at the
    next chunk boundary, waking the generation thread if it waits for the clock (a flag and a byte on a pipe:
    nothing there takes a lock). Use as a context manager."""

    def __init__(self) -> None:
        self.running = False  # the session has begun: a first signal ends it at the next chunk boundary
        self.finishing = False  # no chunk is made any more (the last one is, or the video is aborted): its files
        # are being written and reported, and a signal changes nothing
        self._set = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    def set(self) -> None:
        self._set = True
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass  # full (a wake-up is pending anyway) or closed

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> None:
        """Sleep up to `timeout` seconds; returns early once set."""
        if timeout <= 0 or self._set:
            return
        try:
            select.select([self._wake_r], [], [], timeout)
        except InterruptedError:  # a signal: let the caller look again
            pass

    def __enter__(self) -> SessionStop:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)


@contextmanager
def stop_on_signals(stop: SessionStop, events: EventQueue) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP over the whole command, by how far the session is (`stop`):

    - before it runs (checks, the model's load), one stops the command at once, as in `render`
      (KeyboardInterrupt, or `Terminated`);
    - while it runs, the first one ends it at the next chunk and a second one aborts it (the same exceptions);
    - once no chunk is made any more (the video's files are being finished, written down and reported), one
      changes nothing: the session loop, while it runs, says so.

    The handler only sets the stop and tells the session loop (which says it), or raises.
    """

    def handle(signum: int, frame: Any) -> None:
        if stop.finishing:
            events.put(StopIgnored())
            return
        if not stop.running or stop.is_set():
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)
        stop.set()
        events.put(Stop("ctrl-c" if signum == signal.SIGINT else signal.Signals(signum).name.lower()))

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, *STOP_SIGNALS)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if stop.finishing:  # the files are complete (or kept partial) and said: a late signal changes nothing ...
            atexit.unregister(_ignore_stop_signals)
            atexit.register(_ignore_stop_signals)  # ... nor kills the process while Python shuts down


def _ignore_stop_signals() -> None:
    """Ignore SIGINT, SIGTERM and SIGHUP while the interpreter shuts down (with torch loaded, about a second), once
    a session has ended and said how: Python's own handlers are gone by then, and a signal would kill the process
    with another exit code than the one the session reported."""
    for sig in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(sig, signal.SIG_IGN)


def replay_options(options: GenerationOptions, compile: bool | None) -> str:
    """The options of `memflow render OUT.yaml` that make the same video (the settings are in OUT.yaml).

    `compile` is how the session ran (`FastPath.asked`): compiled (True), eager (False; a session never
    compiles unless asked) or graphed (None, the Python API's).
    Compiled, graphed and eager kernels round differently on a GPU: the replay runs the path the session ran.
    """
    ran = replace(options.without_settings(), compile=CompileMode.from_option(compile))
    return shlex.join(ran.flags())
