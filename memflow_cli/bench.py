"""`memflow bench`: speed and memory of the engine's pipeline, stopped at latents, at frames and at the MP4.

Every phase times `Engine.stream`, the pipeline `render` runs; this module only adds timing and the
report. Timed regions are bracketed by device synchronisation; per-chunk latency comes from CUDA events
recorded as chunks arrive (no host sync inside the loop). FPS always counts decoded video frames
(4 * latent - 3), never latent frames.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .cache_dir import CACHE_DIR_ENV
from .decode import StreamingDecoder
from .decoders import WAN_DECODER, DecoderRequest
from .engine import Engine, Video
from .mp4 import Mp4Writer
from .output import read_sidecar, sidecar_path
from .plan import open_engine
from .request import CompileMode, GenerationOptions, ModelSource
from .settings import GenerationSettings, VideoGeometry
from .speed.compile_cache import INDUCTOR_ENV, TRITON_ENV

if TYPE_CHECKING:
    from .tae import StreamingTaeDecoder

__all__ = ["BenchError", "BenchOptions", "run"]

COMPARE_MODES: dict[str, dict[str, Any]] = {  # memory mode and SMA of each compared variant
    "none": {"mode": "none", "sma": False},
    "sink": {"mode": "sink", "sma": False},
    "nam": {"mode": "nam", "sma": False},
    "nam+sma": {"mode": "nam", "sma": True},
}


class Phase(Enum):
    """How far the timed stream goes."""

    GENERATE = "generate only"
    DECODE = "generate + decode"
    MP4 = "generate + decode + MP4"


class BenchError(ValueError):
    """Options that cannot be measured as given (one line for the user)."""


@dataclass(frozen=True)
class BenchOptions:
    model: ModelSource
    device: torch.device
    settings: GenerationSettings  # as `render` takes them; the geometry is the model's
    latent_frames: int = 120
    switches: int = 0
    # ALWAYS: the compiled fast path; NEVER: the eager model, no CUDA graphs, plain decoder steps. AUTO: what
    # `memflow render` chooses for this video by default (eager on CUDA unless compiling pays), for the steady
    # state and the time-to-video renders
    compile: CompileMode = CompileMode.AUTO
    fp8: bool = False  # the blocks' linear layers in FP8 (check `speed.fp8.fp8_unsupported_reason` first)
    compare: bool = False
    seed: int = 0
    decode_device: torch.device | None = None  # decode on another device than generation
    full_text_encoder: bool = False  # the random model encodes prompts with a full-size random umT5-XXL
    memory_limit_gib: float | None = None  # cap the CUDA allocator here (does the run fit a smaller card?)
    time_to_video: bool = False  # also time whole `memflow render` processes, cold and warm (`time_to_video`)
    decoder: DecoderRequest = WAN_DECODER  # --decoder: the Wan VAE or the TAEHV preview decoder

    def __post_init__(self) -> None:
        if self.switches > self.chunks - 1:
            raise BenchError(
                f"--switches {self.switches}: {self.latent_frames} latent frames make {self.chunks} chunks, which "
                f"allow at most {self.chunks - 1} switches (one per chunk after the first); give fewer switches "
                "or more --frames"
            )

    @property
    def chunks(self) -> int:
        """Chunks of the measured video: `latent_frames` rounded down to whole chunks (one at least)."""
        return max(1, self.latent_frames // self.settings.geometry.frames_per_chunk)

    def render_options(self) -> GenerationOptions:
        """The options of `memflow render` that make the bench's video: its model, devices and settings."""
        decode_device = None if self.decode_device is None else str(self.decode_device)
        options = GenerationOptions(model=self.model, device=str(self.device), decode_device=decode_device,
                                    compile=self.compile, fp8=self.fp8, decoder=self.decoder)  # fmt: skip
        return options.with_settings(self.settings)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompts(count: int, seed: int, story: int = 0) -> list[str]:
    return [f"memflow bench, story {story + 1}, prompt {i + 1} (seed {seed})" for i in range(count)]


