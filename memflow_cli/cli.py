"""The `memflow` command line: parses, builds settings, shows progress and reports. Nothing else.

Results go to stdout; progress, warnings and errors to stderr. A known error is one line and a hint,
with exit code 2 for bad input and 1 for a failed run.

torch, diffusers and transformers are imported inside the commands that need them, so `--help`,
`--version` and `check` start at once.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .output import OutputError, OutputExistsError, memflow_sidecar, reserved_output, sidecar_path
from .script import MAX_SEED, ScriptError, Story, Timeline, format_seconds, load_scripts
from .settings import SETTING_NAMES, GenerationSettings, LoraSettings, SettingsError, VideoGeometry

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Render long, consistent video narratives with MemFlow (Wan2.1-T2V-1.3B).",
    rich_markup_mode=None,  # plain help: option names with their values (`--window N`), no type labels
)
weights_app = typer.Typer(no_args_is_help=True, help="Fetch and check the model weights.", rich_markup_mode=None)
app.add_typer(weights_app, name="weights")

# User text (titles, prompts, paths) is escaped where markup is used: `[camera pans left]` is not a style.
out = Console(highlight=False, emoji=False)
err = Console(stderr=True, highlight=False, emoji=False)

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM
DOWNLOAD_HINT = "fetch the weights with: memflow weights download"
TIME_FORMATS = "10s, 1.5s, 1m30s, 1h, 0:10 or 1:02.5"

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
Device = Annotated[
    str | None,
    typer.Option("--device", help="cuda, cuda:1, cpu... Default: cuda if present, else cpu.", metavar="DEVICE"),
]
DecodeDevice = Annotated[
    str | None, typer.Option(help="Decode on another device than generation, e.g. cuda:1.", metavar="DEVICE")
]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile/--no-compile",
        help="The fast path on CUDA: compiled blocks and decoder steps, CUDA graphs (first chunk slower); "
        "--no-compile runs the eager model.",
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


def _version(value: bool) -> None:
    if value:
        out.print(f"memflow {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    # OpenMP threads that wait for work sleep instead of spinning: with every core busy (another program,
    # or the ffmpeg encoder) spinning threads slowed the CPU renders over tenfold. Read when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _quiet_libraries() -> None:
    """Keep the libraries' own info and warnings out of the user's terminal."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


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


def story_record(story: Story, timeline: Timeline, output: Path) -> dict[str, Any]:
    """One story as `check --json` prints it."""
    return {
        "script": str(story.path), "line": story.line, "title": story.title, "seed": story.seed,
        "output": str(output), "chunks": timeline.chunks, "video_frames": timeline.video_frames,
        "duration_s": timeline.duration_s, "segments": len(timeline.segments),
    }  # fmt: skip


@app.command(
    epilog="Examples:  memflow check story.yaml  |  memflow check scripts/*.yaml --out-dir renders --json",
)
def check(
    scripts: Scripts,
    segment_seconds: SegmentSeconds = 10.0,
    out_dir: OutDir = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="One JSON object per story (script, title, seed, output file, frames) instead."),
    ] = False,
) -> None:
    """Validate scripts and print each resolved timeline (no GPU, no weights, no torch).

    Each SCRIPT is a .yaml/.yml story or an official .jsonl prompt file.
    """
    geometry = VideoGeometry()
    stories = load_stories(scripts, segment_seconds, geometry)
    # titles that collide matter only in one folder
    outputs = story_outputs(stories, out_dir) if out_dir else [Path(output_name(story)) for story in stories]
    for story, output in zip(stories, outputs, strict=True):
        timeline = story.timeline(geometry)
        if as_json:
            record = json.dumps(story_record(story, timeline, output), ensure_ascii=False)
            out.print(record, markup=False, soft_wrap=True)
        else:
            out.print(timeline_table(story, timeline))
    if not as_json:
        out.print(f"ok: {len(scripts)} script(s) valid")


def option_settings(cli: dict[str, Any], geometry: VideoGeometry) -> GenerationSettings:
    """Defaults, then the options given on the command line; a bad option fails with exit code 2."""
    given = {k: v for k, v in cli.items() if v is not None}
    try:
        return GenerationSettings(geometry=geometry).with_overrides(given)
    except SettingsError as error:
        blamed = next((name for name in (error.field, *error.related) if name in given), error.field)
        fail(f"--{blamed.replace('_', '-')}: {error.message}", EXIT_BAD_INPUT)


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


