"""The `memflow` command line: the Typer app, its version and its commands (one module each in `commands/`).

Results go to stdout; progress, warnings and errors to stderr. A known error is one line, what went wrong and
what to do, with exit code 2 for bad input (a usage mistake too) and 1 for a failed run.

torch, diffusers and transformers are imported inside the commands that need them, so `--help`,
`--version` and `check` start at once.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from . import __version__
from .commands import register
from .report import EXIT_INTERRUPTED, out, print_error, quiet_libraries
from .text import one_line

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Render long, consistent video narratives with MemFlow (Wan2.1-T2V-1.3B).",
    rich_markup_mode=None,  # plain help: option names with their values (`--window N`), no type labels
)


def show_version(value: bool) -> None:
    if value:
        out.print(f"memflow {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    # OpenMP threads that wait for work sleep instead of spinning: with every core busy (another program,
    # or the ffmpeg encoder) spinning threads slowed the CPU renders over tenfold. Read when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    quiet_libraries()  # the libraries' own info and warnings stay out of the terminal (nothing imported here)


register(app)


def main() -> None:
    """The console entry point: a usage mistake (an unknown option, a missing argument) is one error line with
    exit code 2, as memflow's own errors are, not click's usage block."""
    try:
        code = app(prog_name="memflow", standalone_mode=False)
    except Exception as error:  # click's exceptions, told by their kind: typer may bring a click of its own
        if _is_a(error, "NoArgsIsHelpError"):  # `memflow` alone: the help, as asked for
            error.show()
        elif _is_a(error, "ClickException"):
            command = error.ctx.command_path if getattr(error, "ctx", None) else _command_named(sys.argv[1:])
            print_error(one_line(error.format_message()).rstrip("."), f"see `{command} --help`")
        elif _is_a(error, "Abort"):  # Ctrl-C before a command took over its own stopping
            sys.exit(EXIT_INTERRUPTED)
        else:
            raise
        sys.exit(error.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def _command_named(arguments: list[str]) -> str:
    """`memflow render`, `memflow weights verify`...: the command the arguments name, as far as they do."""
    words = ["memflow"]
    group = app
    for word in arguments:
        names = {command.name or command.callback.__name__ for command in group.registered_commands}
        groups = {sub.name: sub.typer_instance for sub in group.registered_groups}
        if word in names:
            return " ".join([*words, word])
        if word not in groups:
            break
        words.append(word)
        group = groups[word]
    return " ".join(words)


def _is_a(error: BaseException, kind: str) -> bool:
    return any(cls.__name__ == kind for cls in type(error).__mro__)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
