"""`memflow bench`: speed and memory of the generator, the decoder and the MP4 writer, measured apart.

Timed regions are bracketed by device synchronisation; per-chunk latency comes
from CUDA events recorded in the loop (no host sync inside it). FPS always
counts decoded video frames (4 * latent - 3), never latent frames.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .decode import StreamingDecoder
from .fast import accelerate, accelerate_vae, attention_backend_name, attention_kernels, decoder_kernels_for, passes_for
from .fp8 import use_fp8_linears
from .generator import MemFlowGenerator, SeededNoise
from .model.transformer import CausalWanTransformer
from .output import Mp4Writer
from .overlap import overlapped
from .settings import WAN_1_3B, GenerationSettings, MemorySettings, VideoGeometry

RANDOM = "random"
COMPARE_MODES: dict[str, MemorySettings] = {
    "none": MemorySettings(mode="none"),
    "sink": MemorySettings(mode="sink"),
    "nam": MemorySettings(mode="nam"),
    "nam+sma": MemorySettings(mode="nam", sma=True),
}


@dataclass(frozen=True)
class BenchOptions:
    model: str | None  # "demo", "random" (full-size random weights) or a weights folder / None (HF cache)
    device: torch.device
    latent_frames: int = 120
    switches: int = 0
    memory: MemorySettings = field(default_factory=MemorySettings)
    compile: bool = True
    fp8: bool = False  # the blocks' linear layers in FP8 (check `fp8.fp8_unsupported_reason` first)
    compare: bool = False
    seed: int = 0


@dataclass
class Bench:
    """What the measurements run on: a transformer, a VAE, settings and prompt embeddings."""

    transformer: CausalWanTransformer
    vae: Any
    geometry: VideoGeometry
    model_name: str
    device: torch.device
    compiled: bool = False  # the fast path is on (CUDA only): compiled kernels and CUDA graphs

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_bench(device: torch.device) -> Bench:
    """The full-size 1.3B transformer and Wan2.1 VAE with random weights (speed does not depend on values)."""
    from diffusers import AutoencoderKLWan

    from .weights import WAN21_VAE_CONFIG

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        transformer = CausalWanTransformer(WAN_1_3B)
    transformer = transformer.to_empty(device=device).to(dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    for param in transformer.parameters():
        param.data.normal_(0.0, 0.02, generator=generator)
    vae = AutoencoderKLWan(**WAN21_VAE_CONFIG).to(device=device, dtype=dtype)
    return Bench(transformer.eval().requires_grad_(False), vae.eval(), VideoGeometry(), "random-weights 1.3B", device)


def load_bench(model: str | None, device: torch.device) -> Bench:
    if model == RANDOM:
        return random_bench(device)
    from .render import load_engine

    engine = load_engine(model, str(device))
    name = "demo" if model == "demo" else f"weights {model or 'HF cache'}"
    return Bench(engine.transformer, engine.vae, engine.geometry, name, device)


def _embeds(bench: Bench, prompts: int, seed: int) -> torch.Tensor:
    config = bench.transformer.config
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn((prompts, config.text_len, config.text_dim), generator=generator) * 0.1
    embeds[:, config.text_len // 4 :] = 0  # padding rows, as the text encoder leaves them
    return embeds


def _switch_chunks(chunks: int, switches: int) -> tuple[int, ...]:
    return tuple(round(chunks * (i + 1) / (switches + 1)) for i in range(switches))


@dataclass
class RunTimes:
    total_s: float
    first_frame_s: float
    chunk_ms: list[float]
    peak_gib: float | None  # None where the device has no allocator statistics


def _timed_run(
    bench: Bench, settings: GenerationSettings, chunks: int, switches: int, seed: int,
    sink: Callable[[Iterator[torch.Tensor]], Iterator[None]],
) -> RunTimes:  # fmt: skip
    """Run the generator for `chunks` chunks through `sink` (which decodes/writes or not), timed."""
    device = bench.device
    generator = MemFlowGenerator(bench.transformer, settings, passes=passes_for(bench.compiled))
    noise = SeededNoise(seed, generator.noise_shape(), device, bench.dtype)
    embeds = _embeds(bench, switches + 1, seed)
    cuda = device.type == "cuda"
    events = [torch.cuda.Event(enable_timing=True) for _ in range(chunks + 1)] if cuda else []
    stamps: list[float] = []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    first_frame_s = 0.0

    def chunk_stream() -> Iterator[torch.Tensor]:
        if cuda:
            events[0].record()
        stamps.append(time.perf_counter())
        for i, latents in enumerate(generator.generate(embeds, chunks, noise, _switch_chunks(chunks, switches))):
            if cuda:
                events[i + 1].record()
            else:
                stamps.append(time.perf_counter())
            yield latents

    with torch.no_grad(), attention_kernels(device):
        for done in sink(chunk_stream()):
            del done
            if not first_frame_s:
                _sync(device)
                first_frame_s = time.perf_counter() - start
    _sync(device)
    total = time.perf_counter() - start
    if cuda:
        chunk_ms = [events[i].elapsed_time(events[i + 1]) for i in range(chunks)]
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        chunk_ms = [1000 * (b - a) for a, b in zip(stamps, stamps[1:], strict=False)]
        peak = None
    return RunTimes(total, first_frame_s, chunk_ms, peak)


def _generate_only(chunks: Iterator[torch.Tensor]) -> Iterator[None]:
    for _ in chunks:
        yield None


def _decoding(bench: Bench) -> Callable[[Iterator[torch.Tensor]], Iterator[None]]:
    def sink(chunks: Iterator[torch.Tensor]) -> Iterator[None]:
        decoder = StreamingDecoder(bench.vae, kernels=decoder_kernels_for(bench.compiled))
        for _ in overlapped(chunks, decoder.decode, bench.device):
            yield None

    return sink


def _writing(bench: Bench, folder: Path) -> Callable[[Iterator[torch.Tensor]], Iterator[None]]:
    def sink(chunks: Iterator[torch.Tensor]) -> Iterator[None]:
        geometry = bench.geometry
        target = folder / f"bench-{time.monotonic_ns()}.mp4"
        decoder = StreamingDecoder(bench.vae, kernels=decoder_kernels_for(bench.compiled))
        writer = Mp4Writer(
            target, geometry.width, geometry.height, geometry.fps, keyframe_interval=geometry.video_frames_per_chunk
        )
        try:
            for frames in overlapped(chunks, decoder.decode, bench.device):
                writer.write(frames)
                yield None
            writer.close()
        except BaseException:
            writer.abort()
            raise

    return sink


def run(options: BenchOptions, status: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """All measurements; returns the result record (also the JSON line of the CLI)."""
    device = options.device
    status(f"loading {options.model or 'weights'} on {device}")
    bench = load_bench(options.model, device)
    geometry = bench.geometry
    chunks = max(1, options.latent_frames // geometry.frames_per_chunk)
    latent_frames = chunks * geometry.frames_per_chunk
    video_frames = geometry.video_frames(latent_frames)
    settings = GenerationSettings(memory=options.memory, geometry=geometry)
    compile = options.compile and device.type == "cuda"
    accelerate(bench.transformer, compile=compile)
    accelerate_vae(bench.vae)
    bench.compiled = compile
    if options.fp8:
        use_fp8_linears(bench.transformer)
    seed = options.seed

    with tempfile.TemporaryDirectory(prefix="memflow-bench-") as tmp:
        folder = Path(tmp)
        status("warm-up (compile, autotune)")
        # long enough that its switch comes once the window and the bank are full: every graph that a
        # steady-state chunk or re-cache needs (SMA's key set for a full bank too) is compiled here
        memory = options.memory
        steady = max(memory.window // geometry.frames_per_chunk, memory.bank_size * memory.record_interval) + 1
        warm_chunks = min(chunks, 2 * steady)
        warm_start = time.perf_counter()
        _timed_run(bench, settings, warm_chunks, min(options.switches, 1), seed, _writing(bench, folder))
        warmup_s = time.perf_counter() - warm_start

        status("generate only")
        generate = _timed_run(bench, settings, chunks, options.switches, seed, _generate_only)
        status("generate + decode")
        decode = _timed_run(bench, settings, chunks, options.switches, seed, _decoding(bench))
        status("generate + decode + MP4")
        end_to_end = _timed_run(bench, settings, chunks, options.switches, seed, _writing(bench, folder))

        compare: dict[str, float] = {}
        if options.compare:
            for name, memory in COMPARE_MODES.items():
                status(f"compare: {name}")
                mode_settings = replace(settings, memory=memory)
                _timed_run(bench, mode_settings, warm_chunks, min(options.switches, 1), seed, _generate_only)
                times = _timed_run(bench, mode_settings, chunks, options.switches, seed, _generate_only)
                compare[name] = video_frames / times.total_s

    steady = sorted(generate.chunk_ms[len(generate.chunk_ms) // 2 :])
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": bench.model_name,
        "dtype": str(bench.dtype).removeprefix("torch."),
        "attention": attention_backend_name(bench.transformer),
        "compile": bench.compiled,
        "fp8": options.fp8,
        "memory": options.memory.mode,
        "sma": options.memory.sma,
        "switches": options.switches,
        "resolution": f"{geometry.width}x{geometry.height}",
        "latent_frames": latent_frames,
        "video_frames": video_frames,
        "warmup_s": round(warmup_s, 3),
        "time_to_first_frame_s": round(end_to_end.first_frame_s, 4),
        "chunk_latency_ms": round(steady[len(steady) // 2], 2) if steady else None,
        "fps_generate": round(video_frames / generate.total_s, 2),
        "fps_decode": round(video_frames / decode.total_s, 2),
        "fps_end_to_end": round(video_frames / end_to_end.total_s, 2),
        "peak_memory_gib": _gib(end_to_end.peak_gib),
        "peak_memory_generate_gib": _gib(generate.peak_gib),
        "torch": torch.__version__,
    }
    if compare:
        result["compare_fps"] = {k: round(v, 2) for k, v in compare.items()}
        result["compare_ratio_vs_none"] = {k: round(v / compare["none"], 3) for k, v in compare.items()}
    return result


def _gib(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