def output_name(story: Story) -> str:
    return f"{safe_filename(story.title)}.mp4"


def story_outputs(stories: list[Story], out_dir: Path) -> list[Path]:
    """`DIR/<title>.mp4` for every story; two stories that would write one file are an error naming both."""
    paths = [out_dir / output_name(story) for story in stories]
    first_writer: dict[Path, Story] = {}
    for story, path in zip(stories, paths, strict=True):
        if (other := first_writer.setdefault(path, story)) is not story:
            fail(
                f"two stories would both write {path}: {_story_name(other)} and {_story_name(story)}",
                EXIT_BAD_INPUT, "give one of them another title",
            )  # fmt: skip
    return paths


def _story_name(story: Story) -> str:
    return f"{story.title!r} ({story.path}{f':{story.line}' if story.line else ''})"


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
    paths = story_outputs(stories, out_dir)
    _make_folder(out_dir)
    return paths


def _make_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        fail(f"--out-dir {folder}: it is a file, not a folder", EXIT_BAD_INPUT, "give a folder for the videos")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f"--out-dir {folder}: cannot create it: {error.strerror or error}", EXIT_BAD_INPUT,
             "give a folder you can write to")  # fmt: skip


def _checked_device(device: str | None, option: str = "--device") -> str:
    """The device to use; a name torch does not know, or CUDA where there is none, is bad input."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        fail(f"{option} {device}: not a device name", EXIT_BAD_INPUT, "use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if torch.version.cuda is None:
            fail(f"{option} {device}: this torch {torch.__version__} is a CPU build", EXIT_BAD_INPUT,
                 "use --device cpu, or install a CUDA build of torch")  # fmt: skip
        if not torch.cuda.is_available():
            fail(f"{option} {device}: no CUDA GPU is visible", EXIT_BAD_INPUT, "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            fail(f"{option} {device}: only {torch.cuda.device_count()} CUDA GPU(s) here", EXIT_BAD_INPUT,
                 "use cuda:0 or another index below the count")  # fmt: skip
    return device


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so that the render stops the same clean way."""


