"""The `memflow` commands, one module each: every module parses its options, calls the layer below and
reports (one line, a hint and an exit code for a known error). `register` adds them to the Typer app;
a new command is one module here and one line in `register`.
"""

from __future__ import annotations

import typer

from . import bench, check, live, render, weights


def register(app: typer.Typer) -> None:
    app.command(epilog=check.EPILOG)(check.check)
    app.command(epilog=render.EPILOG)(render.render)
    app.command(epilog=bench.EPILOG)(bench.bench)
    app.command(epilog=live.EPILOG)(live.live)
    app.add_typer(weights.app, name="weights")
