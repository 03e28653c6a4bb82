"""Reporting to the terminal, below the commands: the consoles, the one-line error, and how a stop (Ctrl-C,
SIGTERM, SIGHUP) is raised and told.

Results go to stdout (`out`); progress, warnings and errors to stderr (`err`). User text (titles, prompts,
paths) is escaped where markup is used: `[camera pans left]` is not a style.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.markup import escape

from .text import SafeConsole, one_line

# what comes from outside (titles, prompts, paths) never reaches the terminal as a control sequence (text.py)
out = SafeConsole(highlight=False, emoji=False)
err = SafeConsole(stderr=True, highlight=False, emoji=False)

EXIT_INTERRUPTED = 130  # 128 + SIGINT
DOWNLOAD_HINT = "fetch the weights with: memflow weights download"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # a kill, a closed terminal or SSH session: stopped like Ctrl-C


def print_error(message: str, hint: str | None = None) -> None:
    """`error: MESSAGE — HINT` on stderr: one line however long, what went wrong and then what to do (as a
    script's errors say it)."""
    fix = f" — {one_line(hint)}" if hint else ""
    err.print(f"[bold red]error:[/] {escape(message + fix)}", soft_wrap=True)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(one_line(message))}", soft_wrap=True)


def warn_prompt_cuts(name: str, cuts: list[Any]) -> None:
    """One warning a cut prompt (`tokens.PromptCut`): which story and segment, and after which word it is cut."""
    for cut in cuts:
        warn(f"{name}: {cut.describe()}")


def download_hint(message: str) -> str | None:
    """The download hint, unless the message already names the command."""
    return None if "memflow weights download" in message else DOWNLOAD_HINT


# each library's variable for the level its logging starts at, read when it is first imported
LIBRARY_VERBOSITY = {"diffusers": "DIFFUSERS_VERBOSITY", "transformers": "TRANSFORMERS_VERBOSITY"}


def quiet_libraries() -> None:
    """Keep the libraries' own info and warnings out of the user's terminal, without importing them.

    diffusers and transformers take seconds to import: the engine imports them beside the transformer's
    loading, off the critical path. One not yet imported starts at the error level its variable names (one
    the user set wins); one already imported is set now.
    """
    for library, variable in LIBRARY_VERBOSITY.items():
        if library in sys.modules:
            importlib.import_module(f"{library}.utils.logging").set_verbosity_error()
        else:
            os.environ.setdefault(variable, "error")


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C would be, so that a render stops the same clean way."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_signals_like_ctrl_c() -> Iterator[None]:
    """SIGTERM and SIGHUP raise `Terminated` in the block (the partial video is kept and named, locks dropped)."""

    def stop(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    previous = {number: signal.signal(number, stop) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def stop_code(stop: BaseException | None) -> int:
    """The shell's exit code for a stop: 128 + the signal's number."""
    return 128 + stop.signum if isinstance(stop, Terminated) else EXIT_INTERRUPTED


def stop_word(stop: BaseException | None) -> str:
    """How a stop is reported: 'interrupted' (Ctrl-C), 'terminated' (SIGTERM), 'hung up' (SIGHUP)."""
    if not isinstance(stop, Terminated):
        return "interrupted"
    return "hung up" if stop.signum == signal.SIGHUP else "terminated"