@contextmanager
def _terminate_like_ctrl_c() -> Iterator[None]:
    def stop(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted_code(stop: BaseException) -> int:
    return EXIT_TERMINATED if isinstance(stop, Terminated) else EXIT_INTERRUPTED


@app.command(
    epilog=(
        "Examples:  memflow render story.yaml -o story.mp4  |  "
        "memflow render a.yaml b.jsonl --out-dir renders --duration 5s  |  "
        "memflow render scripts_examples/lighthouse.yaml --model demo -o demo.mp4"
    ),
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
    seed: Annotated[
        int | None, typer.Option(help="The noise seed, 0 to 2**64-1. Default: the script's seed (0).", metavar="N")
    ] = None,
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
            help="Skip a story whose video is a finished render of the same request (story, seed, settings, length).",
        ),
    ] = False,
    memory: MemoryMode = None,
    window: Window = None,
    sink: Sink = None,
    bank_size: BankSize = None,
    record_interval: RecordInterval = None,
    sma: Sma = None,
    steps: Steps = None,
    lora_rank: Annotated[int, typer.Option(help="Rank of lora.pt.", metavar="N")] = 256,
    lora_alpha: Annotated[float, typer.Option(help="Alpha of lora.pt.", metavar="X")] = 256.0,
    compile: Compile = True,
    fp8: Fp8 = False,
    segment_seconds: SegmentSeconds = 10.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    gpus: Annotated[
        int | None,
        typer.Option(help="Share the stories over N processes on this machine, one GPU each (torchrun).", min=1),
    ] = None,
) -> None:
    """Render scripts to MP4s that grow on disk chunk by chunk; prints the path of each finished video.

    Each SCRIPT is a .yaml/.yml story or an official .jsonl prompt file. Settings come from
    the defaults, then the script's `settings:`, then the options given here. Under torchrun
    (`torchrun --nproc-per-node N -m memflow_cli render ...`) the stories are shared out over the
    processes, one GPU each, and finished videos are skipped.
    """
    from .distributed import rank_env
    from .script import parse_time

    ranks = rank_env()
    if ranks is not None and not ranks.is_main:
        out.quiet = err.quiet = True  # rank 0 reports, once for all

    duration_s = None
    if duration is not None:
        try:
            duration_s = parse_time(duration)
        except ValueError as error:
            fail(f"--duration: {error}", EXIT_BAD_INPUT)
        if duration_s == 0:
            fail("--duration: must be longer than 0s", EXIT_BAD_INPUT, "give the preview length, like 5s")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        fail(f"--seed: must be between 0 and 2**64-1, got {seed}", EXIT_BAD_INPUT, "use a whole number like 0 or 42")
    cli_settings = setting_options(
        memory=memory, window=window, sink=sink, bank_size=bank_size, record_interval=record_interval, sma=sma,
        steps=steps,
    )  # fmt: skip
    if gpus is not None and ranks is None:
        from .distributed import launch, launch_problem, without_option

        if problem := launch_problem(gpus, device):
            fail(problem[0], EXIT_BAD_INPUT, problem[1])
        raise typer.Exit(launch(without_option(sys.argv[1:], "--gpus"), gpus))
    if ranks is not None:
        from .batch import BatchRequest, render_batch

        request = BatchRequest(
            scripts=tuple(scripts), output=output, out_dir=out_dir, model=model, device=device,
            decode_device=decode_device, seed=seed, duration_s=duration_s, overwrite=overwrite,
            settings=cli_settings, lora=LoraSettings(rank=lora_rank, alpha=lora_alpha), compile=compile, fp8=fp8,
            segment_seconds=segment_seconds, quiet=quiet,
        )  # fmt: skip
        raise typer.Exit(render_batch(ranks, request))

    geometry = _geometry_for(model)
    stories = load_stories(scripts, segment_seconds, geometry)
    targets = output_paths(stories, output, out_dir)
    plans = [(story, target, generation_settings(story, cli_settings, geometry)) for story, target in zip(
        stories, targets, strict=True)]  # fmt: skip
    device = _checked_device(device)
    if decode_device is not None:
        decode_device = _checked_device(decode_device, "--decode-device")
    if fp8:
        require_fp8(device)

    with ExitStack() as reservations, _terminate_like_ctrl_c():
        try:
            todo = _reserve(plans, reservations, seed, duration_s, fp8, overwrite, skip_existing, geometry)
            if not todo:
                return
            lora = LoraSettings(rank=lora_rank, alpha=lora_alpha)
            engine = reservations.enter_context(_load_engine(model, device, lora, compile, fp8, decode_device))
            if engine.notice:
                err.print(f"[yellow]warning:[/] {engine.notice}", soft_wrap=True)
            _render_all(engine, todo, seed, duration_s, overwrite, quiet)
        except KeyboardInterrupt as stop:  # outside a render (a render reports its own partial file)
            how = "terminated" if isinstance(stop, Terminated) else "interrupted"
            err.print(f"[yellow]{how}:[/] no video was being written")
            raise typer.Exit(_interrupted_code(stop)) from None


def _reserve(plans, reservations: ExitStack, seed, duration_s, fp8, overwrite, skip_existing, geometry):
    """Claim every output before anything loads; returns the plans left to render (skipped ones out)."""
    todo = []
    for story, target, settings in plans:
        story_seed = story.seed if seed is None else seed
        difference = _difference_from_request(story, target, settings, story_seed, duration_s, fp8, geometry)
        if skip_existing and difference is None:
            err.print(f"skip: {target} (a finished render of this request)", markup=False, soft_wrap=True)
            out.print(str(target), markup=False, soft_wrap=True)
            continue
        try:
            reservations.enter_context(reserved_output(target, overwrite=overwrite))
        except OutputExistsError as error:
            why = f" ({difference})" if difference and error.path == target else ""
            fail(f"{error}{why}", EXIT_BAD_INPUT, error.hint)
        except OutputError as error:
            fail(str(error), EXIT_BAD_INPUT, error.hint)
        todo.append((story, target, settings))
    return todo


