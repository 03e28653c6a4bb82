"""What the commands share: leaving with a known error, and the options that several commands take."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from ..plan import EXIT_BAD_INPUT, EXIT_FAILED, PlanError
from ..report import print_error
from ..request import RELEASED_LORA as RELEASED_LORA  # the released lora.pt's rank and alpha: the defaults
from ..settings import LORA_ALPHA_MAX, VideoGeometry
from ..text import ascii_int, one_line

TIME_FORMATS = "10s, 1.5s, 1m30s, 1h, 0:10 or 1:02.5"


def fail(message: str, code: int = EXIT_FAILED, hint: str | None = None) -> NoReturn:
    """Report one error and leave with `code`."""
    print_error(message, hint)
    raise typer.Exit(code)


def whole_number(option: str, low: int | None = None, high: int | None = None) -> Callable[[Any], int | None]:
    """The parser of an integer option (`typer.Option(parser=...)`), one for every command: the digits 0-9 only
    (`text.ascii_int`), from `low` to `high` where given; anything else is one line naming the option, exit 2."""

    def parse(value: Any) -> int | None:
        if value is None or isinstance(value, int):  # the option's default
            return value
        number = ascii_int(str(value))
        if number is None:
            fail(f"{option} {one_line(str(value))}: not a whole number written in the digits 0-9", EXIT_BAD_INPUT,
                 f"give it like {option} {low if low is not None and low > 0 else 0}")  # fmt: skip
        if (low is not None and number < low) or (high is not None and number > high):
            fail(f"{option} {number}: {_bounds(low, high)}", EXIT_BAD_INPUT)
        return number

    return parse


_DECIMAL = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def decimal_number(option: str, low: float, high: float, *, example: float) -> Callable[[Any], float | None]:
    """The parser of a number option (`typer.Option(parser=...)`): a decimal number in the digits 0-9 (`0.5`,
    `256`, `1e3`), from `low` to `high`; anything else (nan, inf, other scripts' digits) is one line naming the
    option, exit 2."""

    def parse(value: Any) -> float | None:
        if value is None or isinstance(value, float):  # the option's default
            return value
        text = str(value)
        given = one_line(text) or "''"
        if not _DECIMAL.fullmatch(text):
            fail(f"{option} {given}: not a number", EXIT_BAD_INPUT, f"give it like {option} {_written(example)}")
        number = float(text)
        if not low <= number <= high:
            fail(f"{option} {given}: give a number from {_written(low)} to {_written(high)}", EXIT_BAD_INPUT)
        return number

    return parse


def _written(number: float) -> str:
    """`1000000` as `1,000,000` and `0.5` as `0.5`: how a bound reads in a message."""
    return f"{int(number):,}" if float(number).is_integer() else f"{number:g}"


def time_option(option: str, at_least: float = 0.0) -> Callable[[Any], float | None]:
    """The parser of a time option (`typer.Option(parser=...)`): any form a script's times take (`10s`, `1m30s`,
    `90`, `0:10`...); anything else is one line naming the option, exit 2."""

    def parse(value: Any) -> float | None:
        if value is None or isinstance(value, float):  # the option's default
            return value
        from ..script import parse_time

        text = one_line(str(value))
        if text.strip().startswith("-"):  # a length, not a start: "times count from the start" would mislead
            fail(f"{option} {text}: a length must be longer than 0s", EXIT_BAD_INPUT, "give it like 10s")
        try:
            seconds = parse_time(str(value))
        except ValueError as error:
            fail(f"{option} {text}: {error}", EXIT_BAD_INPUT)
        if seconds == 0:
            fail(f"{option} {text}: a length must be longer than 0s", EXIT_BAD_INPUT, "give it like 10s")
        if seconds < at_least:
            fail(f"{option} {text}: shorter than one chunk of video ({at_least:g} s)", EXIT_BAD_INPUT,
                 f"give at least {at_least:g}s, such as 10s")  # fmt: skip
        return seconds

    return parse


def _bounds(low: int | None, high: int | None) -> str:
    if high is None:
        return f"give {low} or more"
    if low is None:
        return f"give {high} or less"
    return f"give a number from {low} to {high}"


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
    typer.Option("--segment-seconds", help=f"Length of each segment of a JSONL story: seconds, or {TIME_FORMATS}.",
                 metavar="TIME", parser=time_option("--segment-seconds", VideoGeometry().chunk_seconds)),  # fmt: skip
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
    int | None,
    typer.Option(help="Local attention window, latent frames, sink included. Default: 12.", metavar="N",
                 parser=whole_number("--window")),  # fmt: skip
]
Sink = Annotated[
    int | None, typer.Option(help="Attention-sink frames. Default: 3.", metavar="N", parser=whole_number("--sink"))
]
BankSize = Annotated[
    int | None, typer.Option(help="Memory-bank frames. Default: 3.", metavar="N", parser=whole_number("--bank-size"))
]
RecordInterval = Annotated[
    int | None,
    typer.Option(help="Chunks between memory-bank recordings. Default: 3.", metavar="N",
                 parser=whole_number("--record-interval")),  # fmt: skip
]
Sma = Annotated[bool | None, typer.Option("--sma/--no-sma", help="Sparse memory activation. Default: off.")]
Steps = Annotated[str | None, typer.Option(help="Denoising steps. Default: 1000,750,500,250.", metavar="T,T,...")]
LoraRank = Annotated[int, typer.Option(help="Rank of lora.pt.", metavar="N", parser=whole_number("--lora-rank"))]
Seed = Annotated[
    int | None,
    typer.Option(help="The noise seed, 0 to 2**64-1. Default: the script's seed (0).", metavar="N",
                 parser=whole_number("--seed")),  # fmt: skip
]
LoraAlpha = Annotated[
    float,
    typer.Option(
        help="Alpha of lora.pt.",
        metavar="X",
        parser=decimal_number("--lora-alpha", -LORA_ALPHA_MAX, LORA_ALPHA_MAX, example=RELEASED_LORA.alpha),
    ),
]
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
        help="CUDA only. Default (neither): the fused Triton glue with CUDA graphs (kernels built in about 2 s, "
        "cached), the fast path. --compile compiles the blocks and decoder steps with Inductor (a slower start); "
        "--no-compile runs plain eager PyTorch, the reference.",
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