def switch_chunks(chunks: int, switches: int) -> tuple[int, ...]:
    """The chunks where `switches` evenly spaced switches happen: distinct, increasing, in 1..chunks-1."""
    if not 0 <= switches < chunks:
        raise BenchError(f"{chunks} chunks allow 0 to {chunks - 1} switches, not {switches}")
    return tuple(round(chunks * (i + 1) / (switches + 1)) for i in range(switches))


def _bench_video(engine: Engine, chunks: int, switches: int, seed: int) -> Video:
    """A video of `chunks` chunks whose `switches` switches are evenly spaced; its prompts encoded as render does."""
    prompts = _prompts(switches + 1, seed)
    return Video(engine.embeddings(prompts), chunks, switch_chunks(chunks, switches))


@dataclass
class Peaks:
    """Peak GPU memory of a timed region: allocated by tensors, and reserved by the allocator from the card."""

    allocated_gib: float | None  # None where the device has no allocator statistics
    reserved_gib: float | None


@contextlib.contextmanager
def _peaks(device: torch.device) -> Iterator[Peaks]:
    """Measures the peaks of the `with` block into the yielded `Peaks` (filled when the block ends)."""
    peaks = Peaks(None, None)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    yield peaks
    if cuda:
        peaks.allocated_gib = torch.cuda.max_memory_allocated(device) / 2**30
        peaks.reserved_gib = torch.cuda.max_memory_reserved(device) / 2**30


@dataclass
class RunTimes:
    total_s: float
    first_frame_s: float
    chunk_ms: list[float]
    peaks: Peaks


def _writer(engine: Engine, phase: Phase, folder: Path) -> contextlib.AbstractContextManager[Mp4Writer | None]:
    if phase is not Phase.MP4:
        return contextlib.nullcontext()
    return engine.mp4_writer(folder / f"bench-{time.monotonic_ns()}.mp4")


def _timed_run(
    engine: Engine, settings: GenerationSettings, chunks: int, switches: int, seed: int, phase: Phase, folder: Path
) -> RunTimes:
    """Stream `chunks` chunks as far as `phase` says, timed."""
    device = engine.device
    video = _bench_video(engine, chunks, switches, seed)
    cuda = device.type == "cuda"
    events = [torch.cuda.Event(enable_timing=True) for _ in range(chunks + 1)] if cuda else []
    stamps: list[float] = []
    _sync(device)
    start = time.perf_counter()
    first_frame_s = 0.0
    with _peaks(device) as peaks, _writer(engine, phase, folder) as writer:
        if cuda:
            events[0].record()
        stamps.append(time.perf_counter())
        stream = engine.stream(video, settings, seed, decode=phase is not Phase.GENERATE, writer=writer)
        with contextlib.closing(stream):
            for chunk in stream:
                if cuda:
                    events[chunk.index + 1].record()
                else:
                    stamps.append(time.perf_counter())
                if not first_frame_s:
                    _sync(device)
                    first_frame_s = time.perf_counter() - start
        _sync(device)
        _sync(engine.decode_device or device)  # the decoder's, where it is another device
    total = time.perf_counter() - start
    if cuda:
        chunk_ms = [events[i].elapsed_time(events[i + 1]) for i in range(chunks)]
    else:
        chunk_ms = [1000 * (b - a) for a, b in zip(stamps, stamps[1:], strict=False)]
    return RunTimes(total, first_frame_s, chunk_ms, peaks)


