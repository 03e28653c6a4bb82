"""The `memflow` command line: parses, builds settings, shows progress and reports. Nothing else.

Results go to stdout; progress, warnings and errors to stderr. A known error is one line and a hint,
with exit code 2 for bad input and 1 for a failed run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .loading import WeightsError
from .output import OutputError
from .script import ScriptError, Story, Timeline, format_seconds, load_scripts
from .settings import SETTING_NAMES, GenerationSettings, LoraSettings, SettingsError, VideoGeometry

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Render long, consistent video narratives with MemFlow (Wan2.1-T2V-1.3B).",
)
weights_app = typer.Typer(no_args_is_help=True, help="Fetch and check the model weights.")
app.add_typer(weights_app, name="weights")

# User text (titles, prompts, paths) is escaped where markup is used: `[camera pans left]` is not a style.
out = Console(highlight=False, emoji=False)
err = Console(stderr=True, highlight=False, emoji=False)

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

Scripts = Annotated[list[Path], typer.Argument(help="Narrative scripts: .yaml/.yml, or official .jsonl prompt files.")]
SegmentSeconds = Annotated[
    float, typer.Option("--segment-seconds", help="Length of each segment of a JSONL story, in seconds.")
]
Fp8 = Annotated[
    bool,
    typer.Option(
        "--fp8",
        help="The transformer blocks' linear layers in FP8 with row-wise scales (CUDA, compute capability 8.9+): "
        "faster; the video changes slightly.",
    ),
]

# The generation options `render` and `bench` share (names as in settings.SETTING_NAMES; None: not given).
MemoryMode = Annotated[str | None, typer.Option(help="Memory: nam, sink or none.")]
Window = Annotated[int | None, typer.Option(help="Local attention window, latent frames.")]
Sink = Annotated[int | None, typer.Option(help="Attention-sink frames.")]
BankSize = Annotated[int | None, typer.Option(help="Memory-bank frames.")]
RecordInterval = Annotated[int | None, typer.Option(help="Chunks between bank recordings.")]
Sma = Annotated[bool | None, typer.Option("--sma/--no-sma", help="Sparse memory activation.")]
Steps = Annotated[str | None, typer.Option(help="Denoising steps, e.g. 1000,750,500,250.")]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile/--no-compile",
        help="The fast path on CUDA: compiled blocks and decoder steps, CUDA graphs (first chunk slower).",
    ),
]


def setting_options(**given: Any) -> dict[str, Any]:
    """The shared generation options as settings overrides (`GenerationSettings.with_overrides`)."""
    unknown = set(given) - set(SETTING_NAMES)
    assert not unknown, f"not settings: {unknown}"
    return given


def fail(message: str, code: int = EXIT_FAILED, hint: str | None = None) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    if hint:
        err.print(f"  hint: {escape(hint)}", soft_wrap=True)
    raise typer.Exit(code)


def load_stories(paths: list[Path], segment_seconds: float, geometry: VideoGeometry | None = None) -> list[Story]:
    stories: list[Story] = []
    for path in paths:
        try:
            stories.extend(load_scripts(path, segment_seconds, geometry))
        except ScriptError as error:
            fail(str(error), EXIT_BAD_INPUT)
    return stories


def timeline_table(story: Story, timeline: Timeline) -> Table:
    name = f"{story.path}" + (f":{story.line}" if story.line else "")
    table = Table(title=escape(f"{story.title}  ({name}, seed {story.seed})"), title_justify="left")
    for column in ("#", "start", "snapped", "chunk", "frames", "prompt"):
        table.add_column(column, overflow="fold" if column == "prompt" else "ellipsis")
    for s in timeline.segments:
        prompt = s.prompt if len(s.prompt) <= 80 else s.prompt[:77] + "..."
        table.add_row(
            str(s.index), format_seconds(s.start_s), format_seconds(s.snapped_start_s),
            str(s.start_chunk), str(s.video_frames), escape(prompt),
        )  # fmt: skip
    table.caption = (
        f"{timeline.chunks} chunks, {timeline.latent_frames} latent frames, "
        f"{timeline.video_frames} video frames, {timeline.duration_s:.2f} s"
    )
    return table


@app.command()
def check(
    scripts: Scripts,
    segment_seconds: SegmentSeconds = 10.0,
) -> None:
    """Validate scripts and print each resolved timeline (no GPU, no weights)."""
    geometry = VideoGeometry()
    for story in load_stories(scripts, segment_seconds, geometry):
        out.print(timeline_table(story, story.timeline(geometry)))
    out.print(f"ok: {len(scripts)} script(s) valid")


def option_settings(cli: dict[str, Any], geometry: VideoGeometry) -> GenerationSettings:
    """Defaults, then the options given on the command line; a bad option fails with exit code 2."""
    given = {k: v for k, v in cli.items() if v is not None}
    try:
        return GenerationSettings(geometry=geometry).with_overrides(given)
    except SettingsError as error:
        fail(f"--{error.field.replace('_', '-')}: {error.message}", EXIT_BAD_INPUT)


def generation_settings(story: Story, cli: dict[str, Any], geometry: VideoGeometry) -> GenerationSettings:
    """Defaults, then the script's `settings:`, then options given on the command line."""
    option_settings(cli, geometry)
    given = {k: v for k, v in cli.items() if v is not None}
    try:
        return GenerationSettings(geometry=geometry).with_overrides(story.settings).with_overrides(given)
    except SettingsError as error:
        fail(f"{story.path}: settings.{error}", EXIT_BAD_INPUT, "fix the script's settings or the command-line option")


