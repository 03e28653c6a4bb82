"""Running a plan: the jobs of one render request, in this process or as one rank of torchrun, with progress
and a report.

Both ways run the same plan (`plan.plan_jobs`) and decide the same way what to do with each output
(`plan.claim`): render it, skip a finished render of the same request, or leave a story that another live
memflow process is rendering ("in progress"). With `--skip-existing` (always under torchrun) a batch started
again after any stop resumes: the partial video of a render that died is replaced and its story rendered again
from the beginning; finished videos are never touched.

In this process (`render_here`), every output is claimed before the model loads, so a wrong output stops the
request before anything is rendered. Under torchrun (`render_on_ranks`) each rank reads every script, so all
agree on the job list without sending it; rank 0 alone reports bad scripts, shows the progress of all ranks and
prints the summary; a rank claims each output when it comes to it, and a story that fails is reported while
the others go on.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .devices import device_problem
from .distributed import Board, RankEnv, RankReport, StoryOutcome, assign, from_main, process_group, rank_device
from .loading import WeightsError
from .output import OutputError, partial_path
from .plan import (
    EXIT_FAILED,
    Claim,
    Job,
    PlanError,
    RenderRequest,
    check_fp8,
    checked_device,
    claim,
    cut_prompts,
    finished_difference,
    geometry_for,
    make_out_dir,
    open_engine,
    out_dir_made,
    plan_jobs,
    story_name,
    text_tokens,
)
from .report import (
    download_hint,
    err,
    out,
    print_error,
    stop_code,
    stop_word,
    warn,
    warn_prompt_cuts,
)
from .request import GenerationOptions
from .script import ScriptError, format_seconds
from .settings import GenerationSettings, SettingsError, VideoGeometry
from .text import SafeConsole, one_line

if TYPE_CHECKING:
    from .engine import Engine

POLL_S = 0.5  # how often rank 0 looks at the others' progress once its own share is done


def report_claim(job: Job, outcome: Claim) -> None:
    """The line of a job that is not rendered here: skipped (its path on stdout too) or in progress elsewhere."""
    if outcome is Claim.SKIP:
        err.print(f"skip: {job.target} (a finished render of this request)", markup=False, soft_wrap=True)
        out.print(str(job.target), markup=False, soft_wrap=True)
    elif outcome is Claim.IN_PROGRESS:
        err.print(f"in progress: {job.target} (another memflow process is rendering it)", markup=False,
                  soft_wrap=True)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# In this process


def render_here(request: RenderRequest, quiet: bool) -> int:
    """Render the request's stories one after another in this process; returns the exit code.

    Raises PlanError for a request that cannot be planned (nothing is rendered then).
    """
    options = request.options
    geometry = geometry_for(options.model)
    jobs, _ = plan_jobs(request, geometry)
    if every_video_finished(jobs, request, geometry):  # nothing needs the device: torch is not even imported
        for job in jobs:
            report_claim(job, Claim.SKIP)
        return 0
    device = checked_device(options.device)
    decode_device = None if options.decode_device is None else checked_device(options.decode_device, "--decode-device")
    if options.fp8:
        check_fp8(device)
    with ExitStack() as held:
        if request.out_dir is not None:
            held.enter_context(out_dir_made(request.out_dir))  # removed again if nothing is written in it
        todo, stopped = [], set()
        for job in jobs:
            outcome, was_stopped = claim_output(job, request, geometry, held)
            report_claim(job, outcome)
            if outcome is Claim.RENDER:
                todo.append(job)
            if was_stopped:
                stopped.add(job.target)
        if not todo:
            return 0
        warn_cut_prompts(todo, request, geometry)
        first_prompts = todo[0].story.timeline(geometry, request.duration_s).prompts  # encoded while loading
        engine = held.enter_context(opened_engine(options, device, decode_device, todo, first_prompts))
        failures = 0
        for job in todo:
            try:
                with story_progress(job, quiet) as update:
                    result = render_job(engine, job, request, update, stopped=job.target in stopped)
            except RenderStopped as stop:
                err.print(stop.line, soft_wrap=True)
                return stop.exit_code
            except WeightsError as error:  # the text encoder, loaded when a story first needs it
                print_error(f"{job.title}: {error}", download_hint(str(error)))
                failures += 1
                continue
            except (OutputError, SettingsError, ScriptError, ValueError) as error:
                print_error(f"{job.title}: {error}", getattr(error, "hint", None))
                failures += 1
                continue
            out.print(str(result.path), markup=False, soft_wrap=True)
            if not quiet:
                frames = result.timeline.video_frames
                err.print(
                    f"{job.title}: {frames} frames in {result.seconds:.1f} s "
                    f"({frames / max(result.seconds, 1e-9):.1f} frames/s); metadata {result.sidecar}",
                    markup=False, soft_wrap=True,
                )  # fmt: skip
    return EXIT_FAILED if failures else 0


def every_video_finished(jobs: list[Job], request: RenderRequest, geometry: VideoGeometry) -> bool:
    """With --skip-existing, whether every job's video is a finished render of this request (a batch run again
    over finished stories). The device names are still checked, by name alone."""
    for device, option in ((request.options.device, "--device"), (request.options.decode_device, "--decode-device")):
        if device is not None and (problem := device_problem(device, option)):
            raise PlanError(*problem)
    return request.skip_existing and all(finished_difference(job, request, geometry) is None for job in jobs)


def warn_cut_prompts(jobs: list[Job], request: RenderRequest, geometry: VideoGeometry) -> None:
    """One warning per story whose prompts run past the text encoder's limit, counted exactly with the model's
    tokenizer where it has one."""
    limit, count = text_tokens(request.options.model)
    for job in jobs:
        warn_prompt_cuts(story_name(job.story), cut_prompts(job.story, geometry, limit, count, request.duration_s))


def opened_engine(
    options: GenerationOptions, device: str, decode_device: str | None, jobs: list[Job], prompts: Sequence[str]
) -> Engine:
    """The engine for `jobs` (`plan.open_engine`: compiled where they win it back), its notice shown."""
    engine = open_engine(options, device, decode_device=decode_device, videos=_videos(jobs), prompts=prompts)
    if engine.notice:
        warn(engine.notice)
    return engine


def _videos(jobs: list[Job]) -> list[tuple[int, GenerationSettings]]:
    return [(job.chunks, job.settings) for job in jobs]


def claim_output(job: Job, request: RenderRequest, geometry: VideoGeometry, held: ExitStack) -> tuple[Claim, bool]:
    """`plan.claim`, and whether the partial video of a stopped render of the output was there before it (the
    claim replaces it; the render says what it keeps of that render, `render_job`'s `stopped`)."""
    stopped = partial_path(job.target).exists()
    return claim(job, request, geometry, held), stopped


class RenderStopped(Exception):
    """A render was stopped by Ctrl-C or a signal. `line`: what it kept (its partial video), to report (markup);
    `exit_code` to leave with."""

    def __init__(self, exit_code: int, stop: BaseException | None, line: str):
        super().__init__(exit_code)
        self.exit_code = exit_code
        self.stop = stop
        self.line = line


ProgressCallback = Callable[[Any], None]  # takes render.ChunkProgress


def render_job(engine, job: Job, request: RenderRequest, update: ProgressCallback | None, *, stopped: bool = False):
    """Render one job (its output already claimed; `stopped`: a stopped render's partial video of it was there);
    a stop raises RenderStopped, which names the partial video kept."""
    from .render import RenderInterrupted, render_story

    try:
        return render_story(
            engine, job.story, job.target, job.settings, seed=job.seed, duration_s=request.duration_s,
            overwrite=request.overwrite, progress=update, reuse=request.update or request.skip_existing,
            stopped=stopped, keep_snapshots=request.snapshots,
            notice=lambda line: err.print(one_line(f"{job.title}: {line}"), markup=False, soft_wrap=True),
        )  # fmt: skip
    except RenderInterrupted as interrupted:
        partial = interrupted.partial
        where = f"playable partial video: {partial}" if partial else "no frame was finished"
        message = escape(f"{job.title}: {interrupted.frames} frames written; {where}")
        line = f"[yellow]{stop_word(interrupted.__context__)}:[/] {message}"
        raise RenderStopped(stop_code(interrupted.__context__), interrupted.__context__, line) from None


@contextmanager
def story_progress(job: Job, quiet: bool) -> Iterator[ProgressCallback | None]:
    """A bar of one story's chunks on stderr (none when quiet)."""
    if quiet:
        yield None
        return
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"),
        TextColumn("{task.fields[segment]}"), TextColumn("{task.fields[fps]}"), TimeElapsedColumn(),
        TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns, console=err, transient=False, disable=not err.is_terminal) as bar:
        task = bar.add_task(escape(one_line(job.title)), total=None, segment="", fps="")

        def update(p) -> None:
            fps = p.video_frames / max(p.elapsed_s, 1e-9)
            segment = f"segment {p.segment + 1} @ {format_seconds(p.segment_start_s)}"
            bar.update(task, completed=p.chunk, total=p.chunks, segment=segment, fps=f"{fps:.1f} frames/s")

        yield update


