"""`memflow render` under torchrun: every process renders its share of the stories on its own GPU.

Each rank reads every script, so all agree on the story list without sending it; rank 0 alone reports bad
scripts, shows the progress of all ranks and prints the summary. A story that fails is reported and the
others go on; a finished output (video and sidecar) is skipped, so a stopped batch resumes. The videos and
sidecars are those a single `memflow render` writes: the same `render_story`, the same seeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .cli import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    Terminated,
    _checked_device,
    _difference_from_request,
    _geometry_for,
    _interrupted_code,
    _quiet_libraries,
    _terminate_like_ctrl_c,
    err,
    fail,
    out,
    output_paths,
    require_fp8,
)
from .distributed import Board, RankEnv, RankReport, StoryOutcome, assign, from_main, process_group, rank_device
from .output import OutputError, reserved_output
from .script import ScriptError, Story, load_scripts
from .settings import GenerationSettings, LoraSettings, SettingsError, VideoGeometry

POLL_S = 0.5  # how often rank 0 looks at the others' progress once its own share is done


@dataclass(frozen=True)
class BatchRequest:
    """What `memflow render` was asked, as parsed by the CLI."""

    scripts: tuple[Path, ...]
    output: Path | None
    out_dir: Path | None
    model: str | None
    device: str | None
    decode_device: str | None
    seed: int | None
    duration_s: float | None
    overwrite: bool
    settings: dict[str, Any]  # command-line generation settings, None where not given
    lora: LoraSettings
    compile: bool | None  # None: where this process's stories win the compile back (`render.compile_choice`)
    fp8: bool
    segment_seconds: float
    quiet: bool


@dataclass(frozen=True)
class Job:
    """One story to render, and its cost in chunks (what the plan balances)."""

    story: Story
    target: Path
    settings: GenerationSettings
    chunks: int


def render_batch(ranks: RankEnv, request: BatchRequest) -> int:
    """Render this rank's share of the request's stories; returns the exit code (rank 0's tells the outcome)."""
    import torch

    started = time.perf_counter()
    if request.decode_device is not None:
        fail("--decode-device is for one process rendering one story at a time", EXIT_BAD_INPUT,
             "under torchrun every GPU renders stories of its own; leave --decode-device out")  # fmt: skip
    try:
        name = rank_device(ranks, request.device, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    except ValueError as error:
        fail(str(error), EXIT_BAD_INPUT, "give --device cuda or --device cpu, or leave it out")
    device = torch.device(_checked_device(name))
    if request.fp8:
        require_fp8(str(device))
    _quiet_libraries()
    geometry = _geometry_for(request.model)
    jobs, problems = _jobs(request, geometry)
    for problem in problems:
        err.print(f"[bold red]error:[/] {escape(problem)}", soft_wrap=True)

    with process_group(ranks, device) as board, _terminate_like_ctrl_c():
        finished = from_main([_finished(job, request, geometry) for job in jobs])
        todo = [job for job, done in zip(jobs, finished, strict=True) if not done]
        skipped = [job for job, done in zip(jobs, finished, strict=True) if done]
        for job in skipped:
            err.print(f"skip: {job.target} (a finished render of this request)", markup=False, soft_wrap=True)
        share = assign([job.chunks for job in todo], ranks.world_size)[ranks.rank]
        try:
            with _overall_progress(ranks, request, todo) as show:
                report = _render_share(ranks, request, device, todo, share, board, show)
                board.post(report)
                if not ranks.is_main:
                    return 0
                while board.reports_posted() < ranks.world_size:
                    show(board)
                    time.sleep(POLL_S)
                show(board)
        except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM from torchrun when another process failed
            how = "terminated" if isinstance(stop, Terminated) else "interrupted"
            err.print(f"[yellow]{how}:[/] the batch was stopped; finished videos stay, run it again to resume")
            return _interrupted_code(stop)
        reports = board.reports()
    return _summary(jobs, todo, reports, skipped, problems=len(problems), seconds=time.perf_counter() - started)


def _jobs(request: BatchRequest, geometry: VideoGeometry) -> tuple[list[Job], list[str]]:
    """Every story of the good scripts, with its output and settings; and one message per bad script or story."""
    given = {name: value for name, value in request.settings.items() if value is not None}
    try:
        GenerationSettings(geometry=geometry).with_overrides(given)
    except SettingsError as error:
        fail(f"--{error.field.replace('_', '-')}: {error.message}", EXIT_BAD_INPUT)
    stories: list[Story] = []
    problems: list[str] = []
    for path in request.scripts:
        try:
            stories.extend(load_scripts(path, request.segment_seconds, geometry))
        except ScriptError as error:
            problems.append(str(error))
    settled: list[tuple[Story, GenerationSettings]] = []
    for story in stories:
        try:
            settings = GenerationSettings(geometry=geometry).with_overrides(story.settings).with_overrides(given)
        except SettingsError as error:
            problems.append(f"{story.path}: settings.{error}")
            continue
        settled.append((story, settings))
    targets = output_paths([story for story, _ in settled], request.output, request.out_dir) if settled else []
    jobs = [
        Job(story, target, settings, story.timeline(geometry, request.duration_s).chunks)
        for (story, settings), target in zip(settled, targets, strict=True)
    ]
    return jobs, problems


def _finished(job: Job, request: BatchRequest, geometry: VideoGeometry) -> bool:
    """The job's video is a finished render of this same request (its sidecar says so)."""
    seed = job.story.seed if request.seed is None else request.seed
    return _difference_from_request(
        job.story, job.target, job.settings, seed, request.duration_s, request.fp8, geometry
    ) is None  # fmt: skip


Show = Callable[[Board], None]


@contextmanager
def _overall_progress(ranks: RankEnv, request: BatchRequest, todo: list[Job]) -> Iterator[Show]:
    """On rank 0 (unless quiet), one bar for the chunks of every rank; elsewhere a no-op."""
    if not ranks.is_main or request.quiet or not todo:
        yield lambda board: None
        return
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"),
        TextColumn("{task.fields[stories]}"), TimeElapsedColumn(), TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns, console=err, transient=False) as bar:
        description = f"{_count(len(todo), 'story', 'stories')} on {_count(ranks.world_size, 'process', 'processes')}"
        task = bar.add_task(description, total=sum(job.chunks for job in todo), stories="")

        def show(board: Board) -> None:
            bar.update(task, completed=board.chunks_done(), stories=f"{board.stories_done()} done")

        yield show


def _render_share(
    ranks: RankEnv, request: BatchRequest, device: Any, todo: list[Job], share: list[int], board: Board, show: Show
) -> RankReport:
    """Render this rank's stories one after another; a failure is recorded and the next story goes on."""
    from .engine import load_engine
    from .render import compile_choice

    if not share:
        return RankReport(ranks.rank, str(device), 0.0, 0.0)
    load_started = time.perf_counter()
    try:
        plans = [(todo[index].story, todo[index].settings) for index in share]
        choice = compile_choice(request.model, device, request.compile, plans, request.duration_s, request.fp8)
        engine = load_engine(request.model, str(device), request.lora, fp8=request.fp8, compile_choice=choice)
    except Exception as error:  # noqa: BLE001 - weights/device problems fail this rank's stories, not the job
        board.add_chunks(sum(todo[index].chunks for index in share))
        message = f"cannot load the model on {device}: {_one_line(error)}"
        return RankReport(ranks.rank, str(device), time.perf_counter() - load_started, 0.0,
                          tuple(StoryOutcome(index, False, message) for index in share))  # fmt: skip
    load_s = time.perf_counter() - load_started
    if ranks.is_main and engine.notice:
        err.print(f"[yellow]warning:[/] {escape(engine.notice)}", soft_wrap=True)
    render_started = time.perf_counter()
    with engine:
        outcomes = [_render_job(engine, request, index, todo[index], board, show) for index in share]
    return RankReport(ranks.rank, str(device), load_s, time.perf_counter() - render_started, tuple(outcomes))


def _render_job(engine, request: BatchRequest, index: int, job: Job, board: Board, show: Show):
    from .render import RenderInterrupted, render_story

    reported = 0  # chunks of this story already counted on the board

    def progress(p) -> None:
        nonlocal reported
        board.add_chunks(p.chunk - reported)
        reported = p.chunk
        show(board)

    seed = job.story.seed if request.seed is None else request.seed
    try:
        with reserved_output(job.target, overwrite=request.overwrite):
            result = render_story(
                engine, job.story, job.target, job.settings, seed=seed, duration_s=request.duration_s,
                overwrite=request.overwrite, progress=progress,
            )  # fmt: skip
    except RenderInterrupted as stop:
        where = f"playable partial video: {stop.partial}" if stop.partial else "no frame was finished"
        err.print(f"[yellow]stopped:[/] {escape(f'{job.story.title}: {stop.frames} frames written; {where}')}")
        raise (Terminated() if isinstance(stop.__context__, Terminated) else KeyboardInterrupt()) from None
    except OutputError as error:  # busy (another process renders it) or not ours to replace
        board.add_chunks(job.chunks)
        board.add_story()
        hint = f" ({error.hint})" if error.hint else ""
        return StoryOutcome(index, False, f"{error}{hint}")
    except Exception as error:  # noqa: BLE001 - one story's failure is reported; the batch goes on
        board.add_chunks(job.chunks - reported)
        board.add_story()
        return StoryOutcome(index, False, _one_line(error))
    board.add_story()
    return StoryOutcome(index, True, "", result.seconds, result.timeline.video_frames)


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
        if not outcome.rendered:
            job = todo[outcome.index]
            err.print(f"[bold red]error:[/] {escape(f'{job.story.title} ({job.target}): {outcome.message}')}",
                      soft_wrap=True)  # fmt: skip
    finished = {todo[outcome.index].target for outcome in outcomes if outcome.rendered}
    finished.update(job.target for job in skipped)
    for job in jobs:
        if job.target in finished:
            out.print(str(job.target), markup=False, soft_wrap=True)
    rendered = sum(outcome.rendered for outcome in outcomes)
    failed = len(outcomes) - rendered
    line = f"batch: {rendered} rendered, {len(skipped)} skipped, {failed} failed"
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
        out.print(
            f"  rank {report.rank} ({report.device}): {done} rendered, {len(report.outcomes) - done} failed, "
            f"load {report.load_s:.1f} s, render {report.render_s:.1f} s",
            markup=False, soft_wrap=True,
        )  # fmt: skip
    return EXIT_FAILED if failed or problems else 0
