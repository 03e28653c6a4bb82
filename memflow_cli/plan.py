"""Planning a render: the scripts and options of one request -> the jobs to run.

Every way of rendering (`memflow render -o`, `--out-dir`, `--gpus N`, torchrun, `batch_render.sh`) goes through
here: one `RenderRequest` (what was asked), `plan_jobs` (each story with its output, settings, seed and length)
and `claim` (what to do with what is already on disk: render, skip a finished video, leave a story another
live process renders). Nothing here prints or exits: a problem is a `PlanError` (message, hint, exit code)
that the command reports as one line.

torch is not imported here, so a wrong output path is refused at once; only the device checks and
`open_engine` import it. The request is typed (`request.GenerationOptions`, `request.ModelSource`): nothing
here branches on the strings a user typed.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .companions import output_key
from .decoders import DecoderChoice, DecoderRequest
from .devices import device_problem
from .output import (
    OutputBusyError,
    OutputError,
    OutputExistsError,
    OutputLock,
    check_existing,
    check_output_name,
    check_reservable,
    memflow_sidecar,
    partial_path,
    sidecar_path,
)
from .record import request_record
from .report import download_hint
from .request import CompileMode, GenerationOptions, ModelSource
from .script import MAX_SEED, ScriptError, Story, load_scripts, parse_time
from .settings import SETTING_NAMES, GenerationSettings, LoraSettings, SettingsError, VideoGeometry
from .text import lone_surrogate, text_problem
from .tokens import PromptCut, TokenCounter, load_token_counter, prompt_cuts

if TYPE_CHECKING:
    from .engine import Engine

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
RELEASE_TEXT_TOKENS = 512  # tokens of a prompt the release's umT5 reads (text_encoder.DEFAULT_MAX_LENGTH)


class PlanError(Exception):
    """The request cannot be planned: one line for the user, a hint, and the exit code to leave with."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code


@dataclass(frozen=True)
class RenderRequest:
    """What `memflow render` was asked: scripts, where the videos go, the model and how to render."""

    scripts: tuple[Path, ...]
    output: Path | None = None  # -o: the one video of one story
    out_dir: Path | None = None  # --out-dir: <title>.mp4 for every story
    options: GenerationOptions = field(default_factory=GenerationOptions)  # model, devices, settings, speed
    seed: int | None = None  # None: each story's own seed
    duration_s: float | None = None  # a preview: only the first part
    overwrite: bool = False
    skip_existing: bool = False  # resume: skip finished videos, continue dead renders from their last snapshot
    update: bool = False  # replace existing videos, keeping what an edit of the story left unchanged
    snapshots: bool = False  # keep a snapshot at every segment boundary, for a later --update or resume
    segment_seconds: float = 10.0

    def seed_for(self, story: Story) -> int:
        return story.seed if self.seed is None else self.seed


@dataclass(frozen=True)
class Job:
    """One story to render: where, with which settings and seed, and its cost in chunks."""

    story: Story
    target: Path
    settings: GenerationSettings
    seed: int
    chunks: int

    @property
    def title(self) -> str:
        return self.story.title


class Claim(enum.Enum):
    """What becomes of a job once its output is looked at."""

    RENDER = "render"  # the output is reserved for this process
    SKIP = "skip"  # a finished render of this same request is there
    IN_PROGRESS = "in progress"  # another live memflow process renders it now


# ---------------------------------------------------------------------------------------------------------------------
# Options


def parse_duration(text: str | None) -> float | None:
    """`--duration`: a time longer than 0, or None."""
    if text is None:
        return None
    try:
        seconds = parse_time(text)
    except ValueError as error:
        raise PlanError(f"--duration: {error}") from None
    if seconds == 0:
        raise PlanError("--duration: must be longer than 0s", "give how long the video is to be, like 5s or 1m")
    return seconds


def check_seed(seed: int | None) -> None:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise PlanError(f"--seed: must be between 0 and 2**64-1, got {seed}", "use a whole number like 0 or 42")


def lora_settings(rank: int, alpha: float) -> LoraSettings:
    """`--lora-rank` and `--lora-alpha` as settings; a bad value is one line naming its option."""
    try:
        return LoraSettings(rank=rank, alpha=alpha)
    except SettingsError as error:
        raise PlanError(f"--{error.field.replace('_', '-')}: {error.message}", "the released lora.pt has rank 256 and "
                        "alpha 256") from None  # fmt: skip