# ---------------------------------------------------------------------------------------------------------------------
# As one rank of torchrun


def render_on_ranks(ranks: RankEnv, request: RenderRequest, quiet: bool) -> int:
    """Render this rank's share of the request's stories; returns the exit code (rank 0's tells the outcome).

    Finished videos are always skipped here and dead partials replaced (`skip_existing`): a batch resumes.
    """
    import torch

    started = time.perf_counter()
    request = dataclasses.replace(request, skip_existing=True)
    options = request.options
    if options.decode_device is not None:
        raise PlanError("--decode-device is for one process rendering one story at a time",
                        "under torchrun every GPU renders stories of its own; leave --decode-device out")  # fmt: skip
    try:
        name = rank_device(ranks, options.device, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    except ValueError as error:
        raise PlanError(str(error), "give --device cuda or --device cpu, or leave it out") from None
    device = torch.device(checked_device(name))
    if options.fp8:
        check_fp8(str(device))
    geometry = geometry_for(options.model)
    jobs, problems = plan_jobs(request, geometry, keep_going=True)
    for problem in problems:
        print_error(problem)
    if ranks.is_main:  # once for all ranks: they read the prompts with the same tokenizer
        warn_cut_prompts(jobs, request, geometry)
    if jobs and request.out_dir is not None:
        make_out_dir(request.out_dir)

    with process_group(ranks, device) as board:
        finished = from_main([finished_difference(job, request, geometry) is None for job in jobs])
        todo = [job for job, done in zip(jobs, finished, strict=True) if not done]
        skipped = [job for job, done in zip(jobs, finished, strict=True) if done]
        for job in skipped:
            err.print(f"skip: {job.target} (a finished render of this request)", markup=False, soft_wrap=True)
        share = assign([job.chunks for job in todo], ranks.world_size)[ranks.rank]
        try:
            with _overall_progress(ranks, quiet, todo) as show:
                report = _render_share(ranks, request, geometry, device, todo, share, board, show)
                board.post(report)
                if not ranks.is_main:
                    return 0
                while board.reports_posted() < ranks.world_size:
                    show(board)
                    time.sleep(POLL_S)
                show(board)
        except RenderStopped as stopped:
            _rank_console(ranks).print(stopped.line, soft_wrap=True)  # every rank: only it knows its partial
            err.print(f"[yellow]{stop_word(stopped.stop)}:[/] the batch was stopped; finished videos stay, "
                      "run it again to resume")  # fmt: skip
            return stopped.exit_code
        except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM from torchrun when another process failed
            err.print(f"[yellow]{stop_word(stop)}:[/] the batch was stopped; finished videos stay, run it again to "
                      "resume")  # fmt: skip
            return stop_code(stop)
        reports = board.reports()
    return _summary(jobs, todo, reports, skipped, problems=len(problems), seconds=time.perf_counter() - started)


def _rank_console(ranks: RankEnv) -> SafeConsole:
    """Where a rank says what only it knows (the partial video it kept when stopped): rank 0's `err`; a console of
    its own on another rank, whose `err` is quiet (rank 0 reports the rest, once for all)."""
    return err if ranks.is_main else SafeConsole(stderr=True, highlight=False, emoji=False)


Show = Callable[[Board], None]


@contextmanager
def _overall_progress(ranks: RankEnv, quiet: bool, todo: list[Job]) -> Iterator[Show]:
    """On rank 0 (unless quiet), one bar for the chunks of every rank; elsewhere a no-op."""
    if not ranks.is_main or quiet or not todo:
        yield lambda board: None
        return
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"),
        TextColumn("{task.fields[stories]}"), TimeElapsedColumn(), TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns, console=err, transient=False, disable=not err.is_terminal) as bar:
        description = f"{_count(len(todo), 'story', 'stories')} on {_count(ranks.world_size, 'process', 'processes')}"
        task = bar.add_task(description, total=sum(job.chunks for job in todo), stories="")

        def show(board: Board) -> None:
            bar.update(task, completed=board.chunks_done(), stories=f"{board.stories_done()} done")

        yield show