def safe_filename(title: str) -> str:
    """A story title as a file name: path separators and control characters become '_'."""
    cleaned = "".join("_" if c in '/\\:*?"<>|' or ord(c) < 32 else c for c in title).strip(" .")
    return cleaned or "untitled"


def output_paths(stories: list[Story], output: Path | None, out_dir: Path | None) -> list[Path]:
    if (output is None) == (out_dir is None):
        fail("give exactly one of -o/--output FILE.mp4 or --out-dir DIR", EXIT_BAD_INPUT)
    if output is not None:
        if len(stories) != 1:
            fail(f"-o names one file but the scripts hold {len(stories)} stories", EXIT_BAD_INPUT, "use --out-dir DIR")
        if output.suffix.lower() != ".mp4":
            fail(f"{output}: the output must be an .mp4 file", EXIT_BAD_INPUT)
        return [output]
    assert out_dir is not None
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{safe_filename(story.title)}.mp4" for story in stories]
    seen: set[Path] = set()
    for story, path in zip(stories, paths, strict=True):
        if path in seen:
            fail(f"two stories are titled {story.title!r}: both would write {path}", EXIT_BAD_INPUT)
        seen.add(path)
    return paths


@app.command()
def render(
    scripts: Scripts,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output MP4 (one story).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out-dir", help="Folder for one MP4 per story.")] = None,
    model: Annotated[
        str | None, typer.Option(help="Weights folder, or 'demo' (tiny random model). Default: the HF cache.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cuda, cuda:1, cpu... Default: cuda if present.")] = None,
    seed: Annotated[int | None, typer.Option(help="Overrides the scripts' seed.", min=0)] = None,
    duration: Annotated[str | None, typer.Option(help="Render only the first part, e.g. 5s (previews).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
    memory: MemoryMode = None,
    window: Window = None,
    sink: Sink = None,
    bank_size: BankSize = None,
    record_interval: RecordInterval = None,
    sma: Sma = None,
    steps: Steps = None,
    lora_rank: Annotated[int, typer.Option(help="Rank of lora.pt.")] = 256,
    lora_alpha: Annotated[float, typer.Option(help="Alpha of lora.pt.")] = 256.0,
    compile: Compile = True,
    fp8: Fp8 = False,
    segment_seconds: SegmentSeconds = 10.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Render scripts to MP4s that grow on disk chunk by chunk."""
    from . import render as engine_mod
    from .script import parse_time

    duration_s = None
    if duration is not None:
        try:
            duration_s = parse_time(duration)
        except ValueError as error:
            fail(f"--duration: {error}", EXIT_BAD_INPUT)
        if duration_s == 0:
            fail("--duration: must be longer than 0s", EXIT_BAD_INPUT, "give the preview length, like 5s")
    cli_settings = setting_options(
        memory=memory, window=window, sink=sink, bank_size=bank_size, record_interval=record_interval, sma=sma,
        steps=steps,
    )  # fmt: skip

    geometry = _geometry_for(model)
    stories = load_stories(scripts, segment_seconds, geometry)
    targets = output_paths(stories, output, out_dir)
    plans = [(story, target, generation_settings(story, cli_settings, geometry)) for story, target in zip(
        stories, targets, strict=True)]  # fmt: skip
    for story, target, _ in plans:
        if target.exists() and not overwrite:
            fail(f"{target} exists (from {story.path}); nothing was rendered", EXIT_BAD_INPUT, "use --overwrite")

    if fp8:
        require_fp8(device)
    with _load_engine(model, device, LoraSettings(rank=lora_rank, alpha=lora_alpha), compile, fp8) as engine:
        if engine.notice:
            err.print(f"[yellow]warning:[/] {engine.notice}", soft_wrap=True)
        failures = _render_all(engine_mod, engine, plans, seed, duration_s, overwrite, quiet)
    if failures:
        raise typer.Exit(EXIT_FAILED)


def _render_all(engine_mod, engine, plans, seed, duration_s, overwrite, quiet) -> int:
    """Render every planned story; returns how many failed."""
    failures = 0
    for story, target, settings in plans:
        try:
            result = _render_one(engine_mod, engine, story, target, settings, seed, duration_s, overwrite, quiet)
        except engine_mod.RenderInterrupted as stop:
            where = f"playable partial video: {stop.partial}" if stop.partial else "no frame was finished"
            err.print(f"[yellow]interrupted:[/] {escape(f'{story.title}: {stop.frames} frames written; {where}')}")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except (OutputError, SettingsError, ScriptError, ValueError) as error:
            err.print(f"[bold red]error:[/] {escape(f'{story.title}: {error}')}", soft_wrap=True)
            failures += 1
            continue
        out.print(str(result.path), markup=False, soft_wrap=True)
        if not quiet:
            err.print(
                f"{story.title}: {result.timeline.video_frames} frames in {result.seconds:.1f} s "
                f"({result.timeline.video_frames / max(result.seconds, 1e-9):.1f} frames/s); metadata {result.sidecar}",
                markup=False, soft_wrap=True,
            )  # fmt: skip
    return failures


def _geometry_for(model: str | None) -> VideoGeometry:
    if model == "demo":
        from .demo import DEMO_GEOMETRY

        return DEMO_GEOMETRY
    return VideoGeometry()


def require_fp8(device: str | None) -> None:
    """Exit with one line (exit code 2) where FP8 layers cannot run on `device`; before any weights load."""
    import torch

    from .engine import default_device, model_dtype
    from .speed.fp8 import fp8_unsupported_reason

    try:
        dev = torch.device(device or default_device())
    except RuntimeError as error:
        fail(f"--device {device!r}: {error}", EXIT_BAD_INPUT)
    reason = fp8_unsupported_reason(dev, model_dtype(dev))
    if reason is not None:
        fail(f"--fp8 {reason}", EXIT_BAD_INPUT, "leave out --fp8 to run the linear layers in bf16")


def _load_engine(model: str | None, device: str | None, lora: LoraSettings, compile: bool = True, fp8: bool = False):
    from .engine import load_engine

    try:
        return load_engine(model, device, lora, compile=compile, fp8=fp8)
    except WeightsError as error:
        fail(str(error), EXIT_FAILED, "fetch the weights with: memflow weights download")
    except RuntimeError as error:
        if "CUDA" in str(error) or "device" in str(error):
            fail(f"cannot use device {device!r}: {error}", EXIT_BAD_INPUT, "try --device cpu")
        raise


def _render_one(engine_mod, engine, story, target, settings, seed, duration_s, overwrite, quiet):
    seed = story.seed if seed is None else seed
    if quiet:
        return engine_mod.render_story(
            engine, story, target, settings, seed=seed, duration_s=duration_s, overwrite=overwrite
        )
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"),
        TextColumn("{task.fields[segment]}"), TextColumn("{task.fields[fps]}"), TimeElapsedColumn(),
        TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(escape(story.title), total=None, segment="", fps="")

        def update(p) -> None:
            fps = p.video_frames / max(p.elapsed_s, 1e-9)
            segment = f"segment {p.segment + 1} @ {format_seconds(p.segment_start_s)}"
            bar.update(task, completed=p.chunk, total=p.chunks, segment=segment, fps=f"{fps:.1f} frames/s")

        return engine_mod.render_story(
            engine, story, target, settings, seed=seed, duration_s=duration_s, overwrite=overwrite, progress=update
        )


@app.command()
def bench(
    model: Annotated[
        str | None, typer.Option(help="'demo' (tiny, CPU smoke run), a weights folder, or the HF cache by default.")
    ] = None,
    random_weights: Annotated[
        bool, typer.Option("--random-weights", help="Full-size 1.3B model with random weights (nothing to load).")
    ] = False,
    device: Annotated[str | None, typer.Option(help="cuda, cpu... Default: cuda if present.")] = None,
    frames: Annotated[int, typer.Option(help="Latent frames to generate (video frames = 4*frames - 3).", min=3)] = 120,
    switches: Annotated[int, typer.Option(help="Prompt switches, evenly spaced.", min=0)] = 0,
    memory: MemoryMode = None,
    window: Window = None,
    sink: Sink = None,
    bank_size: BankSize = None,
    record_interval: RecordInterval = None,
    sma: Sma = None,
    steps: Steps = None,
    compile: Compile = True,
    compare: Annotated[bool, typer.Option(help="Also time memory none, sink, nam and nam+SMA.")] = False,
    fp8: Fp8 = False,
) -> None:
    """Measure speed and memory of the render pipeline; prints a table, then one JSON line."""
    import json

    import torch

    from . import bench as bench_mod
    from .engine import RANDOM, default_device

    if random_weights and model is not None:
        fail("give either --model or --random-weights, not both", EXIT_BAD_INPUT)
    cli_settings = setting_options(
        memory=memory, window=window, sink=sink, bank_size=bank_size, record_interval=record_interval, sma=sma,
        steps=steps,
    )  # fmt: skip
    settings = option_settings(cli_settings, _geometry_for(model))
    try:
        dev = torch.device(device or default_device())
    except RuntimeError as error:
        fail(str(error), EXIT_BAD_INPUT)
    if fp8:
        require_fp8(str(dev))
    options = bench_mod.BenchOptions(
        model=RANDOM if random_weights else model, device=dev, settings=settings, latent_frames=frames,
        switches=switches, compile=compile, fp8=fp8, compare=compare,
    )  # fmt: skip
    with err.status("benchmark") as spinner:
        try:
            result = bench_mod.run(options, status=lambda text: spinner.update(f"benchmark: {text}"))
        except Exception as error:  # noqa: BLE001 - weights/device problems reach the user as one line
            fail(f"{type(error).__name__}: {error}", hint="memflow weights download fetches the weights")
    table = Table(title=f"memflow bench: {result['model']} on {result['device']}", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
    out.print(table)
    out.print(json.dumps(result), soft_wrap=True, markup=False)


@weights_app.command("download")
def weights_download(
    to: Annotated[Path | None, typer.Option(help="A folder to put the weights in. Default: the HF cache.")] = None,
) -> None:
    """Fetch base.pt + lora.pt (KlingTeam/MemFlow) and the Wan2.1 text encoder, tokenizer and VAE."""
    from .weights import WeightsError, download

    try:
        files = download(to)
    except WeightsError as error:
        fail(str(error))
    for role, path in files.components().items():
        out.print(f"{role}: {path}", markup=False, soft_wrap=True)


@weights_app.command("verify")
def weights_verify(
    model: Annotated[str | None, typer.Option(help="Weights folder. Default: the HF cache.")] = None,
) -> None:
    """Check that every weight file is present and readable."""
    from .weights import WeightsError, resolve_model, verify

    try:
        results = verify(resolve_model(model))
    except WeightsError as error:
        fail(str(error), hint="fetch the weights with: memflow weights download")
    bad = [r for r in results if not r.ok]
    for result in results:
        out.print(str(result), markup=False, soft_wrap=True)
    if bad:
        fail(f"{len(bad)} problem(s) in the weights", hint="re-run: memflow weights download")


@app.callback()
def _quiet_libraries() -> None:
    """Keep the libraries' own info and warnings out of the user's terminal."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="memflow")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
