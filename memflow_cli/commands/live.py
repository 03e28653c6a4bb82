"""`memflow live`: parse, check everything that can be checked before the model loads, then report the session.

Signals (`live.start.stop_on_signals`, over the whole command): before the session begins, Ctrl-C (SIGINT),
SIGTERM or SIGHUP stops it as it stops `render`. The first one while it runs ends it at the next chunk
boundary: the MP4 is finished and the replay script and sidecar are written, exit code 0. A second one while a
chunk is being made aborts at once: the partial video is kept as `render` keeps it, exit code 130 (128 + the
signal's number otherwise). Once the last chunk is made, a signal changes nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.markup import escape

from ..decoders import DecoderRequest
from ..output import OutputError
from ..plan import (
    EXIT_FAILED,
    PlanError,
    RenderRequest,
    check_fp8,
    check_outputs,
    check_seed,
    checked_device,
    cut_prompts,
    geometry_for,
    lora_settings,
    open_engine,
    parse_duration,
    story_name,
    story_settings,
    text_tokens,
)
from ..report import (
    Terminated,
    err,
    out,
    stop_code,
    stop_signals_like_ctrl_c,
    stop_word,
    warn,
    warn_prompt_cuts,
)
from ..request import CompileMode, GenerationOptions, ModelSource
from ..script import format_seconds
from ..text import one_line, plural
from .common import (
    RELEASED_LORA,
    TIME_FORMATS,
    BankSize,
    Compile,
    DecodeDevice,
    DecoderWeights,
    Device,
    Fp8,
    KeepSnapshots,
    LoraAlpha,
    LoraRank,
    MemoryMode,
    RecordInterval,
    Seed,
    Sink,
    Sma,
    Steps,
    Window,
    reported,
    whole_number,
)

if TYPE_CHECKING:  # torch and the page's server are imported when a session starts, not with the command
    from ..engine import Engine
    from ..live.events import EventQueue
    from ..live.prompts import StdinReader
    from ..live.server import Address, LiveServer
    from ..live.session import LiveRequest
    from ..live.start import SessionStop

EPILOG = (
    "Examples:  memflow live --prompt 'a lighthouse at dusk' -o live.mp4 --serve 8000  |  "
    "printf 'a storm rolls in\\n' | memflow live story.yaml -o live.mp4 --duration 30s"
)


def live(
    script: Annotated[
        Path | None, typer.Argument(help="Opening script (.yaml/.yml): its segments come at their times; its "
                                    "duration is not used (the session runs until --duration or Ctrl-C).",
                                    metavar="SCRIPT", show_default=False)  # fmt: skip
    ] = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="The opening prompt, instead of a script.", metavar="TEXT")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="The MP4; the replay script goes beside it as .yaml.", metavar="FILE.mp4"),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Weights folder, 'demo' or 'random' (as render). Default: the HF cache.",
                     metavar="PATH|demo|random"),  # fmt: skip
    ] = None,
    device: Device = None,
    decode_device: DecodeDevice = None,
    decoder: Annotated[
        str | None,
        typer.Option("--decoder", help="wan: the Wan2.1 VAE (full quality); tae: the TAEHV preview decoder (fast). "
                     "Default: tae where its weights are found (memflow weights download --decoder tae), else wan.",
                     metavar="wan|tae"),  # fmt: skip
    ] = None,
    decoder_weights: DecoderWeights = None,
    seed: Seed = None,
    duration: Annotated[
        str | None,
        typer.Option(help=f"End the session there, e.g. 60s. Times: {TIME_FORMATS}. Default: at Ctrl-C.",
                     metavar="TIME"),  # fmt: skip
    ] = None,
    ahead: Annotated[
        int,
        typer.Option(help="Chunks generation may run ahead of playback (0.75 s each): more is smoother, "
                     "fewer shows a typed prompt sooner.", metavar="N",
                     parser=whole_number("--ahead", 0, 64)),  # fmt: skip
    ] = 2,
    serve: Annotated[
        str | None,
        typer.Option(help="Serve the page that plays the session and takes prompts, e.g. 8000 or 127.0.0.1:8000.",
                     metavar="[HOST:]PORT"),  # fmt: skip
    ] = None,
    public: Annotated[
        bool,
        typer.Option("--public", help="Allow --serve on an address other machines reach; the URL then carries a "
                     "random token that every request needs."),  # fmt: skip
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing video, its replay script and a partial video.")
    ] = False,
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
    snapshots: KeepSnapshots = False,
) -> None:
    """Render continuously while you type what happens next; watch it in the browser; replay it exactly.

    Each line typed (or piped on stdin) is the prompt from the next chunk not started yet. Ends at
    --duration, on Ctrl-C or on SIGTERM (the end of piped input does not end it). Writes FILE.mp4
    (growing as it renders), its sidecar .json and FILE.yaml: `memflow render FILE.yaml` makes the
    same video, frame for frame.
    """
    with stop_signals_like_ctrl_c():  # a signal before the session's own handler is said as in `render`
        try:
            from ..live.events import EventQueue
            from ..live.prompts import StdinReader
            from ..live.start import (
                SessionStop,
                bound_server,
                opening_story,
                replay_options,
                reserve_outputs,
                stdin_fd,
                stop_on_signals,
            )
        except KeyboardInterrupt as stopped:
            _not_started(stopped)

        events = EventQueue()  # the session's one queue: lines typed while the model loads wait there, as signals do
        with SessionStop() as stop, stop_on_signals(stop, events), reported(), ExitStack() as stack:
            try:
                # 1. everything checked before the model loads (the output before torch is imported)
                if (script is None) == (prompt is None):
                    raise PlanError("give an opening script or --prompt TEXT (one of them)",
                                    "memflow live --prompt 'a lighthouse at dusk' -o live.mp4")  # fmt: skip
                if output is None:
                    raise PlanError("give the output video with -o FILE.mp4")
                check_outputs(RenderRequest(scripts=(), output=output))
                address = _address(serve, public)
                limit_s = parse_duration(duration)
                check_seed(seed)
                options = GenerationOptions(
                    model=ModelSource.parse(model), memory=memory, window=window, sink=sink, bank_size=bank_size,
                    record_interval=record_interval, sma=sma, steps=steps, lora=lora_settings(lora_rank, lora_alpha),
                    compile=CompileMode.from_option(compile), fp8=fp8,
                )  # fmt: skip
                geometry = geometry_for(options.model)
                opening, title = opening_story(script, prompt, output, geometry)
                settings = story_settings(opening, options.settings(), geometry)
                device = checked_device(device)
                if decode_device is not None:
                    decode_device = checked_device(decode_device, "--decode-device")
                options = replace(options, device=device, decode_device=decode_device)
                if fp8:
                    check_fp8(device)
                options = replace(options, decoder=_live_decoder(options.model, decoder, decoder_weights))
                # 2. the outputs claimed, then the model
                reserve_outputs(stack, output, script, overwrite)
                _say_decoder(options.decoder)
                token_limit, count_tokens = text_tokens(options.model)  # a prompt past it is told, as in `render`
                warn_prompt_cuts(story_name(opening), cut_prompts(opening, geometry, token_limit, count_tokens))
                reader = stack.enter_context(StdinReader(stdin_fd(_warn), events))
                server = bound_server(stack, address, events, public, geometry.fps) if address is not None else None
                opening_prompts = [segment.prompt for segment in opening.segments]  # encoded while the model loads
                engine = stack.enter_context(_engine(options, opening_prompts))
                replay = replay_options(options, engine.fast.asked)
                stop.running = True  # from here a first signal ends the session at the next chunk (`stop_on_signals`)
            except KeyboardInterrupt as stopped:  # a signal before the session began (its checks, the model's load)
                stop.finishing = True  # a further one does not cut the teardown short
                _not_started(stopped)
            from ..live.session import LiveRequest  # torch is loaded by now

            story_seed = opening.seed if seed is None else seed
            request = LiveRequest(target=output, opening=opening, title=title, opening_script=script,
                                  settings=settings, seed=story_seed, limit_s=limit_s, ahead=ahead, overwrite=overwrite,
                                  snapshots=snapshots, replay_options=replay, token_limit=token_limit,
                                  count_tokens=count_tokens)  # fmt: skip
            _session(engine, stop, request, events, reader, server)


def _address(serve: str | None, public: bool) -> Address | None:
    """Where the page is served (`--serve`, `--public`), checked; None: no page."""
    from ..live.server import ServeError, check_bind, parse_address

    if serve is None:
        if public:
            raise PlanError("--public only applies to --serve", "add --serve 0.0.0.0:PORT, or leave out --public")
        return None
    try:
        address = parse_address(serve)
        check_bind(address, public)
    except ServeError as error:
        raise PlanError(str(error)) from None
    return address


def _not_started(stop: KeyboardInterrupt) -> NoReturn:
    """A signal before the session began: said as `render` says it, with its exit code."""
    err.print(f"[yellow]{stop_word(stop)}:[/] before the session started; nothing was written")
    raise typer.Exit(stop_code(stop)) from None


def _engine(options: GenerationOptions, prompts: list[str]) -> Engine:
    """The session's engine (`plan.open_engine`): compiled only when asked, as an open-ended video cannot win the
    compile back; its notice shown."""
    assert options.device is not None
    engine = open_engine(options, options.device, decode_device=options.decode_device, prompts=prompts)
    if engine.notice:
        warn(engine.notice)
    return engine


def _session(
    engine: Engine, stop: SessionStop, request: LiveRequest, events: EventQueue, reader: StdinReader,
    server: LiveServer | None,
) -> None:  # fmt: skip
    """The session (`live.session.run_live`) with its page, reported; a second signal's abort said in one line."""
    from ..live.session import run_live
    from ..mp4 import RenderInterrupted

    if server is not None:
        server.start()
        err.print(f"watch and steer: {'  or  '.join(server.urls)}", markup=False, soft_wrap=True)
    if sys.stdin is not None and sys.stdin.isatty():
        err.print("type what happens next and press Enter; Ctrl-C ends the session", markup=False)
    try:
        result = run_live(engine, request, events, reader, _Report(engine.geometry.fps, server), stop)
    except RenderInterrupted as aborted:
        kept = aborted.partial is not None and aborted.partial.exists()
        where = f"playable partial video: {aborted.partial}" if kept else "no frame was finished"
        _aborted(aborted.__context__, f"{aborted.frames} frames written; {where}")
    except KeyboardInterrupt as stopped:  # a second signal before the video's file was opened
        stop.finishing = True
        _aborted(stopped, "no frame was written")
    except OutputError as error:
        raise PlanError(str(error), error.hint, EXIT_FAILED) from None
    finally:
        if server is not None:
            server.end()
    out.print(str(result.path), markup=False, soft_wrap=True)
    if result.script is not None:
        out.print(str(result.script), markup=False, soft_wrap=True)
    if result.unused_prompts:
        _warn(f"{len(result.unused_prompts)} prompt(s) came after the last chunk started and are not in the video")
    err.print(_summary(result, engine.geometry.fps), markup=False, soft_wrap=True)
    if result.replay_problem is not None:
        raise PlanError(result.replay_problem, f"the video {result.path} and its sidecar {result.sidecar} are "
                        "complete and kept; the sidecar's timeline lists every segment", EXIT_FAILED)  # fmt: skip