def given_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The generation options that were given (None: not given); names as in `settings.SETTING_NAMES`."""
    unknown = set(settings) - set(SETTING_NAMES)
    assert not unknown, f"not settings: {unknown}"
    return {name: value for name, value in settings.items() if value is not None}


def option_settings(settings: Mapping[str, Any], geometry: VideoGeometry) -> GenerationSettings:
    """Defaults, then the options given; a bad option is blamed on the option (`--bank-size: ...`)."""
    given = given_settings(settings)
    try:
        return GenerationSettings(geometry=geometry).with_overrides(given)
    except SettingsError as error:
        blamed = next((name for name in (error.field, *error.related) if name in given), error.field)
        option = f"--{blamed.replace('_', '-')}"
        raise PlanError(f"{option}: {error.message}", f"see `{option}` in the command's --help") from None


def story_settings(story: Story, settings: Mapping[str, Any], geometry: VideoGeometry) -> GenerationSettings:
    """Defaults, then the script's `settings:`, then the options given."""
    try:
        return (
            GenerationSettings(geometry=geometry)
            .with_overrides(story.settings)
            .with_overrides(given_settings(settings))
        )
    except SettingsError as error:
        raise PlanError(
            f"{story.path}: settings.{error}", "fix the script's settings or the command-line option"
        ) from None


def geometry_for(model: ModelSource) -> VideoGeometry:
    """The video size of a model (imports torch for the demo model, whose module builds it)."""
    if model.is_demo:
        from .demo import DEMO_GEOMETRY

        return DEMO_GEOMETRY
    return VideoGeometry()


