"""Render stories: the engine (weights loaded once), prompt encoding, and the chunk -> frames -> MP4 loop.

Data flows one way: story -> settings -> generator (latent chunks) -> decoder (frames) -> writer.
Nothing here prints: progress goes to a callback, results come back as values.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan

from . import __version__
from .checkpoint import load_transformer
from .decode import StreamingDecoder
from .fast import accelerate, accelerate_vae, attention_kernels, decoder_kernels_for, passes_for
from .fp8 import use_fp8_linears
from .generator import MemFlowGenerator, SeededNoise
from .handover import handed_over
from .model.transformer import CausalWanTransformer
from .output import Mp4Writer, write_video_sidecar
from .overlap import overlapped
from .random_model import RANDOM, random_engine
from .script import Story, Timeline
from .settings import GenerationSettings, LoraSettings, VideoGeometry
from .text_encoder import TextEncoder

DEMO = "demo"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU (as released), float32 on CPU (where bf16 is slow and parity is checked)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class Engine:
    """Everything loaded once and shared by every story of a run."""

    transformer: CausalWanTransformer
    text_encoder: TextEncoder
    vae: AutoencoderKLWan
    geometry: VideoGeometry
    device: torch.device
    identity: dict[str, Any]
    notice: str | None = None  # shown to the user (the demo model's warning)
    compiled: bool = False  # the fast path is on: compiled kernels and CUDA graphs (set by `load_engine`)
    fp8: bool = False  # the blocks' linear layers run in FP8 (set by `load_engine`)
    decode_device: torch.device | None = None  # where the VAE decodes, when not on `device` (set by `load_engine`)
    _embeds: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def decodes_on_cuda(self) -> bool:
        return self.vae.device.type == "cuda"

    def encode(self, prompts: Sequence[str]) -> None:
        """Encode every prompt not seen yet, once, then move the text encoder off the GPU."""
        todo = sorted({p for p in prompts if p not in self._embeds})
        if not todo:
            return
        self.text_encoder.to(self.device)
        for prompt, embeds in zip(todo, self.text_encoder.encode(todo), strict=True):
            self._embeds[prompt] = embeds
        self.text_encoder.offload()

    def embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """[n, text_len, text_dim] for prompts already encoded."""
        return torch.stack([self._embeds[p] for p in prompts])


def load_engine(
    model: str | None,
    device: str | None = None,
    lora: LoraSettings | None = None,
    *,
    compile: bool | None = None,
    fp8: bool = False,
    decode_device: str | None = None,
) -> Engine:
    """Load the demo model, random weights ('random') or real weights (a folder, or the Hugging Face cache when
    `model` is None).

    On CUDA the transformer's blocks and the VAE decoder's steps between convs are compiled unless `compile` is False
    (the first chunk then pays the warm-up). With `fp8`, the blocks' linear layers run in FP8 (check first
    with `fp8.fp8_unsupported_reason`). `decode_device` puts the VAE on another device than the transformer.
    """
    dev = torch.device(device or default_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # streams, events and graph captures of the render use the current device
    engine = _engine_for(model, dev, lora)
    if decode_device is not None:
        engine.decode_device = torch.device(decode_device)
        engine.vae = engine.vae.to(engine.decode_device, model_dtype(engine.decode_device))
    compile = dev.type == "cuda" if compile is None else compile
    accelerate(engine.transformer, compile=compile)
    accelerate_vae(engine.vae)
    engine.compiled = compile and dev.type == "cuda"
    if fp8:
        use_fp8_linears(engine.transformer)
        engine.fp8 = True
    return engine


def _engine_for(model: str | None, dev: torch.device, lora: LoraSettings | None) -> Engine:
    if model == DEMO:
        return _demo_engine(dev, model_dtype(dev))
    if model == RANDOM:
        return random_engine(dev, model_dtype(dev))
    return _weights_engine(model, dev, lora)


def _weights_engine(model: str | None, dev: torch.device, lora: LoraSettings | None) -> Engine:
    dtype = model_dtype(dev)
    from . import weights

    files = weights.resolve_model(model)
    transformer = load_transformer(
        files.base, files.lora, weights.load_transformer_config(files), lora, device=dev, dtype=dtype
    )
    return Engine(
        transformer=transformer,
        text_encoder=weights.load_text_encoder(files, "cpu", dtype),
        vae=weights.load_vae(files.vae, dev, dtype),
        geometry=VideoGeometry(),
        device=dev,
        identity=weights.weights_identity(files),
    )


def _demo_engine(device: torch.device, dtype: torch.dtype) -> Engine:
    from . import demo

    torch.manual_seed(0)
    transformer = CausalWanTransformer(demo.DEMO_TRANSFORMER).to(device, dtype).eval().requires_grad_(False)
    return Engine(
        transformer=transformer,
        text_encoder=demo.build_demo_text_encoder(),
        vae=demo.build_demo_vae().to(device, dtype),
        geometry=demo.DEMO_GEOMETRY,
        device=device,
        identity={"model": DEMO, "note": demo.DEMO_NOTICE},
        notice=demo.DEMO_NOTICE,
    )


@dataclass(frozen=True)
class ChunkProgress:
    """Reported after every chunk is written."""

    chunk: int  # chunks done
    chunks: int
    segment: int
    segment_start_s: float
    prompt: str
    video_frames: int  # frames written so far
    elapsed_s: float


@dataclass(frozen=True)
class RenderResult:
    path: Path
    sidecar: Path
    timeline: Timeline
    seconds: float
    first_frame_s: float


class RenderInterrupted(Exception):
    """The render was stopped (Ctrl-C); `partial` is the playable file of the finished chunks, if any."""

    def __init__(self, partial: Path | None, frames: int):
        super().__init__(f"interrupted after {frames} frames")
        self.partial, self.frames = partial, frames


def render_story(
    engine: Engine,
    story: Story,
    target: Path,
    settings: GenerationSettings,
    *,
    seed: int,
    duration_s: float | None = None,
    overwrite: bool = False,
    progress: Callable[[ChunkProgress], None] | None = None,
) -> RenderResult:
    """Generate, decode and write one story to `target` (an MP4 that grows chunk by chunk)."""
    timeline = story.timeline(engine.geometry, duration_s)
    geometry = engine.geometry
    engine.encode(timeline.prompts)
    generator = MemFlowGenerator(engine.transformer, settings, passes=passes_for(engine.compiled))
    noise = SeededNoise(seed, generator.noise_shape(), engine.device, engine.dtype)
    decoder = StreamingDecoder(engine.vae, kernels=decoder_kernels_for(engine.compiled and engine.decodes_on_cuda))
    chunks = generator.generate(
        engine.embeddings(timeline.prompts), timeline.chunks, noise, timeline.switch_chunks
    )
    writer = Mp4Writer(  # last: nothing that can fail stands between it and the loop that aborts it
        target, geometry.width, geometry.height, geometry.fps,
        overwrite=overwrite, keyframe_interval=geometry.video_frames_per_chunk,
    )  # fmt: skip
    started = time.perf_counter()
    first_frame_s = 0.0
    try:
        with attention_kernels(engine.device):
            decoded = overlapped(handed_over(chunks, decoder.device), decoder.decode, decoder.device)
            for done, frames in enumerate(decoded, start=1):
                writer.write(frames)
                elapsed = time.perf_counter() - started
                first_frame_s = first_frame_s or elapsed
                if progress:
                    segment = timeline.segments[timeline.prompt_index_for_chunk(done - 1)]
                    progress(
                        ChunkProgress(
                            done, timeline.chunks, segment.index, segment.snapped_start_s, segment.prompt,
                            writer.frames_written, elapsed,
                        )
                    )  # fmt: skip
        path = writer.close()
    except KeyboardInterrupt:
        partial = writer.abort()
        raise RenderInterrupted(partial, writer.frames_written) from None
    except BaseException:
        writer.abort()
        raise
    seconds = time.perf_counter() - started
    sidecar = write_video_sidecar(path, _metadata(engine, story, timeline, settings, seed, seconds, first_frame_s))
    return RenderResult(path, sidecar, timeline, seconds, first_frame_s)


def request_record(story: Story, timeline: Timeline, settings: GenerationSettings, seed: int) -> dict[str, Any]:
    """What a render was asked for, as its sidecar records it: a finished video with the same record is done."""
    return {
        "title": story.title,
        "seed": seed,
        "timeline": {
            "chunks": timeline.chunks,
            "latent_frames": timeline.latent_frames,
            "video_frames": timeline.video_frames,
            "duration_s": timeline.duration_s,
            "segments": [
                {
                    "start_s": s.start_s,
                    "snapped_start_s": s.snapped_start_s,
                    "start_chunk": s.start_chunk,
                    "video_frames": s.video_frames,
                    "prompt": s.prompt,
                }
                for s in timeline.segments
            ],
        },
        "settings": settings.as_dict(),
    }


def _metadata(
    engine: Engine,
    story: Story,
    timeline: Timeline,
    settings: GenerationSettings,
    seed: int,
    seconds: float,
    first_frame_s: float,
) -> dict[str, Any]:
    return {
        "memflow_version": __version__,
        "script": str(story.path),
        "script_line": story.line,
        **request_record(story, timeline, settings, seed),
        "weights": engine.identity,
        "device": str(engine.device),
        **({"decode_device": str(engine.decode_device)} if engine.decode_device else {}),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "fp8": engine.fp8,
        "timings": {"render_s": round(seconds, 3), "first_chunk_s": round(first_frame_s, 3)},
    }