def _aborted(stop: BaseException | None, what: str) -> NoReturn:
    """A session aborted by a second signal: said in one line, and the exit code of that signal."""
    how = stop_word(stop) if isinstance(stop, Terminated) else "aborted"
    err.print(f"[yellow]{how}:[/] {escape(what)}", soft_wrap=True)
    raise typer.Exit(stop_code(stop))


class _Report:
    """Prints the session's switches, latencies and warnings on stderr, and hands frames and viewers to the page's
    server: called by the session loop alone (`live.loop`)."""

    def __init__(self, fps: int, server):
        self.fps, self.server = fps, server

    def switched(self, segment, waited: int) -> None:
        queued = f" ({waited} more queued)" if waited else ""
        err.print(f"{format_seconds(segment.start_s)} (chunk {segment.start_chunk}) {segment.source}: "
                  f"{one_line(segment.prompt)}{queued}", markup=False, soft_wrap=True)  # fmt: skip

    def chunk(self, index: int, frames, first_frame: int, due: Sequence[float], segments) -> None:
        if self.server is not None:
            shown = [{"start_s": s.start_s, "prompt": s.prompt, "source": s.source} for s in segments]
            self.server.show(frames.numpy(), first_frame, due, shown)

    def latency(self, latency) -> None:
        err.print(f"  on screen {latency.to_screen_s:.2f} s after it arrived (made after {latency.to_written_s:.2f} s)",
                  markup=False)  # fmt: skip

    def notice(self, text: str) -> None:
        err.print(f"[yellow]note:[/] {escape(text)}", soft_wrap=True)

    def warn(self, text: str) -> None:
        _warn(text)

    def viewers(self, video, events) -> None:
        if self.server is not None:
            self.server.watch(video, events)


