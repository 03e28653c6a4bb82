"""`memflow weights download|verify`: fetch and check the model weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..plan import EXIT_BAD_INPUT
from ..report import download_hint, out
from ..request import ModelSource
from .common import Decoder, DecoderWeights, fail

app = typer.Typer(no_args_is_help=True, help="Fetch and check the model weights.", rich_markup_mode=None)


@app.command("download")
def download(
    to: Annotated[
        Path | None, typer.Option(help="A folder to put the weights in. Default: the HF cache.", metavar="DIR")
    ] = None,
    decoder: Annotated[
        str | None,
        typer.Option("--decoder", help="tae: fetch only the TAEHV preview decoder, taew2_1.pth (madebyollin/taehv).",
                     metavar="tae"),  # fmt: skip
    ] = None,
) -> None:
    """Fetch base.pt + lora.pt (KlingTeam/MemFlow) and the umT5 encoder, tokenizer and VAE of Wan-AI/Wan2.1-T2V-1.3B."""
    if to is not None and to.exists() and not to.is_dir():
        fail(f"--to {to}: it is a file, not a folder", EXIT_BAD_INPUT, "give a folder for the weights")
    if _tae_asked(decoder):
        _download_tae(to)
        return
    from ..weights import WeightsError
    from ..weights import download as fetch
    from ..weights.fetch import check_reachable, download_command

    try:
        check_reachable(command=download_command(to))
        files = fetch(to)
    except WeightsError as error:
        fail(str(error))
    for role, path in files.components().items():
        out.print(f"{role}: {path}", markup=False, soft_wrap=True)


@app.command("verify")
def verify(
    model: Annotated[str | None, typer.Option(help="Weights folder. Default: the HF cache.", metavar="DIR")] = None,
    decoder: Decoder = None,
    decoder_weights: DecoderWeights = None,
) -> None:
    """Check that every weight file is present and readable, and each released Wan file has its released size."""
    if ModelSource.parse(model).built_in:  # `--model demo` or `random`: made in memory, no file to check
        fail(f"--model {model}: that model is built with random weights in memory, so there are no files to verify",
             EXIT_BAD_INPUT, "give a weights folder, or leave out --model for the Hugging Face cache")  # fmt: skip
    if _tae_asked(decoder, decoder_weights):
        _verify_tae(model, decoder_weights)
        return
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


def _tae_asked(decoder: str | None, weights: Path | None = None) -> bool:
    """Whether the TAEHV decoder is asked: `--decoder tae`, or `--decoder-weights` alone (as every command reads
    them); `--decoder wan` or nothing: the model's files."""
    if decoder is None:
        return weights is not None
    if decoder.strip().lower() == "wan":
        if weights is not None:
            fail("--decoder-weights is the TAEHV decoder's file, not used with --decoder wan", EXIT_BAD_INPUT,
                 "use --decoder tae, or leave out --decoder-weights")
        return False
    if decoder.strip().lower() != "tae":
        fail(f"--decoder {decoder}: not a decoder", EXIT_BAD_INPUT, "choose --decoder tae (or leave it out)")
    return True


def _download_tae(to: Path | None) -> None:
    from ..tae.files import download_tae
    from ..weights import WeightsError
    from ..weights.fetch import check_reachable, download_command

    try:
        check_reachable(command=download_command(to, tae=True))  # no network: one line at once, no retries
        path = download_tae(to)
    except WeightsError as error:
        fail(str(error))
    out.print(f"tae decoder: {path}", markup=False, soft_wrap=True)


def _verify_tae(model: str | None, weights: Path | None) -> None:
    from ..tae.files import tae_weights, verify_tae
    from ..weights import WeightsError

    try:
        path = tae_weights(weights, Path(model).expanduser() if model is not None else None)
    except WeightsError as error:  # missing weights: exit code 1, as for the model's own files
        fail(str(error))
    result = verify_tae(path)
    out.print(str(result), markup=False, soft_wrap=True)
    if not result.ok:
        fail("the TAEHV decoder weights have a problem", hint="re-run: memflow weights download --decoder tae")