def decode_ms_per_chunk(
    decoder: StreamingDecoder | StreamingTaeDecoder, geometry: VideoGeometry, repeats: int = 7, seed: int = 0,
    *, to_cpu: bool = False,
) -> float:  # fmt: skip
    """Milliseconds the decoder alone takes for a steady chunk (`frames_per_chunk` latent frames, not the first).

    The decoder runs as in a render (a video's first chunk, then later ones), on the geometry's frame size,
    on random latents; the first chunk and two later ones are the warm-up (cuDNN's plans, compiled steps,
    CUDA graph capture). Each of `repeats` later chunks is then timed between two device synchronisations,
    up to its float frames on the device (with `to_cpu`, up to the uint8 frames on the CPU that the writer
    takes); the median is returned.
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (1, geometry.frames_per_chunk, geometry.latent_channels, geometry.latent_height, geometry.latent_width)
    chunk = torch.randn(shape, generator=generator).to(decoder.device)  # [1, F, C, h, w]
    decode = decoder.decode if to_cpu else decoder.decode_float
    decoder.reset()
    for _ in range(3):
        decode(chunk)
    times_ms = []
    for _ in range(repeats):
        _sync(decoder.device)
        start = time.perf_counter()
        decode(chunk)
        _sync(decoder.device)
        times_ms.append(1000 * (time.perf_counter() - start))
    decoder.reset()
    return statistics.median(times_ms)


def _timed_encode(engine: Engine, prompts: list[str]) -> tuple[float, Peaks]:
    """Encode `prompts` as a render does (the text encoder comes to the device and leaves): seconds and peaks."""
    _sync(engine.device)
    start = time.perf_counter()
    with _peaks(engine.device) as peaks:
        engine.encode(prompts)
        _sync(engine.device)
    return time.perf_counter() - start, peaks


def _warm_chunks(settings: GenerationSettings, chunks: int) -> int:
    """Long enough that its switch comes once the window and the bank are full: every graph that a
    steady-state chunk or re-cache needs (SMA's key set for a full bank too) is compiled in the warm-up."""
    memory_settings, frames_per_chunk = settings.memory, settings.geometry.frames_per_chunk
    window_chunks = memory_settings.window // frames_per_chunk
    steady = max(window_chunks, memory_settings.bank_size * memory_settings.record_interval) + 1
    return min(chunks, 2 * steady)


def run(options: BenchOptions, status: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """All measurements; returns the result record (also the JSON line of the CLI).

    The time-to-video renders run first, in processes of their own, while this one holds no GPU memory.
    """
    device = options.device
    to_video = time_to_video(options, status) if options.time_to_video else None
    with _memory_limit(device, options.memory_limit_gib):
        status(f"loading {options.model.label} on {device}")
        engine_options = options.render_options()
        with open_engine(
            engine_options, str(device), decode_device=engine_options.decode_device,
            videos=[(options.chunks, options.settings)], full_text_encoder=options.full_text_encoder,
            embed_cache=False,  # every run encodes, so that encode_s and its memory peak measure the encoder
        ) as engine:  # fmt: skip
            result = _measure(engine, options, status)
    if to_video is not None:
        result["time_to_video_s"] = to_video
    return result


# -- time to video: whole render processes --------------------------------------------------------------------

# the phases a render's sidecar records (`timing.RenderTimings`), as the time-to-video record reports them
TIME_TO_VIDEO_PHASES = ("import_s", "load_s", "encode_s", "warmup_s", "first_frame_s", "render_s", "finish_s")


def time_to_video(options: BenchOptions, status: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """What a user waits for `memflow render` of a story of the bench's length: two whole processes.

    The first ("cold") starts with empty compile caches (a new folder), the second ("warm") with what the
    first left there. Each reports the process's wall time, from the command to its exit, and the phases
    its sidecar recorded. The renders choose compiling as `memflow render` does (`compile`: None), or
    follow `--compile` / `--no-compile`.
    """
    with tempfile.TemporaryDirectory(prefix="memflow-time-to-video-") as tmp:
        folder = Path(tmp)
        story = _write_bench_story(folder / "bench-story.yaml", options)
        env = {key: value for key, value in os.environ.items() if key not in (INDUCTOR_ENV, TRITON_ENV)}
        env |= {CACHE_DIR_ENV: str(folder / "cache"), "PYTHONUNBUFFERED": "1"}
        record: dict[str, Any] = {}
        for start in ("cold", "warm"):
            status(f"time to video: {start} render process")
            record[start] = _render_process(story, folder / f"{start}.mp4", options, env)
    return record


def _write_bench_story(path: Path, options: BenchOptions) -> Path:
    """A story of the bench's chunks and evenly spaced switches, on the chunk grid, as a YAML script."""
    chunk_s = options.settings.geometry.chunk_seconds
    starts = (0, *switch_chunks(options.chunks, options.switches))
    prompts = _prompts(options.switches + 1, options.seed)
    story = {
        "title": "memflow bench",
        "seed": options.seed,
        "duration": f"{options.chunks * chunk_s:.6g}s",
        "segments": [{"start": f"{s * chunk_s:.6g}s", "prompt": p} for s, p in zip(starts, prompts, strict=True)],
    }
    path.write_text(json.dumps(story, indent=1), encoding="utf-8")  # JSON is YAML
    return path


def render_command(story: Path, target: Path, options: BenchOptions) -> list[str]:
    """`memflow render` of `story` to `target` with the bench's model, devices and settings."""
    command = [sys.executable, "-m", "memflow_cli", "render", str(story), "-o", str(target), "--quiet"]
    return command + options.render_options().flags()


def _render_process(story: Path, target: Path, options: BenchOptions, env: dict[str, str]) -> dict[str, Any]:
    command = render_command(story, target, options)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    process_s = time.perf_counter() - started
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise RuntimeError(f"the time-to-video render failed: {last}")
    sidecar = read_sidecar(sidecar_path(target))
    timings = sidecar["timings"]
    return {
        "process_s": round(process_s, 3),
        **{phase: timings[phase] for phase in TIME_TO_VIDEO_PHASES},
        "time_to_first_frame_s": timings["time_to_first_frame_s"],
        "total_s": timings["total_s"],  # process start -> the video finished, as the render measured it
        "exit_s": round(max(0.0, process_s - timings["total_s"]), 3),  # the finished process winding down
        "compile": sidecar["compile"],
        "video_frames": sidecar["timeline"]["video_frames"],
    }


@contextlib.contextmanager
def _memory_limit(device: torch.device, gib: float | None) -> Iterator[None]:
    """Within the block the CUDA allocator of `device` takes at most `gib` GiB from the card (None: no cap)."""
    if gib is None:
        yield
        return
    if device.type != "cuda":
        raise ValueError(f"a memory limit needs a CUDA device, not {device}")
    index = torch.cuda.current_device() if device.index is None else device.index  # the fraction needs an index
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), index)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)