def _difference_from_request(story, target, settings, seed, duration_s, fp8, geometry) -> str | None:
    """None if `target` is a finished render of this request (its sidecar says so), else how it differs."""
    if not target.is_file():
        return "no video yet"
    recorded = memflow_sidecar(sidecar_path(target))
    if recorded is None:
        return f"no memflow metadata beside it ({sidecar_path(target).name})"
    from .render import request_record

    timeline = story.timeline(geometry, duration_s)
    asked = json.loads(json.dumps(request_record(story, timeline, settings, seed)))
    if recorded.get("title") != asked["title"]:
        return f"it holds {recorded.get('title')!r} from {recorded.get('script')}"
    was, now = recorded.get("timeline", {}).get("duration_s"), asked["timeline"]["duration_s"]
    if was != now:
        return f"it is {was:.2f} s long, {now:.2f} s were asked" if isinstance(was, float) else "another length"
    if recorded.get("timeline") != asked["timeline"]:
        return "its segments differ from the script's"
    if recorded.get("seed") != asked["seed"]:
        return f"it was rendered with seed {recorded.get('seed')}, not {seed}"
    if recorded.get("settings") != asked["settings"]:
        return "it was rendered with other settings"
    if recorded.get("fp8", False) != fp8:
        return f"it was rendered {'without' if fp8 else 'with'} --fp8"
    return None


def _render_all(engine, plans, seed, duration_s, overwrite, quiet) -> None:
    from .render import RenderInterrupted

    failures = 0
    for story, target, settings in plans:
        try:
            result = _render_one(engine, story, target, settings, seed, duration_s, overwrite, quiet)
        except RenderInterrupted as stop:
            where = f"playable partial video: {stop.partial}" if stop.partial else "no frame was finished"
            how = "terminated" if isinstance(stop.__context__, Terminated) else "interrupted"
            message = escape(f"{story.title}: {stop.frames} frames written; {where}")
            err.print(f"[yellow]{how}:[/] {message}", soft_wrap=True)
            raise typer.Exit(_interrupted_code(stop.__context__ or stop)) from None
        except (OutputError, SettingsError, ScriptError, ValueError) as error:
            err.print(f"[bold red]error:[/] {escape(f'{story.title}: {error}')}", soft_wrap=True)
            if hint := getattr(error, "hint", None):
                err.print(f"  hint: {escape(hint)}", soft_wrap=True)
            failures += 1
            continue
        out.print(str(result.path), markup=False, soft_wrap=True)
        if not quiet:
            err.print(
                f"{story.title}: {result.timeline.video_frames} frames in {result.seconds:.1f} s "
                f"({result.timeline.video_frames / max(result.seconds, 1e-9):.1f} frames/s); metadata {result.sidecar}",
                markup=False, soft_wrap=True,
            )  # fmt: skip
    if failures:
        raise typer.Exit(EXIT_FAILED)


def _geometry_for(model: str | None) -> VideoGeometry:
    if model == "demo":
        from .demo import DEMO_GEOMETRY

        return DEMO_GEOMETRY
    return VideoGeometry()


def require_fp8(device: str) -> None:
    """Exit with one line (exit code 2) where FP8 layers cannot run on `device`; before any weights load."""
    import torch

    from .engine import model_dtype
    from .speed.fp8 import fp8_unsupported_reason

    dev = torch.device(device)
    reason = fp8_unsupported_reason(dev, model_dtype(dev))
    if reason is not None:
        fail(f"--fp8 {reason}", EXIT_BAD_INPUT, "leave out --fp8 to run the linear layers in bf16")


def _load_engine(
    model: str | None,
    device: str,
    lora: LoraSettings,
    compile: bool = True,
    fp8: bool = False,
    decode_device: str | None = None,
):
    """The engine (close it, or use it in `with`); a weights problem is one line and exit code 1."""
    from .engine import load_engine
    from .loading import WeightsError

    _quiet_libraries()
    try:
        return load_engine(model, device, lora, compile=compile, fp8=fp8, decode_device=decode_device)
    except WeightsError as error:
        fail(str(error), EXIT_FAILED, _download_hint(str(error)))


def _download_hint(message: str) -> str | None:
    """The download hint, unless the message already names the command."""
    return None if "memflow weights download" in message else DOWNLOAD_HINT