def _summary(result, fps: int) -> str:
    latency = result.latency_summary()
    said = (f"prompt to screen {latency['to_screen_median_s']:.2f} s median, {latency['to_screen_max_s']:.2f} s "
            f"max over {latency['prompts']} prompt(s)") if latency["prompts"] else "no prompt typed"  # fmt: skip
    stalls = (f"playback stalled {result.stalls} time(s), {result.stalled_s:.2f} s in all" if result.stalls
              else "playback never stalled")  # fmt: skip
    return (f"live: {plural(result.chunks, 'chunk')}, {result.video_frames} frames "
            f"({result.video_frames / fps:.2f} s of video) "
            f"in {result.seconds:.1f} s, ended by {result.ended_by}; {said}; {stalls}; metadata {result.sidecar}")


def _live_decoder(model: ModelSource | str | None, name: str | None, weights: Path | None) -> DecoderRequest:
    """The session's decoder: as asked; unasked, TAEHV where its weights are found for real weights (the
    preview decoder keeps up with real time), else the VAE."""
    from ..decoders import DecoderChoice
    from ..plan import decoder_request
    from ..tae.files import find_tae_weights

    model = ModelSource.parse(model)
    default = DecoderChoice.WAN  # `--decoder-weights` alone means tae, as in every command (`decoder_request`)
    if name is None and weights is None and not model.built_in:
        folder = Path(model.folder).expanduser() if model.folder is not None else None
        if find_tae_weights(None, folder) is not None:
            default = DecoderChoice.TAE
    return decoder_request(model, name, weights, default)


def _say_decoder(request: DecoderRequest) -> None:
    """Which decoder the session uses, and how to choose the other (on stderr, once its outputs are claimed)."""
    other = ("--decoder wan for the full-quality Wan VAE" if request.is_tae
             else "--decoder tae for the fast preview decoder (memflow weights download --decoder tae)")  # fmt: skip
    err.print(f"live: decoding with {request.choice.description}; {other}", markup=False, soft_wrap=True)


def _warn(text: str) -> None:
    err.print(f"[yellow]live:[/] {escape(text)}", soft_wrap=True)