def _render_share(
    ranks: RankEnv,
    request: RenderRequest,
    geometry: VideoGeometry,
    device: Any,
    todo: list[Job],
    share: list[int],
    board: Board,
    show: Show,
) -> RankReport:
    """Render this rank's stories one after another; a failure is recorded and the next story goes on."""
    if not share:
        return RankReport(ranks.rank, str(device), 0.0, 0.0)
    load_started = time.perf_counter()
    first_prompts = todo[share[0]].story.timeline(geometry, request.duration_s).prompts  # encoded while loading
    try:
        videos = _videos([todo[index] for index in share])
        engine = open_engine(request.options, str(device), videos=videos, prompts=first_prompts)
    except Exception as error:  # noqa: BLE001 - weights/device problems fail this rank's stories, not the job
        board.add_chunks(sum(todo[index].chunks for index in share))
        message = f"cannot load the model on {device}: {_error_line(error)}"
        return RankReport(ranks.rank, str(device), time.perf_counter() - load_started, 0.0,
                          tuple(StoryOutcome(index, False, message) for index in share))  # fmt: skip
    load_s = time.perf_counter() - load_started
    if ranks.is_main and engine.notice:
        warn(engine.notice)
    render_started = time.perf_counter()
    with engine:
        outcomes = [_render_rank_job(engine, request, geometry, index, todo[index], board, show) for index in share]
    return RankReport(ranks.rank, str(device), load_s, time.perf_counter() - render_started, tuple(outcomes))


