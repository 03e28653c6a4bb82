"""The engine: weights loaded once, the fast path chosen once, and the one pipeline every command runs.

`Engine.stream` is that pipeline: prompt embeddings -> generator (latent chunks) -> decoder (frames) ->
writer (MP4), one `Chunk` yielded per chunk. It can stop at latents (no decoder) or at frames (no
writer). `render` writes stories through it; `bench` times it. Nothing else in the package builds a
generator or a decoder.

The stream keeps the GPU busy: no host synchronisation in the chunk loop, decoding on a worker thread
and side stream beside generation (`overlap.py`), CUDA graphs per video on the compiled path (the engine's
`FastPath`). Each
model builder builds the transformer in its final form, with the fast path's kernels; the engine never
changes it.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .decode import StreamingDecoder
from .decoders import WAN_DECODER, DecoderChoice, DecoderRequest
from .embed_cache import EmbedCacheSettings, EmbeddingCache, encoder_key
from .generator import MemFlowGenerator, PromptSource, ScriptedPrompts, SeededNoise
from .handover import handed_over
from .merged_cache import CONVERTED_VAE, MERGED_TRANSFORMER, CachedKind, MergedCache, MergedCacheSettings
from .model.build import build_transformer
from .model.transformer import CausalWanTransformer
from .mp4 import Mp4Writer
from .overlap import Overlap
from .prompt_embeds import PromptEmbeddings, PromptEncoder
from .request import ModelKind, ModelSource
from .resume import ResumePoints, kept_chunks, restore_decoder
from .script import Timeline
from .seeding import drawing_from, seeded
from .settings import WAN_1_3B, GenerationSettings, LoraSettings, TransformerConfig, VideoGeometry
from .snapshots import KEPT_FRAMES_BYTES, KEPT_LATENTS_BYTES, ResumePoint
from .speed import FastPath, choose_fast_path
from .speed.compile_cache import CompileChoice
from .timing import Startup, since_process_start
from .vae_stream import PLAIN_KERNELS as PLAIN_DECODER_KERNELS

if TYPE_CHECKING:
    from .tae import StreamingTaeDecoder, TaehvDecoder
    from .wan_vae import WanVAE

DEMO = ModelKind.DEMO.value  # the tiny random model's name in reports and identities (`demo.py`)
RANDOM = ModelKind.RANDOM.value  # the full-size model with random weights, in identities (speed needs no values)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU (as released), float32 on CPU (where bf16 is slow and parity is checked)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class StreamedVideo(Protocol):
    """What `Engine.stream` makes a video from: its prompt source and the memory's recording policy."""

    def prompts(self) -> PromptSource:
        """Asked at every chunk boundary which prompt drives the next chunk (and whether the video ends)."""
        ...

    def interactive(self, settings: GenerationSettings) -> bool:
        """Whether the memory records as an interactive story's does (`KVMemory`)."""
        ...

    def segment_of(self, chunk: int) -> int:
        """Index of the prompt that drove `chunk` (asked once the chunk is made)."""
        ...


@dataclass(frozen=True)
class Video:
    """What one scripted video is made from: prompt embeddings, its length in chunks and where each next
    prompt starts. (A live session's video is `live.session.LiveVideo`.)"""

    embeds: torch.Tensor  # [n_prompts, text_len, text_dim]
    chunks: int
    switch_chunks: tuple[int, ...] = ()  # prompt i + 1 takes over at chunk switch_chunks[i]
    prompt_sources: tuple[str, ...] = ()  # per prompt: "encoded" (for this video) or "cached"

    def prompts(self) -> PromptSource:
        return ScriptedPrompts(self.embeds, self.switch_chunks, self.chunks)

    def interactive(self, settings: GenerationSettings) -> bool:
        """As the settings say; unset, when the prompt switches."""
        chosen = settings.memory.interactive
        return len(self.switch_chunks) > 0 if chosen is None else chosen

    def segment_of(self, chunk: int) -> int:
        """Index of the prompt that drives `chunk`."""
        return bisect.bisect_right(self.switch_chunks, chunk)