def _render_one(engine, story, target, settings, seed, duration_s, overwrite, quiet):
    from .render import render_story

    seed = story.seed if seed is None else seed
    if quiet:
        return render_story(
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

        return render_story(
            engine, story, target, settings, seed=seed, duration_s=duration_s, overwrite=overwrite, progress=update
        )


@app.command(
    epilog="Examples:  memflow bench --random-weights  |  memflow bench --model demo --device cpu --frames 9",
)
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
    frames: Annotated[
        int, typer.Option(help="Latent frames to generate (video frames = 4*frames - 3).", min=3, metavar="N")
    ] = 120,
    switches: Annotated[int, typer.Option(help="Prompt switches, evenly spaced.", min=0, metavar="N")] = 0,
    memory: MemoryMode = None,
    window: Window = None,
    sink: Sink = None,
    bank_size: BankSize = None,
    record_interval: RecordInterval = None,
    sma: Sma = None,
    steps: Steps = None,
    compile: Compile = True,
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
            min=0.5,
            metavar="GIB",
        ),
    ] = None,
) -> None:
    """Measure speed and memory of the render pipeline; prints a table, then one JSON line."""
    if random_weights and model is not None:
        fail("give either --model or --random-weights, not both", EXIT_BAD_INPUT)
    if text_encoder and not random_weights:
        fail(
            "--text-encoder goes with --random-weights: other models encode with their own text encoder",
            EXIT_BAD_INPUT,
        )
    cli_settings = setting_options(
        memory=memory, window=window, sink=sink, bank_size=bank_size, record_interval=record_interval, sma=sma,
        steps=steps,
    )  # fmt: skip
    settings = option_settings(cli_settings, _geometry_for(model))
    import torch

    from . import bench as bench_mod
    from .engine import RANDOM
    from .loading import WeightsError

    dev = torch.device(_checked_device(device))
    decode_dev = torch.device(_checked_device(decode_device, "--decode-device")) if decode_device else None
    if fp8:
        require_fp8(str(dev))
    if memory_limit is not None and dev.type != "cuda":
        fail(f"--memory-limit caps a CUDA device's memory; --device is {dev}", EXIT_BAD_INPUT)
    _quiet_libraries()
    options = bench_mod.BenchOptions(
        model=RANDOM if random_weights else model, device=dev, settings=settings, latent_frames=frames,
        switches=switches, compile=compile, fp8=fp8, compare=compare,
        decode_device=decode_dev, full_text_encoder=text_encoder, memory_limit_gib=memory_limit,
    )  # fmt: skip
    with err.status("benchmark") as spinner:
        try:
            result = bench_mod.run(options, status=lambda text: spinner.update(f"benchmark: {text}"))
        except WeightsError as error:
            fail(str(error), EXIT_FAILED, _download_hint(str(error)))
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


@weights_app.command("download")
def weights_download(
    to: Annotated[
        Path | None, typer.Option(help="A folder to put the weights in. Default: the HF cache.", metavar="DIR")
    ] = None,
) -> None:
    """Fetch base.pt + lora.pt (KlingTeam/MemFlow) and the umT5 encoder, tokenizer and VAE of Wan-AI/Wan2.1-T2V-1.3B."""
    if to is not None and to.exists() and not to.is_dir():
        fail(f"--to {to}: it is a file, not a folder", EXIT_BAD_INPUT, "give a folder for the weights")
    _quiet_libraries()
    from .weights import WeightsError, download

    try:
        files = download(to)
    except WeightsError as error:
        fail(str(error))
    for role, path in files.components().items():
        out.print(f"{role}: {path}", markup=False, soft_wrap=True)


@weights_app.command("verify")
def weights_verify(
    model: Annotated[str | None, typer.Option(help="Weights folder. Default: the HF cache.", metavar="DIR")] = None,
) -> None:
    """Check that every weight file is present and readable, and each released Wan file has its released size."""
    _quiet_libraries()
    from .weights import WeightsError, resolve_model, verify

    try:
        results = verify(resolve_model(model))
    except WeightsError as error:
        fail(str(error), hint=_download_hint(str(error)))
    bad = [r for r in results if not r.ok]
    for result in results:
        out.print(str(result), markup=False, soft_wrap=True)
    if bad:
        fail(f"{len(bad)} problem(s) in the weights", hint="re-run: memflow weights download")


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="memflow")


def _register_live() -> None:
    from .commands.live import live

    app.command(epilog="Examples:  memflow live --prompt 'a lighthouse at dusk' -o live.mp4 --serve 8000  |  "
                "printf 'a storm rolls in\\n' | memflow live story.yaml -o live.mp4 --duration 30s")(live)


_register_live()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