def _render_rank_job(
    engine, request: RenderRequest, geometry: VideoGeometry, index: int, job: Job, board: Board, show: Show
) -> StoryOutcome:
    reported = 0  # chunks of this story already counted on the board

    def progress(p) -> None:
        nonlocal reported
        board.add_chunks(p.chunk - reported)
        reported = p.chunk
        show(board)

    def done(outcome: StoryOutcome) -> StoryOutcome:
        board.add_chunks(job.chunks - reported)
        board.add_story()
        return outcome

    with ExitStack() as held:
        try:
            outcome, stopped = claim_output(job, request, geometry, held)
        except PlanError as error:  # not ours to replace
            hint = f" ({error.hint})" if error.hint else ""
            return done(StoryOutcome(index, False, f"{error.message}{hint}"))
        if outcome is Claim.SKIP:
            return done(StoryOutcome(index, False, skipped=True))
        if outcome is Claim.IN_PROGRESS:
            return done(StoryOutcome(index, False, in_progress=True))
        try:
            result = render_job(engine, job, request, progress, stopped=stopped)
        except RenderStopped:
            raise
        except Exception as error:  # noqa: BLE001 - one story's failure is reported; the batch goes on
            return done(StoryOutcome(index, False, _one_line(error)))
    return done(StoryOutcome(index, True, "", result.seconds, result.timeline.video_frames))


def _error_line(error: BaseException) -> str:
    """A failure as one line: a known problem's message, or the exception's type and first line."""
    return error.message if isinstance(error, PlanError) else _one_line(error)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _summary(
    jobs: list[Job], todo: list[Job], reports: list[RankReport], skipped: list[Job], problems: int, seconds: float
) -> int:
    """Rank 0: every failure (stderr); the finished videos, rendered or skipped, in batch order, and the summary
    (stdout)."""
    outcomes = sorted((outcome for report in reports for outcome in report.outcomes), key=lambda o: o.index)
    for outcome in outcomes:
        job = todo[outcome.index]
        if outcome.in_progress:
            report_claim(job, Claim.IN_PROGRESS)
        elif not outcome.rendered and not outcome.skipped:
            print_error(f"{job.title} ({job.target}): {outcome.message}")
    finished = {todo[o.index].target for o in outcomes if o.rendered or o.skipped}
    finished.update(job.target for job in skipped)
    for job in jobs:
        if job.target in finished:
            out.print(str(job.target), markup=False, soft_wrap=True)
    rendered = sum(outcome.rendered for outcome in outcomes)
    skips = len(skipped) + sum(outcome.skipped for outcome in outcomes)
    busy = sum(outcome.in_progress for outcome in outcomes)
    failed = len(outcomes) - rendered - busy - sum(outcome.skipped for outcome in outcomes)
    line = f"batch: {rendered} rendered, {skips} skipped, {failed} failed"
    if busy:
        line += f", {busy} in progress elsewhere"
    if problems:
        line += f", {_count(problems, 'bad script', 'bad scripts')}"
    line += f" on {_count(len(reports), 'process', 'processes')} in {seconds:.1f} s"
    slowest_s = max(report.render_s for report in reports)
    if rendered and slowest_s > 0:
        frames = sum(outcome.video_frames for outcome in outcomes)
        line += f" ({3600 * rendered / slowest_s:.1f} stories/h, {frames / slowest_s:.1f} frames/s rendering)"
    out.print(line, markup=False, soft_wrap=True)
    for report in reports:
        done = sum(outcome.rendered for outcome in report.outcomes)
        failed_here = sum(not (o.rendered or o.skipped or o.in_progress) for o in report.outcomes)
        out.print(
            f"  rank {report.rank} ({report.device}): {done} rendered, {failed_here} failed, "
            f"load {report.load_s:.1f} s, render {report.render_s:.1f} s",
            markup=False, soft_wrap=True,
        )  # fmt: skip
    return EXIT_FAILED if failed or problems else 0
