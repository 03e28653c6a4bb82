"""What the commands share: leaving with a known error, and the options that several commands take."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from ..plan import EXIT_FAILED, PlanError
from ..report import print_error
from ..request import RELEASED_LORA as RELEASED_LORA  # the released lora.pt's rank and alpha: the defaults

TIME_FORMATS = "10s, 1.5s, 1m30s, 1h, 0:10 or 1:02.5"


def fail(message: str, code: int = EXIT_FAILED, hint: str | None = None) -> NoReturn:
    """Report one error and leave with `code`."""
    print_error(message, hint)
    raise typer.Exit(code)


@contextmanager
def reported() -> Iterator[None]:
    """Turn a PlanError raised in the block into its line, hint and exit code."""
    try:
        yield
    except PlanError as error:
        fail(error.message, error.exit_code, error.hint)


# ---------------------------------------------------------------------------------------------------------------------
# Options several commands take

Scripts = Annotated[
    list[Path],
    # described in each command's text: listed here, typer would label it `<list[Path]>`
    typer.Argument(help="Narrative scripts (.yaml/.yml, .jsonl).", hidden=True, metavar="SCRIPT"),
]
SegmentSeconds = Annotated[
    float,
    typer.Option("--segment-seconds", help="Length of each segment of a JSONL story, in seconds.", metavar="SECONDS"),
]
OutDir = Annotated[
    Path | None,
    typer.Option("--out-dir", help="Folder for one <title>.mp4 per story (created if missing).", metavar="DIR"),
]
KeepSnapshots = Annotated[
    bool,
    typer.Option(
        "--snapshots",
        help="Keep a snapshot at every segment boundary beside the video (about 1 GB each at full size), so that "
        "a later `render --update` after an edit, or `--skip-existing` after a crash, continues from there.",
    ),
]

Fp8 = Annotated[
    bool,
    typer.Option(
        "--fp8",
        help="The transformer blocks' linear layers in FP8 with row-wise scales (CUDA, compute capability 8.9+): "
        "less GPU memory, not yet faster overall; the video changes slightly.",
    ),
]

# The generation options `render` and `bench` share (names as in settings.SETTING_NAMES; None: not given).
MemoryMode = Annotated[str | None, typer.Option(help="Memory: nam, sink or none. Default: nam.", metavar="MODE")]
Window = Annotated[
    int | None, typer.Option(help="Local attention window, latent frames, sink included. Default: 12.", metavar="N")
]
Sink = Annotated[int | None, typer.Option(help="Attention-sink frames. Default: 3.", metavar="N")]
BankSize = Annotated[int | None, typer.Option(help="Memory-bank frames. Default: 3.", metavar="N")]
RecordInterval = Annotated[
    int | None, typer.Option(help="Chunks between memory-bank recordings. Default: 3.", metavar="N")
]
Sma = Annotated[bool | None, typer.Option("--sma/--no-sma", help="Sparse memory activation. Default: off.")]
Steps = Annotated[str | None, typer.Option(help="Denoising steps. Default: 1000,750,500,250.", metavar="T,T,...")]
LoraRank = Annotated[int, typer.Option(help="Rank of lora.pt.", metavar="N")]
LoraAlpha = Annotated[float, typer.Option(help="Alpha of lora.pt.", metavar="X")]
Device = Annotated[
    str | None,
    typer.Option("--device", help="cuda, cuda:1, cpu... Default: cuda if present, else cpu.", metavar="DEVICE"),
]
DecodeDevice = Annotated[
    str | None, typer.Option(help="Decode on another device than generation, e.g. cuda:1.", metavar="DEVICE")
]
Compile = Annotated[
    bool | None,
    typer.Option(
        "--compile/--no-compile",
        help="The compiled fast path on CUDA: compiled blocks and decoder steps, CUDA graphs (a slower start). "
        "Default: render compiles where the video is long enough to win the compile back (sooner once its "
        "kernels are cached), bench as render would for its video, live only when asked (an open-ended session "
        "cannot win the compile back); otherwise eager. --no-compile runs the eager model.",
    ),
]
Decoder = Annotated[
    str | None,
    typer.Option(
        "--decoder",
        help="wan: the Wan2.1 VAE (full quality); tae: the TAEHV taew2_1 preview decoder (several times faster, "
        "below the VAE's quality; fetch it with `memflow weights download --decoder tae`). Default: wan.",
        metavar="wan|tae",
    ),
]
DecoderWeights = Annotated[
    Path | None,
    typer.Option(
        "--decoder-weights",
        help="With --decoder tae: a local taew2_1 file (.pth or .safetensors). Default: taew2_1.pth in the weights "
        "folder, then the HF cache.",
        metavar="FILE",
    ),
]