@dataclass(frozen=True)
class Chunk:
    """What the pipeline yields for each chunk of a video."""

    index: int
    segment: int  # index of the prompt that drove it
    latents: torch.Tensor  # [1, F, C, h, w] on the device
    frames: torch.Tensor | None  # uint8 [N, H, W, 3] on the CPU; None when the stream stops at latents


@dataclass
class Engine:
    """Everything loaded once and shared by every video of a run; close it (or use `with`) when done."""

    transformer: CausalWanTransformer
    prompts: PromptEmbeddings  # prompt -> embeddings; the text encoder is loaded there on first need
    vae: WanVAE | None  # None where the TAEHV decoder decodes instead (`--decoder tae`): never loaded
    geometry: VideoGeometry
    device: torch.device
    name: str  # for reports: "demo", "random-weights 1.3B", "weights <folder>"
    identity: dict[str, Any]
    fast: FastPath
    notice: str | None = None  # shown to the user (the demo and random models' warning)
    decode_device: torch.device | None = None  # where the VAE decodes when not on `device` (`decode_on`)
    startup: Startup | None = None  # what the process and the loading took before this engine was ready
    source: ModelSource = field(default_factory=ModelSource)  # what `load_engine` was asked for
    compile_choice: CompileChoice | None = None  # how the fast path was decided (`load_engine` sets it)
    tae: TaehvDecoder | None = None  # the TAEHV preview decoder: set, it decodes instead of the VAE (`--decoder tae`)
    overlap: Overlap = field(init=False)  # the decode worker and its side stream

    def __post_init__(self) -> None:
        if self.vae is not None:
            self.fast.prepare_vae(self.vae)
        self.overlap = Overlap(self.device)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def decode_on(self, device: torch.device) -> None:
        """Decode on `device` from now on: the decoder moves there, and so do the decode worker's stream."""
        if self.vae is not None:
            self.vae = self.vae.to(device, model_dtype(device))
            self.fast.prepare_vae(self.vae)
        if self.tae is not None:
            self.tae = self.tae.to(device, model_dtype(device))
        self.overlap.close()
        self.overlap = Overlap(device)
        self.decode_device = device

    @property
    def decoder(self) -> DecoderChoice:
        """Which decoder makes the frames."""
        return DecoderChoice.WAN if self.tae is None else DecoderChoice.TAE

    def streaming_decoder(self) -> StreamingDecoder | StreamingTaeDecoder:
        """A decoder for one video, as `stream` decodes (`bench` times it alone): TAEHV where the engine has it,
        else the VAE (compiled steps where the fast path decodes; a CPU decode device runs them plainly)."""
        if self.tae is not None:
            from .tae import StreamingTaeDecoder

            return StreamingTaeDecoder(self.tae)
        if self.vae is None:
            raise ValueError("this engine was loaded for the TAEHV decoder and has no Wan VAE")
        kernels = self.fast.decoder_kernels if self.vae.device.type == self.device.type else PLAIN_DECODER_KERNELS
        return StreamingDecoder(self.vae, kernels=kernels)

    @property
    def compile_path(self) -> str:
        """Which way the model runs, for reports: graphed, compiled-warm, compiled-cold, eager..."""
        if self.compile_choice is not None:
            return self.compile_choice.path.value
        return self.fast.name

    @property
    def fp8(self) -> bool:
        """The blocks' linear layers run in FP8."""
        return self.fast.fp8

    # -- prompts ---------------------------------------------------------------------------------------

    @property
    def text_encoder(self) -> PromptEncoder | None:
        """The text encoder, loaded now if it was not yet (None: the model has none)."""
        return self.prompts.text_encoder

    def encode(self, prompts: Sequence[str]) -> None:
        """Have the prompts' embeddings ready: from memory, the disk cache, or encoded (once) and cached."""
        self.prompts.prepare(prompts)

    def prefetch(self, prompts: Sequence[str], *, beside_render: bool = False) -> None:
        """Start having the prompts' embeddings ready in a background thread (a later `encode` waits for it);
        `beside_render`: while a video renders, encoding only where the text encoder is on the GPU already."""
        self.prompts.prefetch(prompts, beside_render=beside_render)

    def embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """[n, text_len, text_dim] float32 on the CPU (encoded first where need be)."""
        return self.prompts.embeddings(prompts)

    def video(self, timeline: Timeline) -> Video:
        """A timeline's video: its prompts' embeddings (and where each came from), its chunks and switches."""
        embeds, sources = self.prompts.take(timeline.prompts)
        return Video(embeds, timeline.chunks, timeline.switch_chunks, sources)

    # -- the pipeline ----------------------------------------------------------------------------------

    def stream(
        self,
        video: StreamedVideo,
        settings: GenerationSettings,
        seed: int,
        *,
        decode: bool = True,
        writer: Mp4Writer | None = None,
        resume: ResumePoint | None = None,
        snapshots: Callable[[ResumePoint], None] | None = None,
        kept_latents_bytes: int = KEPT_LATENTS_BYTES,
        kept_frames_bytes: int = KEPT_FRAMES_BYTES,
        decode_trail: int = 2,
    ) -> Iterator[Chunk]:
        """Generate `video` chunk by chunk; with `decode` decode each chunk, with `writer` also append its frames.

        On CUDA decoding runs beside generation and may trail it by up to `decode_trail` chunks: 2 keeps
        the GPU busy (a whole video's throughput); 0 hands each chunk out as soon as it is decoded, before
        the next chunk is asked for (a live session, where the next chunk may wait for the viewer's clock and
        a decoded chunk must not wait with it). A chunk is yielded once it is as far along as asked (its
        frames written, when there is a writer). `snapshots` gets the state to resume
        from at every segment boundary and at the end of the video (where a story that goes on would
        switch), once the chunks before it are as far along, before the next chunk is yielded. With
        `resume`, the chunks before that point are its kept latents and only the later ones are generated:
        every chunk is yielded, the same as a stream from the start would yield. Where `resume` keeps their
        frames and the decoder's causal state after them, those frames are yielded (and written) as they are
        and the decoder goes on from that state; else the kept latents are decoded again.

        A snapshot holds the latents of every chunk before it, so while `snapshots` is given the stream keeps
        them, up to `kept_latents_bytes`; no snapshot is taken after that point. It keeps their frames and a
        copy of the decoder's causal state too while both fit in `kept_frames_bytes`. Without `snapshots`
        nothing is kept and nothing is copied.
        """
        generator = MemFlowGenerator(self.transformer, settings, passes=self.fast.graphed_passes)
        noise = SeededNoise(seed, generator.noise_shape(), self.device, self.dtype)
        chunk_bytes = math.prod(generator.noise_shape()) * self.dtype.itemsize
        points = ResumePoints(snapshots, kept_latents_bytes // chunk_bytes, kept_frames_bytes)
        generated = generator.stream(
            video.prompts(), noise, interactive=video.interactive(settings),
            resume=resume.boundary if resume else None,
            boundaries=points.boundary if snapshots else None, last_boundary=points.last_chunk,
        )  # fmt: skip
        with self.fast.sdpa_priority():
            if not decode:
                for index, x in enumerate(self._replayed(resume, settings, generated)):
                    points.reached(x)
                    yield Chunk(index, video.segment_of(index), x, None)
                points.ended()
                return
            decoder = self.streaming_decoder()
            start = 0
            if resume is not None and restore_decoder(decoder, resume, settings.geometry):
                # the kept chunks' frames as the earlier render made them, and the decoder as it left them
                kept = resume.latents.to(self.device, self.dtype)
                points.resumed(kept, resume)
                for index, (x, frames) in enumerate(kept_chunks(kept, resume.frames, settings.geometry)):
                    if writer is not None:
                        writer.write(frames)
                    yield Chunk(index, video.segment_of(index), x, frames)
                start, latents = resume.chunk, generated
            else:
                latents = self._replayed(resume, settings, generated)
            latents = handed_over(latents, decoder.device)  # a decode device of its own: each chunk copied there

            def decoded_chunk(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
                return x, decoder.decode(x), points.decoder_state(decoder)  # the state after x, where it is kept

            # closed with this stream: the decode worker must be done with the chunks before they go
            with closing(self.overlap.map(latents, decoded_chunk, depth=decode_trail)) as decoded:
                for index, (x, frames, state) in enumerate(decoded, start=start):
                    if writer is not None:
                        writer.write(frames)
                    points.reached(x, frames, state)
                    yield Chunk(index, video.segment_of(index), x, frames)
            points.ended()

    def _replayed(
        self, resume: ResumePoint | None, settings: GenerationSettings, generated: Iterator[torch.Tensor]
    ) -> Iterator[torch.Tensor]:
        """The chunks before `resume` as it keeps them (where they are decoded again, the decoder's causal state
        and the MP4 encoder's are rebuilt by the same frames), then the generated ones."""
        if resume is not None:
            kept = resume.latents.to(self.device, self.dtype)
            yield from kept.split(settings.geometry.frames_per_chunk, dim=1)
        yield from generated

    def mp4_writer(self, target, *, overwrite: bool = False) -> Mp4Writer:
        """A writer for this engine's frames (size, frame rate, a keyframe per chunk)."""
        geometry = self.geometry
        return Mp4Writer(
            target, geometry.width, geometry.height, geometry.fps,
            overwrite=overwrite, keyframe_interval=geometry.video_frames_per_chunk,
        )  # fmt: skip

    # -- lifetime --------------------------------------------------------------------------------------

    def close(self) -> None:
        self.prompts.close()
        self.overlap.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def load_engine(
    model: ModelSource | str | None, device: str | torch.device | None = None, lora: LoraSettings | None = None, *,
    compile: CompileChoice | None = None, fp8: bool = False, decode_device: str | torch.device | None = None,
    full_text_encoder: bool = False, prompts: Sequence[str] = (), embed_cache: EmbedCacheSettings | bool = True,
    decoder: DecoderRequest = WAN_DECODER,
) -> Engine:  # fmt: skip
    """Load the demo model, full-size random weights or real weights (`ModelSource`; a string is parsed as
    `--model` is: 'demo', 'random', a folder, or None for the HF cache).

    `compile` decides the fast path on CUDA (`speed.choose_fast_path`) and is reported (`Engine.compile_path`):
    None the graphed path (eager kernels, repeated passes replayed from CUDA graphs; the commands always pass a
    choice, `plan.open_engine`), a choice whose `compile` is True the compiled one (the first chunk then pays
    the compile), False plain eager kernels; `CompileChoice.triton()` the fused Triton glue (`FastPath.glue`).
    With `fp8`, the blocks' linear layers run in FP8 (check first with `speed.fp8.fp8_unsupported_reason`).
    With `decode_device`, the VAE decodes there (`--decode-device cuda:1`). With `full_text_encoder`, the
    random model encodes prompts with a full-size random umT5-XXL instead of making them noise.

    `prompts` (the first video's) are ready when the engine is: read from the prompt-embedding cache, or
    encoded in a background thread while the transformer loads. `embed_cache` is that cache's settings
    (True: from the environment, `EmbedCacheSettings.from_environment`; False: no cache on disk).
    `decoder` names the decoder (`--decoder tae`: the TAEHV preview decoder, random for the demo and random
    models, else the `taew2_1` file); the Wan VAE is then not loaded.
    """
    import_s, started = since_process_start(), time.perf_counter()
    source = ModelSource.parse(model)
    dev = torch.device(device or default_device())
    if dev.type == "cuda":
        if dev.index is None:  # plain "cuda": the current GPU, named so that everything agrees on it
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)  # events, streams and graph captures of the pipeline use the current device
    if embed_cache is True:
        embed_cache = EmbedCacheSettings.from_environment()
    speed = Speed(None if compile is None else compile.compile, fp8, glue=compile is not None and compile.glue)
    loading = _Loading(dev, speed, embed_cache or None, tuple(prompts), wan_vae=not decoder.is_tae)
    engine = _engine(source, lora, loading, full_text_encoder)
    with ExitStack() as failed:
        failed.callback(engine.close)
        engine.prompts.wait()  # a text encoder that cannot load or encode fails here, as the other weights do
        engine.tae = _preview_decoder(source, decoder, loading)
        if decode_device is not None:
            engine.decode_on(torch.device(decode_device))
        failed.pop_all()
    engine.source, engine.compile_choice = source, compile
    engine.startup = Startup(import_s=import_s, load_s=time.perf_counter() - started)
    return engine


@dataclass(frozen=True)
class Speed:
    """The fast path's choices that a model's loader passes on (`choose_fast_path`)."""

    compile: bool | None  # True compiled, None graphed, False plain eager (`choose_fast_path`)
    fp8: bool
    glue: bool = False  # the blocks' glue in fused Triton kernels, with CUDA graphs (compile None) or without


@dataclass(frozen=True)
class _Loading:
    """What every model's loader is asked for."""

    device: torch.device
    speed: Speed
    embed_cache: EmbedCacheSettings | None  # None: no prompt-embedding cache on disk
    prompts: tuple[str, ...]  # prepared while the model loads
    wan_vae: bool = True  # the Wan VAE decodes (False: the TAEHV decoder does, and the VAE is not loaded)

    @property
    def dtype(self) -> torch.dtype:
        return model_dtype(self.device)

    def prompt_embeddings(
        self, load: Callable[[], PromptEncoder] | None, name: str, dtype: torch.dtype, **identity: Any
    ) -> PromptEmbeddings:
        """The engine's prompt side for a text encoder that `load` builds; `identity` keys its cached files."""
        cache = None
        if self.embed_cache is not None and self.embed_cache.enabled:
            # `batch`: prompts encoded one at a time (files of earlier releases, encoded 8 together, are not read)
            key = encoder_key(**identity, dtype=str(dtype).removeprefix("torch."), device=self.device.type, batch=1)
            cache = EmbeddingCache(self.embed_cache, key, dtype)
        return PromptEmbeddings(load, self.device, cache, name=name)


def _engine(source: ModelSource, lora: LoraSettings | None, loading: _Loading, full_text_encoder: bool) -> Engine:
    if full_text_encoder and not source.is_random:
        raise ValueError("only the random model takes a full-size random text encoder; the others have their own")
    if source.is_demo:
        return _demo_engine(loading)
    if source.is_random:
        return _random_engine(loading, full_text_encoder)
    return _weights_engine(source.folder, lora, loading)


def _preview_decoder(source: ModelSource, request: DecoderRequest, loading: _Loading) -> TaehvDecoder | None:
    """The TAEHV decoder where it was asked for: random weights for the demo and random models (the demo's
    narrow), else the file `--decoder-weights` names, or `taew2_1.pth` in the weights folder or the hub cache."""
    if not request.is_tae:
        return None
    from .tae import TAEW2_1, load_taehv, random_taehv
    from .tae.files import tae_weights
    from .tae.weights import prepared

    if source.is_demo or source.is_random:
        from .demo import build_demo_taehv

        decoder = build_demo_taehv() if source.is_demo else random_taehv(TAEW2_1)
        return prepared(decoder, loading.device, loading.dtype)
    folder = Path(source.folder).expanduser() if source.folder is not None else None
    return load_taehv(tae_weights(request.weights, folder), loading.device, loading.dtype)


def _fast_path(config: TransformerConfig, device: torch.device, speed: Speed) -> FastPath:
    dtype = model_dtype(device)
    return choose_fast_path(config, device, dtype, compile=speed.compile, fp8=speed.fp8, glue=speed.glue)


def _weights_engine(model: str | None, lora: LoraSettings | None, loading: _Loading) -> Engine:
    """The real weights. Three things load at once: on one background thread the VAE loads (memflow's modules;
    diffusers is imported first, seconds, only where an original VAE file is converted: its first load); on
    another the text encoder loads and encodes the first prompts, after that import if there is one (never
    where they are all cached: then transformers' text-encoder modules are not even imported); here the
    transformer loads. Where the TAEHV decoder decodes, the VAE is not loaded."""
    from . import weights
    from .checkpoint import merge_key, read_transformer
    from .loading import prefetch_files, read_transformer_config

    dev, dtype = loading.device, loading.dtype
    files = weights.resolve_model(model)
    merged_cache, vae_cache = _state_cache(MERGED_TRANSFORMER), _state_cache(CONVERTED_VAE)
    key = None if merged_cache is None else merge_key(files.base, files.lora, lora, dtype)
    # the kernel reads ahead while Python gets ready: the merged transformer where it is cached, else both files
    cached = key is not None and merged_cache.path(key).is_file()
    checkpoints = (merged_cache.path(key),) if cached else (files.base, files.lora)
    vae_file = weights.converted_vae_file(files.vae, dtype, vae_cache) if loading.wan_vae else None
    prefetch_files(*checkpoints, vae_file)
    config = read_transformer_config(files.transformer_config)
    fast = _fast_path(config, dev, loading.speed)
    identity = weights.weights_identity(files)
    with ExitStack() as failed, ThreadPoolExecutor(1, thread_name_prefix="memflow-vae") as pool:
        # diffusers first, alone, where it converts the VAE file: two threads never import at once
        converts = vae_file is not None and vae_file == files.vae and files.vae.is_file()  # `vae_needs_converter`
        diffusers = pool.submit(_import_vae_converter) if converts else None

        def load_text_encoder() -> PromptEncoder:
            if diffusers is not None:
                diffusers.result()
            return weights.load_text_encoder(files, dev, dtype, config.text_len)

        prompts = loading.prompt_embeddings(
            load_text_encoder, f"weights {model or 'HF cache'}", dtype,
            model="weights", files=_text_encoder_files(identity), text_len=config.text_len,
        )  # fmt: skip
        failed.callback(prompts.close)
        prompts.prefetch(loading.prompts)
        vae = pool.submit(weights.load_vae, files.vae, dev, dtype, cache=vae_cache) if loading.wan_vae else None
        loaded = read_transformer(
            files.base, files.lora, config, lora, device=dev, dtype=dtype, kernels=fast.kernels, cache=merged_cache
        )
        identity["lora_merge"] = loaded.merge.value
        engine = Engine(
            transformer=loaded.model,
            prompts=prompts,
            vae=None if vae is None else vae.result(),
            geometry=VideoGeometry(),
            device=dev,
            name=f"weights {model or 'HF cache'}",
            identity=identity,
            fast=fast,
        )
        failed.pop_all()
    return engine


def _state_cache(kind: CachedKind) -> MergedCache | None:
    """The cache of merged transformers or converted VAEs the environment asks for (None: turned off)."""
    settings = MergedCacheSettings.from_environment(kind=kind)
    return MergedCache(settings) if settings.enabled else None


def _import_vae_converter() -> None:
    """Import diffusers' Wan VAE and its converter (a first load of an original VAE file converts and checks
    it): seconds of the GIL (it imports torch's dynamo and transformers' core too). transformers'
    text-encoder modules are left to the text encoder's load."""
    from diffusers import AutoencoderKLWan  # noqa: F401
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: F401


def _text_encoder_files(identity: dict[str, Any]) -> list[dict[str, Any]]:
    """Name, size and fingerprint of the text encoder's and tokenizer's files (not where they are, nor when)."""
    return [
        {key: entry[key] for key in ("role", "name", "size", "fingerprint")}
        for entry in identity["files"]
        if entry["role"] in ("text_encoder", "tokenizer")
    ]


def _demo_engine(loading: _Loading) -> Engine:
    from . import __version__, demo

    device = loading.device
    fast = _fast_path(demo.DEMO_TRANSFORMER, device, loading.speed)
    with drawing_from(seeded(0)):  # the same on every device and path; the global RNG untouched
        weights = CausalWanTransformer(demo.DEMO_TRANSFORMER).state_dict()
    state = {name: tensor.to(device, model_dtype(device)) for name, tensor in weights.items()}
    transformer = build_transformer(demo.DEMO_TRANSFORMER, state, fast.kernels)
    vae = demo.build_demo_vae().to(device, model_dtype(device)) if loading.wan_vae else None
    prompts = loading.prompt_embeddings(
        demo.build_demo_text_encoder, DEMO, torch.float32,
        model=DEMO, memflow=__version__, transformers=version("transformers"), text_len=demo.DEMO_TEXT_LEN,
    )  # fmt: skip
    prompts.prefetch(loading.prompts)
    return Engine(
        transformer=transformer,
        prompts=prompts,
        vae=vae,
        geometry=demo.DEMO_GEOMETRY,
        device=device,
        name=DEMO,
        identity={"model": DEMO, "note": demo.DEMO_NOTICE},
        fast=fast,
        notice=demo.DEMO_NOTICE,
    )


def _random_engine(loading: _Loading, full_text_encoder: bool = False) -> Engine:
    """The full-size 1.3B transformer and Wan2.1 VAE with seeded random weights; prompts become seeded noise,
    or with `full_text_encoder` go through a full-size random umT5-XXL (built on first need)."""
    from . import __version__
    from .random_model import RANDOM_NOTICE, NoiseTextEncoder, random_text_encoder, random_vae

    device, dtype = loading.device, loading.dtype
    fast = _fast_path(WAN_1_3B, device, loading.speed)
    vae = random_vae(device, dtype) if loading.wan_vae else None  # before the text encoder's thread starts
    if full_text_encoder:
        prompts = loading.prompt_embeddings(
            lambda: random_text_encoder(device, dtype, max_length=WAN_1_3B.text_len), "random-weights 1.3B", dtype,
            model="random umT5-XXL", memflow=__version__, torch=torch.__version__, text_len=WAN_1_3B.text_len,
        )  # fmt: skip
    else:
        prompts = loading.prompt_embeddings(
            lambda: NoiseTextEncoder(WAN_1_3B.text_len, WAN_1_3B.text_dim), "random-weights 1.3B", torch.float32,
            model="random noise", memflow=__version__, text_len=WAN_1_3B.text_len, text_dim=WAN_1_3B.text_dim,
        )  # fmt: skip
    with ExitStack() as failed:
        failed.callback(prompts.close)
        prompts.prefetch(loading.prompts)
        transformer = build_transformer(WAN_1_3B, _random_weights(device, dtype), fast.kernels)
        engine = Engine(
            transformer=transformer,
            prompts=prompts,
            vae=vae,
            geometry=VideoGeometry(),
            device=device,
            name="random-weights 1.3B",
            identity={"model": RANDOM, "note": RANDOM_NOTICE},
            fast=fast,
            notice=RANDOM_NOTICE,
        )
        failed.pop_all()
    return engine


def _random_weights(device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The 1.3B transformer's checkpoint-named weights drawn from N(0, 0.02), seeded, made on `device` in `dtype`
    (no float32 copy is ever made)."""
    with torch.device("meta"):
        plain = CausalWanTransformer(WAN_1_3B).to(dtype)
    plain = plain.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    for param in plain.parameters():
        param.data.normal_(0.0, 0.02, generator=generator)
    return plain.state_dict()
