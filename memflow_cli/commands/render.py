"""`memflow render`: options -> one RenderRequest, run in this process, under torchrun, or over `--gpus N`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..plan import PlanError, RenderRequest, check_outputs, check_seed, lora_settings, parse_duration
from ..report import err, out, stop_code, stop_signals_like_ctrl_c, stop_word
from ..request import CompileMode, GenerationOptions, ModelSource
from .common import (
    RELEASED_LORA,
    TIME_FORMATS,
    BankSize,
    Compile,
    DecodeDevice,
    Decoder,
    DecoderWeights,
    Device,
    Fp8,
    KeepSnapshots,
    LoraAlpha,
    LoraRank,
    MemoryMode,
    OutDir,
    RecordInterval,
    Scripts,
    Seed,
    SegmentSeconds,
    Sink,
    Sma,
    Steps,
    Window,
    reported,
    whole_number,
)

EPILOG = (
    "Examples:  memflow render story.yaml -o story.mp4  |  "
    "memflow render a.yaml b.jsonl --out-dir renders --duration 5s  |  "
    "memflow render scripts_examples/lighthouse.yaml --model demo -o demo.mp4"
)


def render(
    scripts: Scripts,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="The output MP4 of one story.", metavar="FILE.mp4")
    ] = None,
    out_dir: OutDir = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Weights folder, 'demo' (tiny random model) or 'random' (full-size random weights: noise, for "
            "speed measurements). Default: the HF cache.",
            metavar="PATH|demo|random",
        ),
    ] = None,
    device: Device = None,
    decode_device: DecodeDevice = None,
    decoder: Decoder = None,
    decoder_weights: DecoderWeights = None,
    seed: Seed = None,
    duration: Annotated[
        str | None,
        typer.Option(help=f"Render only the first part (a preview), e.g. 5s. Times: {TIME_FORMATS}.", metavar="TIME"),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace existing outputs and a partial video left by a stopped render."),
    ] = False,
    skip_existing: Annotated[
        bool,
        typer.Option(
            "--skip-existing",
            help="Resume a batch: skip a story whose video is a finished render of the same request (story, seed, "
            "settings, length), and continue a story whose render was stopped from its last segment boundary (its "
            "snapshot, with --snapshots), else from the start.",
        ),
    ] = False,
    update: Annotated[
        bool,
        typer.Option(
            "--update",
            help="Replace the video, re-rendering only from the first segment that changed since it was "
            "rendered with --snapshots (same seed, settings, model and device kind); anything else renders from "
            "the start.",
        ),
    ] = False,
    snapshots: KeepSnapshots = False,
    memory: MemoryMode = None,
    window: Window = None,
    sink: Sink = None,
    bank_size: BankSize = None,
    record_interval: RecordInterval = None,
    sma: Sma = None,
    steps: Steps = None,
    lora_rank: LoraRank = RELEASED_LORA.rank,
    lora_alpha: LoraAlpha = RELEASED_LORA.alpha,
    compile: Compile = None,
    fp8: Fp8 = False,
    segment_seconds: SegmentSeconds = 10.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    gpus: Annotated[
        int | None,
        typer.Option(help="Share the stories over N processes on this machine, one GPU each (torchrun).", metavar="N",
                     parser=whole_number("--gpus", 1)),  # fmt: skip
    ] = None,
) -> None:
    """Render scripts to MP4s that grow on disk chunk by chunk; prints the path of each finished video.

    Each SCRIPT is a .yaml/.yml story or an official .jsonl prompt file. Settings come from
    the defaults, then the script's `settings:`, then the options given here. Under torchrun
    (`torchrun --nproc-per-node N -m memflow_cli render ...`) the stories are shared out over the
    processes, one GPU each, finished videos are skipped and stopped ones rendered again.
    """
    from ..distributed import rank_env
    from ..plan import decoder_request

    with stop_signals_like_ctrl_c(), reported():
        try:
            ranks = rank_env()
        except ValueError as error:
            raise PlanError(str(error)) from None
        if ranks is not None and not ranks.is_main:
            out.quiet = err.quiet = True  # rank 0 reports, once for all
        check_seed(seed)
        options = GenerationOptions(
            model=ModelSource.parse(model), device=device, decode_device=decode_device, memory=memory,
            window=window, sink=sink, bank_size=bank_size, record_interval=record_interval, sma=sma, steps=steps,
            lora=lora_settings(lora_rank, lora_alpha), compile=CompileMode.from_option(compile), fp8=fp8,
            decoder=decoder_request(model, decoder, decoder_weights),
        )  # fmt: skip
        request = RenderRequest(
            scripts=tuple(scripts), output=output, out_dir=out_dir, options=options, seed=seed,
            duration_s=parse_duration(duration), overwrite=overwrite, skip_existing=skip_existing, update=update,
            snapshots=snapshots, segment_seconds=segment_seconds,
        )  # fmt: skip
        check_outputs(request)
        try:
            raise typer.Exit(_run(request, ranks, gpus, quiet))
        except KeyboardInterrupt as stop:  # outside a render (a render reports its own partial file)
            err.print(f"[yellow]{stop_word(stop)}:[/] no video was being written")
            raise typer.Exit(stop_code(stop)) from None


def _run(request: RenderRequest, ranks, gpus: int | None, quiet: bool) -> int:
    if gpus is not None and ranks is None:
        from ..distributed import launch, launch_problem, without_option

        if problem := launch_problem(gpus, request.options.device):
            raise PlanError(*problem)
        return launch(without_option(sys.argv[1:], "--gpus"), gpus)
    if ranks is not None:
        from ..batch import render_on_ranks

        return render_on_ranks(ranks, request, quiet)
    from ..batch import render_here

    return render_here(request, quiet)
