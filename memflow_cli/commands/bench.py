"""`memflow bench`: measure speed and memory of the render pipeline; a table, then one JSON line."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..plan import EXIT_BAD_INPUT, PlanError, check_fp8, checked_device, geometry_for, option_settings
from ..report import err, out, warn
from ..request import CompileMode, GenerationOptions, ModelKind, ModelSource
from .common import (
    BankSize,
    Compile,
    DecodeDevice,
    Decoder,
    DecoderWeights,
    Device,
    Fp8,
    MemoryMode,
    RecordInterval,
    Sink,
    Sma,
    Steps,
    Window,
    decimal_number,
    fail,
    reported,
    whole_number,
)

# --memory-limit: below half a GiB nothing runs; above 4 TiB is no card's memory
MEMORY_LIMIT_MIN_GIB, MEMORY_LIMIT_MAX_GIB = 0.5, 4096.0

EPILOG = "Examples:  memflow bench --random-weights  |  memflow bench --model demo --device cpu --frames 9"


def bench(
    model: Annotated[
        str | None,
        typer.Option(
            help="'demo' (tiny, CPU smoke run), a weights folder, or the HF cache by default.", metavar="PATH|demo"
        ),
    ] = None,  # fmt: skip
    random_weights: Annotated[
        bool, typer.Option("--random-weights", help="Full-size 1.3B model with random weights (nothing to load).")
    ] = False,
    device: Device = None,
    decode_device: DecodeDevice = None,
    decoder: Decoder = None,
    decoder_weights: DecoderWeights = None,
    frames: Annotated[
        int,
        typer.Option(
            help="Latent frames to generate (video frames = 4*frames - 3), 3 to 12000 (50 minutes of video).",
            metavar="N",
            parser=whole_number("--frames", 3, 12000),
        ),
    ] = 120,
    switches: Annotated[
        int, typer.Option(help="Prompt switches, evenly spaced.", metavar="N", parser=whole_number("--switches", 0))
    ] = 0,
    memory: MemoryMode = None,
    window: Window = None,
    sink: Sink = None,
    bank_size: BankSize = None,
    record_interval: RecordInterval = None,
    sma: Sma = None,
    steps: Steps = None,
    compile: Compile = None,
    compare: Annotated[bool, typer.Option("--compare", help="Also time memory none, sink, nam and nam+SMA.")] = False,
    fp8: Fp8 = False,
    text_encoder: Annotated[
        bool,
        typer.Option(
            "--text-encoder",
            help="With --random-weights: encode the prompts with a full-size random umT5-XXL (11 GB), as a render "
            "does, instead of making them noise.",
        ),
    ] = False,
    memory_limit: Annotated[
        float | None,
        typer.Option(
            "--memory-limit",
            help="Let PyTorch take at most this many GiB of the --device GPU (does the run fit a smaller card?).",
            metavar="GIB",
            parser=decimal_number("--memory-limit", MEMORY_LIMIT_MIN_GIB, MEMORY_LIMIT_MAX_GIB, example=24),
        ),
    ] = None,
    time_to_video: Annotated[
        bool,
        typer.Option(
            "--time-to-video",
            help="Also time two whole `memflow render` processes of the same video, the first with empty compile "
            "caches (cold), the second with what it left (warm): the JSON's time_to_video_s.",
        ),
    ] = False,
) -> None:
    """Measure speed and memory of the render pipeline; prints a table, then one JSON line."""
    if random_weights and model is not None:
        fail("give either --model or --random-weights, not both", EXIT_BAD_INPUT)
    if text_encoder and not random_weights:
        fail(
            "--text-encoder goes with --random-weights: other models encode with their own text encoder",
            EXIT_BAD_INPUT,
        )
    source = ModelSource(ModelKind.RANDOM) if random_weights else ModelSource.parse(model)
    given = GenerationOptions(memory=memory, window=window, sink=sink, bank_size=bank_size,
                              record_interval=record_interval, sma=sma, steps=steps)  # fmt: skip
    with reported():
        settings = option_settings(given.settings(), geometry_for(source))
    import torch

    from .. import bench as bench_mod
    from ..plan import decoder_request

    with reported():
        dev = torch.device(checked_device(device))
        decode_given = decode_device is not None  # `--decode-device ""` is refused, not left out
        decode_dev = torch.device(checked_device(decode_device, "--decode-device")) if decode_given else None
        if fp8:
            check_fp8(str(dev))
        decoder_choice = decoder_request(source, decoder, decoder_weights)
    if memory_limit is not None and dev.type != "cuda":
        fail(f"--memory-limit caps a CUDA device's memory; --device is {dev}", EXIT_BAD_INPUT)
    if source.is_random and dev.type != "cuda":  # minutes a chunk on a CPU: said before the wait, not after
        warn(f"--random-weights on {dev}: the full-size 1.3B model runs there for minutes a chunk before anything "
             "prints; `memflow bench --model demo --device cpu` measures the pipeline on a CPU in seconds")  # fmt: skip
    try:
        options = bench_mod.BenchOptions(
            model=source, device=dev, settings=settings, latent_frames=frames, switches=switches,
            compile=CompileMode.from_option(compile), fp8=fp8, compare=compare, decode_device=decode_dev,
            full_text_encoder=text_encoder, memory_limit_gib=memory_limit, time_to_video=time_to_video,
            decoder=decoder_choice,
        )  # fmt: skip
    except bench_mod.BenchError as error:
        fail(str(error), EXIT_BAD_INPUT)
    with err.status("benchmark") as spinner:
        try:
            result = bench_mod.run(options, status=lambda text: spinner.update(escape(f"benchmark: {text}")))
        except PlanError as error:  # the weights cannot be loaded
            fail(error.message, error.exit_code, error.hint)
        except torch.cuda.OutOfMemoryError as error:
            limit = f"the --memory-limit of {memory_limit:g} GiB" if memory_limit is not None else "the GPU"
            fail(f"the run does not fit {limit}: {str(error).splitlines()[0]}")
        except Exception as error:  # noqa: BLE001 - a failed run reaches the user as one line
            fail(f"{type(error).__name__}: {error}")
    table = Table(title=f"memflow bench: {result['model']} on {result['device']}", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
    out.print(table)
    out.print(json.dumps(result), soft_wrap=True, markup=False)
