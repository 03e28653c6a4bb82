"""`memflow weights download|verify`: fetch and check the model weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..plan import EXIT_BAD_INPUT
from ..report import download_hint, out
from .common import fail

app = typer.Typer(no_args_is_help=True, help="Fetch and check the model weights.", rich_markup_mode=None)


@app.command("download")
def download(
    to: Annotated[
        Path | None, typer.Option(help="A folder to put the weights in. Default: the HF cache.", metavar="DIR")
    ] = None,
) -> None:
    """Fetch base.pt + lora.pt (KlingTeam/MemFlow) and the umT5 encoder, tokenizer and VAE of Wan-AI/Wan2.1-T2V-1.3B."""
    if to is not None and to.exists() and not to.is_dir():
        fail(f"--to {to}: it is a file, not a folder", EXIT_BAD_INPUT, "give a folder for the weights")
    from ..weights import WeightsError
    from ..weights import download as fetch

    try:
        files = fetch(to)
    except WeightsError as error:
        fail(str(error))
    for role, path in files.components().items():
        out.print(f"{role}: {path}", markup=False, soft_wrap=True)


@app.command("verify")
def verify(
    model: Annotated[str | None, typer.Option(help="Weights folder. Default: the HF cache.", metavar="DIR")] = None,
) -> None:
    """Check that every weight file is present and readable, and each released Wan file has its released size."""
    from ..weights import WeightsError, resolve_model
    from ..weights import verify as check_files

    try:
        results = check_files(resolve_model(model))
    except WeightsError as error:
        fail(str(error), hint=download_hint(str(error)))
    bad = [r for r in results if not r.ok]
    for result in results:
        out.print(str(result), markup=False, soft_wrap=True)
    if bad:
        fail(f"{len(bad)} problem(s) in the weights", hint="re-run: memflow weights download")
