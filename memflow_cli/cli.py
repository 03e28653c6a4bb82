"""The `memflow` command line: the Typer app, its version and its commands (one module each in `commands/`).

Results go to stdout; progress, warnings and errors to stderr. A known error is one line and a hint,
with exit code 2 for bad input and 1 for a failed run.

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
from .report import out, quiet_libraries

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


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="memflow")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