def checked_device(device: str | None, option: str = "--device") -> str:
    """The device to use (imports torch); a name torch does not know, or CUDA where there is none, is bad input."""
    if device is not None and (problem := device_problem(device, option)):
        raise PlanError(*problem)  # before torch is imported
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PlanError(f"{option} {device}: not a device name", "use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if torch.version.cuda is None:
            raise PlanError(f"{option} {device}: this torch {torch.__version__} is a CPU build",
                            "use --device cpu, or install a CUDA build of torch")  # fmt: skip
        if not torch.cuda.is_available():
            raise PlanError(f"{option} {device}: no CUDA GPU is visible", "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PlanError(f"{option} {device}: only {torch.cuda.device_count()} CUDA GPU(s) here",
                            "use cuda:0 or another index below the count")  # fmt: skip
    return device


def check_fp8(device: str) -> None:
    """`--fp8` where FP8 layers cannot run on `device` is bad input, found before any weights load."""
    import torch

    from .engine import model_dtype
    from .speed.fp8 import fp8_unsupported_reason

    dev = torch.device(device)
    reason = fp8_unsupported_reason(dev, model_dtype(dev))
    if reason is not None:
        raise PlanError(f"--fp8 {reason}", "leave out --fp8 to run the linear layers in bf16")


# ---------------------------------------------------------------------------------------------------------------------
# Outputs: refused before anything heavy is imported


def printable_path(path: Path, option: str) -> None:
    """Refuse a path with a control character (a newline would print one path as two lines)."""
    text = str(path)
    if lone_surrogate(text) is not None:  # bytes that are not UTF-8: no sidecar or replay script can record it
        raise PlanError(f"{option} {ascii(text)}: the path is not UTF-8 text", "give a path of UTF-8 characters")
    if text_problem(text):
        raise PlanError(
            f"{option} {ascii(text)}: the path has a control character (such as a newline) in it",
            "give a path without control characters",
        )


def check_outputs(request: RenderRequest, stories: int | None = None) -> None:
    """-o or --out-dir, exactly one, and a place a video can be written: checked before any script is read."""
    if (request.output is None) == (request.out_dir is None):
        raise PlanError("give exactly one of -o/--output FILE.mp4 or --out-dir DIR")
    if request.out_dir is not None:
        check_out_dir(request.out_dir)
        return
    output = request.output
    assert output is not None
    printable_path(output, "-o")
    if stories is not None and stories != 1:
        raise PlanError(f"-o names one file but the scripts hold {stories} stories", "use --out-dir DIR")
    if output.suffix.lower() != ".mp4":
        raise PlanError(f"{output}: the output must be an .mp4 file", "name the video like story.mp4")
    if output.is_dir():
        raise PlanError(f"cannot write {output}: it is a folder", "name an .mp4 file")
    if output.exists() and not output.is_file():
        raise PlanError(f"cannot write {output}: it is not a regular file", "name an .mp4 file in a folder")
    try:
        check_reservable(output)
    except OutputError as error:
        raise PlanError(str(error), error.hint) from None


def check_out_dir(folder: Path) -> None:
    """`--out-dir`: a printable path that is a folder, or nothing yet (it is created)."""
    printable_path(folder, "--out-dir")
    if folder.exists() and not folder.is_dir():
        raise PlanError(f"--out-dir {folder}: it is a file, not a folder", "give a folder for the videos")


def checked_output_name(target: Path) -> Path:
    """`target` if the names of its files fit and are not memflow's own (before its folder is created)."""
    try:
        check_output_name(target)
    except OutputError as error:
        raise PlanError(str(error), error.hint) from None
    return target


@contextmanager
def out_dir_made(folder: Path) -> Iterator[Path]:
    """`--out-dir` created (and its parents) for the block; those it created are removed again when the block
    leaves them empty (a run that wrote nothing, such as one whose weights are missing, leaves no folder)."""
    missing = [path for path in (folder, *folder.parents) if not path.exists()]
    make_out_dir(folder)
    try:
        yield folder
    finally:
        for path in missing:  # the deepest first
            with suppress(OSError):  # not empty, or gone: left as it is
                path.rmdir()


def make_out_dir(folder: Path) -> None:
    """Create `--out-dir` (and its parents) if missing."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise PlanError(f"--out-dir {folder}: it is a file, not a folder", "give a folder for the videos") from None
    except OSError as error:
        raise PlanError(
            f"--out-dir {folder}: cannot create it: {error.strerror or error}", "give a folder you can write to"
        ) from None


def safe_filename(title: str) -> str:
    """A story title as a file name: path separators and control characters become '_'."""
    cleaned = "".join("_" if c in '/\\:*?"<>|' or ord(c) < 32 or ord(c) == 127 else c for c in title).strip(" .")
    return cleaned or "untitled"


def output_name(story: Story) -> str:
    return f"{safe_filename(story.title)}.mp4"


def story_name(story: Story) -> str:
    """A story as messages name it: its title and where it was written."""
    return f"{story.title!r} ({story.path}{f':{story.line}' if story.line else ''})"


def story_outputs(stories: list[Story], out_dir: Path) -> list[Path]:
    """`DIR/<title>.mp4` for every story; two stories that would write one file are an error naming both."""
    paths = [out_dir / output_name(story) for story in stories]
    first_writer: dict[tuple[str, str], Story] = {}
    for story, path in zip(stories, paths, strict=True):
        checked_output_name(path)
        if (other := first_writer.setdefault(output_key(path), story)) is not story:
            if (other.path.resolve(), other.line) == (story.path.resolve(), story.line):
                where = f"{story.path}{f' line {story.line}' if story.line else ''}"
                raise PlanError(f"{where} is given twice; its story would be rendered twice to {path}",
                                "name each script once")  # fmt: skip
            raise PlanError(
                f"two stories would both write {path}: {story_name(other)} and {story_name(story)}",
                "give one of them another title",
            )
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Scripts -> jobs


def load_stories(
    scripts: tuple[Path, ...], segment_seconds: float, geometry: VideoGeometry, *, keep_going: bool = False
) -> tuple[list[Story], list[str]]:
    """Every story of the scripts; a bad script raises PlanError, or with `keep_going` is one message in the list."""
    stories: list[Story] = []
    problems: list[str] = []
    for path in scripts:
        try:
            stories.extend(load_scripts(path, segment_seconds, geometry))
        except ScriptError as error:
            if not keep_going:
                raise PlanError(str(error)) from None
            problems.append(str(error))
    return stories, problems


def plan_jobs(
    request: RenderRequest, geometry: VideoGeometry, *, keep_going: bool = False
) -> tuple[list[Job], list[str]]:
    """The jobs of a request, in script order, with one message per bad script or story when `keep_going`.

    Without `keep_going` the first problem raises PlanError. The options and outputs are checked first.
    """
    option_settings(request.options.settings(), geometry)
    check_outputs(request)
    stories, problems = load_stories(request.scripts, request.segment_seconds, geometry, keep_going=keep_going)
    settled: list[tuple[Story, GenerationSettings]] = []
    for story in stories:
        try:
            settled.append((story, story_settings(story, request.options.settings(), geometry)))
        except PlanError as error:
            if not keep_going:
                raise
            problems.append(error.message)
    if not settled:
        return [], problems
    if request.output is not None:
        check_outputs(request, stories=len(settled))
        targets = [request.output]
    else:
        assert request.out_dir is not None
        targets = story_outputs([story for story, _ in settled], request.out_dir)
    jobs = [
        Job(story, target, settings, request.seed_for(story), story.timeline(geometry, request.duration_s).chunks)
        for (story, settings), target in zip(settled, targets, strict=True)
    ]
    return jobs, problems


def text_token_limit(model: ModelSource) -> int:
    """Tokens of a prompt the model's text encoder reads (the rest is dropped): 512, or 256 for the demo."""
    if model.is_demo:
        from .demo import DEMO_TEXT_LEN

        return DEMO_TEXT_LEN
    return RELEASE_TEXT_TOKENS


def text_tokens(model: ModelSource) -> tuple[int, TokenCounter | None]:
    """The tokens the model's text encoder reads, and its tokenizer as a counter (None where it cannot be read
    without loading the model: the counts are then estimates). Neither torch nor transformers is imported."""
    limit = text_token_limit(model)
    if model.is_demo:
        from .demo import demo_token_counter

        return limit, demo_token_counter()
    if model.is_random:
        return limit, None
    from .weights import WeightsError, resolve_model

    try:
        return limit, load_token_counter(resolve_model(model.folder).tokenizer_dir)
    except WeightsError:  # the model's load says what is missing
        return limit, None


def cut_prompts(
    story: Story,
    geometry: VideoGeometry,
    limit: int,
    count: TokenCounter | None = None,
    duration_s: float | None = None,
) -> list[PromptCut]:
    """The segments of the story (as far as `duration_s` renders) whose prompts the text encoder reads only in part.

    `count` is the model's tokenizer (exact); without it the counts are estimates that err high.
    """
    return prompt_cuts(story.timeline(geometry, duration_s), limit, count)


# ---------------------------------------------------------------------------------------------------------------------
# What is on disk


def finished_difference(job: Job, request: RenderRequest, geometry: VideoGeometry) -> str | None:
    """None if the job's video is a finished render of this request (its sidecar says so), else how it differs."""
    target = job.target
    if not target.is_file():
        return "no video yet"
    recorded = memflow_sidecar(sidecar_path(target))
    if recorded is None:
        return f"no memflow metadata {sidecar_path(target).name} beside it"
    timeline = job.story.timeline(geometry, request.duration_s)
    asked = json.loads(json.dumps(request_record(job.story, timeline, job.settings, job.seed)))
    recorded_timeline = recorded.get("timeline")
    if not isinstance(recorded_timeline, dict) or not isinstance(recorded.get("title"), str):
        return f"its metadata {sidecar_path(target).name} is not that of a finished render"  # edited, or another kind
    if recorded["title"] != asked["title"]:
        return f"it holds {recorded['title']!r} from {recorded.get('script')}"
    was, now = recorded_timeline.get("duration_s"), asked["timeline"]["duration_s"]
    if was != now:
        return f"it is {was:.2f} s long, {now:.2f} s were asked" if isinstance(was, float) else "another length"
    if recorded_timeline != asked["timeline"]:
        return "its segments differ from the script's"
    if recorded.get("seed") != asked["seed"]:
        return f"it was rendered with seed {recorded.get('seed')!r}, not {job.seed}"
    if recorded.get("settings") != asked["settings"]:
        return "it was rendered with other settings"
    fp8 = request.options.fp8
    if recorded.get("fp8", False) is not fp8:
        return f"it was rendered {'without' if fp8 else 'with'} --fp8" if isinstance(recorded.get("fp8"), bool) \
            else "it was rendered with other settings"
    if recorded.get("decoder", "wan") != request.options.decoder.choice.value:
        decoder = recorded.get("decoder")
        return f"it was decoded with --decoder {decoder}" if isinstance(decoder, str) else "another decoder"
    return None


def claim(job: Job, request: RenderRequest, geometry: VideoGeometry, held: ExitStack) -> Claim:
    """Decide what to do with the job's output, and reserve it (lock held until `held` closes) to render.

    SKIP: a finished render of this request is there and `skip_existing` was asked. IN_PROGRESS: another live
    memflow process holds the output's lock (a PlanError instead for `-o`, where the one story cannot be done).
    RENDER: the lock is ours; with `skip_existing`, the partial video of a render that died is removed (the
    story continues from that render's last snapshot where it kept them with `--snapshots`, else starts again
    from the beginning), with `overwrite` any partial. What would be replaced without being
    asked raises PlanError.
    """
    if request.skip_existing and finished_difference(job, request, geometry) is None:
        return Claim.SKIP
    lock = OutputLock(job.target)
    try:
        check_reservable(job.target)
        lock.acquire()
    except OutputBusyError as error:
        if request.output is not None:
            raise PlanError(str(error), error.hint) from None
        return Claim.IN_PROGRESS
    except OutputError as error:
        raise PlanError(str(error), error.hint) from None
    try:
        if request.skip_existing and finished_difference(job, request, geometry) is None:  # finished meanwhile
            lock.release()
            return Claim.SKIP
        check_existing(job.target, overwrite=request.overwrite or request.update, resume=request.skip_existing)
    except OutputExistsError as error:
        lock.release()
        difference = finished_difference(job, request, geometry) if error.path == job.target else None
        why = f" ({difference})" if difference else ""
        raise PlanError(f"{error}{why}", error.hint) from None
    except BaseException:
        lock.release()
        raise
    partial_path(job.target).unlink(missing_ok=True)
    held.callback(lock.release)
    return Claim.RENDER


# ---------------------------------------------------------------------------------------------------------------------
# The engine: one way for every command to load it


def open_engine(
    options: GenerationOptions, device: str, *, decode_device: str | None = None,
    videos: list[tuple[int, GenerationSettings]] | None = None, prompts: tuple[str, ...] | list[str] = (),
    embed_cache: bool = True, full_text_encoder: bool = False,
) -> Engine:  # fmt: skip
    """The engine the options ask for, on `device` (close it, or use it in `with`), `prompts` ready; a weights
    problem is a PlanError with exit code 1. Every command loads its engine here.

    Whether it compiles: as `options.compile` says, or where `videos` (each its chunks and settings) win the
    compile back together (none: an open-ended video such as `memflow live`'s compiles only when asked).
    `embed_cache`: False reads and writes no prompt-embedding cache (bench times every encoding);
    `full_text_encoder`: the random model encodes with a full-size random umT5-XXL (`bench --text-encoder`)."""
    import torch

    from .engine import load_engine
    from .loading import WeightsError
    from .speed.compile_cache import CompileChoice, choose_for_videos

    if videos is None and options.compile is CompileMode.AUTO and torch.device(device).type == "cuda":
        choice = CompileChoice.uncompiled("an open-ended video compiles only when asked")
    else:
        choice = choose_for_videos(options.compile, torch.device(device), options.model.architecture, options.fp8,
                                   videos or [])  # fmt: skip
    try:
        return load_engine(options.model, device, options.lora, compile=choice, fp8=options.fp8,
                           decode_device=decode_device, full_text_encoder=full_text_encoder, prompts=prompts,
                           embed_cache=embed_cache, decoder=options.decoder)  # fmt: skip
    except WeightsError as error:
        raise PlanError(str(error), download_hint(str(error)), EXIT_FAILED) from None


# -- the decoder ---------------------------------------------------------------------------------------------


def decoder_request(model: ModelSource | str | None, name: str | None, weights: Path | None,
                    default: DecoderChoice = DecoderChoice.WAN) -> DecoderRequest:  # fmt: skip
    """`--decoder` and `--decoder-weights` for `--model`, checked before the model loads: a bad option, or a
    TAEHV file that is missing, cut or of another layout, is a PlanError (one line, exit 2). Every command reads
    them alike: `--decoder-weights` given alone means `--decoder tae`; beside `--decoder wan` it is refused."""
    source = ModelSource.parse(model)

    if name is None:
        choice = DecoderChoice.TAE if weights is not None else default
    else:
        try:
            choice = DecoderChoice(name.strip().lower())
        except ValueError:
            raise PlanError(f"--decoder {name}: not a decoder", "choose --decoder wan or --decoder tae") from None
    if weights is not None and choice is not DecoderChoice.TAE:
        raise PlanError(f"--decoder-weights is the TAEHV decoder's file, not used with --decoder {choice.value}",
                        "use --decoder tae, or leave out --decoder-weights")  # fmt: skip
    request = DecoderRequest(choice, weights)
    if request.is_tae and source.built_in:
        if weights is not None:
            raise PlanError(f"--decoder-weights: the {source.label} model decodes with random TAEHV weights of its own",
                            "leave out --decoder-weights")  # fmt: skip
        return request
    if request.is_tae:
        check_tae_file(request, source.folder)
    return request


def check_tae_file(request: DecoderRequest, model: str | None) -> Path:
    """The TAEHV file the engine will load for `model`, read and checked now (it is small)."""
    from .loading import WeightsError
    from .tae.files import tae_weights
    from .tae.weights import TAE_DOWNLOAD_COMMAND, checked_decoder_state, read_state

    try:
        path = tae_weights(request.weights, Path(model).expanduser() if model is not None else None)
        checked_decoder_state(read_state(path), path)
    except WeightsError as error:
        hint = None if TAE_DOWNLOAD_COMMAND in str(error) else f"the released file: {TAE_DOWNLOAD_COMMAND}"
        raise PlanError(str(error), hint) from None
    return path