def _measure(engine: Engine, options: BenchOptions, status: Callable[[str], None]) -> dict[str, Any]:
    geometry = engine.geometry
    settings = replace(options.settings, geometry=geometry)
    chunks = options.chunks
    latent_frames = chunks * geometry.frames_per_chunk
    video_frames = geometry.video_frames(latent_frames)
    seed, switches = options.seed, options.switches
    warm_chunks = _warm_chunks(settings, chunks)

    with tempfile.TemporaryDirectory(prefix="memflow-bench-") as tmp:
        folder = Path(tmp)
        status("encoding prompts")
        encode_s, encode_peaks = _timed_encode(engine, _prompts(switches + 1, seed))
        status("warm-up (compile, autotune)")
        warm_start = time.perf_counter()
        _timed_run(engine, settings, warm_chunks, min(switches, 1), seed, Phase.MP4, folder)
        warmup_s = time.perf_counter() - warm_start
        times: dict[Phase, RunTimes] = {}
        for phase in Phase:
            status(phase.value)
            times[phase] = _timed_run(engine, settings, chunks, switches, seed, phase, folder)

        compare: dict[str, float] = {}
        if options.compare:
            for name, mode in COMPARE_MODES.items():
                status(f"compare: {name}")
                mode_settings = replace(settings, memory=replace(settings.memory, **mode))
                _timed_run(engine, mode_settings, warm_chunks, min(switches, 1), seed, Phase.GENERATE, folder)
                run_times = _timed_run(engine, mode_settings, chunks, switches, seed, Phase.GENERATE, folder)
                compare[name] = video_frames / run_times.total_s
        status("decoder alone")
        decoder, repeats = engine.streaming_decoder(), 10 if engine.device.type == "cuda" else 3
        decode_ms = {
            "decode_ms_per_chunk": decode_ms_per_chunk(decoder, geometry, repeats, seed),
            "decode_to_cpu_ms_per_chunk": decode_ms_per_chunk(decoder, geometry, repeats, seed, to_cpu=True),
        }
        # a later story of a batch: its prompts are encoded while the first one's CUDA graphs stay
        status("encoding the next story's prompts")
        _, later_encode_peaks = _timed_encode(engine, _prompts(switches + 1, seed, story=1))

    generate, decode, end_to_end = times[Phase.GENERATE], times[Phase.DECODE], times[Phase.MP4]
    # A run that did more work bounds the one that did less: decoding alone took at most as long as the run
    # that decoded and wrote (one run each is noisy where the CPU is shared, and that order was seen reversed).
    decode_s = min(decode.total_s, end_to_end.total_s)
    generate_s = min(generate.total_s, decode_s)
    steady = sorted(generate.chunk_ms[len(generate.chunk_ms) // 2 :])
    device = engine.device
    memory_settings = settings.memory
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **({"decode_device": str(options.decode_device)} if options.decode_device is not None else {}),
        "model": engine.name,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "attention": engine.fast.attention_name,
        "compile": engine.fast.compile,
        "fast_path": engine.fast.name,  # eager, graphed, compiled, triton-graphed or triton (`FastPath.name`)
        "fp8": engine.fp8,
        "memory": memory_settings.mode,
        "sma": memory_settings.sma,
        "window": memory_settings.window,
        "sink": memory_settings.sink,
        "bank_size": memory_settings.bank_size,
        "record_interval": memory_settings.record_interval,
        "steps": list(settings.sampler.steps),
        "switches": switches,
        "resolution": f"{geometry.width}x{geometry.height}",
        "latent_frames": latent_frames,
        "video_frames": video_frames,
        "warmup_s": round(warmup_s, 3),
        "time_to_first_frame_s": round(end_to_end.first_frame_s, 4),
        "chunk_latency_ms": round(steady[len(steady) // 2], 2) if steady else None,
        "fps_generate": round(video_frames / generate_s, 2),
        "fps_decode": round(video_frames / decode_s, 2),
        "fps_end_to_end": round(video_frames / end_to_end.total_s, 2),
        "decoder": engine.decoder.value,
        **{key: round(value, 3) for key, value in decode_ms.items()},
        "peak_memory_gib": _gib(end_to_end.peaks.allocated_gib),
        "peak_memory_generate_gib": _gib(generate.peaks.allocated_gib),
        "text_encoder": engine.prompts.describe(),  # names it without loading it
        "encode_s": round(encode_s, 3),
        "peak_memory_encode_gib": _gib(_most(encode_peaks.allocated_gib, later_encode_peaks.allocated_gib)),
        "peak_reserved_gib": _gib(
            _most(*(peaks.reserved_gib for peaks in (encode_peaks, later_encode_peaks, end_to_end.peaks)))
        ),
        **({"memory_limit_gib": options.memory_limit_gib} if options.memory_limit_gib is not None else {}),
        "torch": torch.__version__,
    }
    if compare:
        result["compare_fps"] = {k: round(v, 2) for k, v in compare.items()}
        result["compare_ratio_vs_none"] = {k: round(v / compare["none"], 3) for k, v in compare.items()}
    return result


def _most(*values: float | None) -> float | None:
    known = [value for value in values if value is not None]
    return max(known) if known else None


def _gib(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
