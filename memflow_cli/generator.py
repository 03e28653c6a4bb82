"""The chunk loop: prompt embeddings and noise in, denoised latent chunks out.

One chunk is `frames_per_chunk` latent frames. For each chunk the transformer
runs one pass per denoising step, then a cache-writing pass on the clean
result at the context timestep. With several prompts the loop switches prompt
on chunk boundaries and re-encodes the recent frames under the new prompt (the
KV re-cache); with one prompt it follows the single-prompt pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch

from .model.cache import KVMemory, TextCache
from .model.memory import bank_view_frames
from .model.transformer import CausalWanTransformer, PassState, rope_angles, rope_tables
from .sampler import FlowSchedule
from .settings import GenerationSettings


class NoiseSource(Protocol):
    """Gaussian noise for the chunk loop: the start of each chunk and each re-noising step."""

    def initial(self, chunk: int) -> torch.Tensor: ...  # [B, F, C, h, w]

    def renoise(self, chunk: int, step: int) -> torch.Tensor: ...  # [B, F, C, h, w]


class SeededNoise:
    """Noise drawn chunk by chunk from one seeded generator on the device: memory stays flat."""

    def __init__(self, seed: int, shape: tuple[int, ...], device, dtype):
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.shape, self.device, self.dtype = shape, device, dtype

    def _draw(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.generator, device=self.device, dtype=torch.float32).to(
            self.dtype
        )

    def initial(self, chunk: int) -> torch.Tensor:
        return self._draw()

    def renoise(self, chunk: int, step: int) -> torch.Tensor:
        return self._draw()


class FixedNoise:
    """Noise given up front, in the parity fixtures' layout.

    noise: [B, T, C, h, w] for all latent frames; renoise: [chunks * (steps - 1), F, C, h, w].
    """

    def __init__(self, noise: torch.Tensor, renoise: torch.Tensor, frames_per_chunk: int, steps: int):
        self.noise, self.renoise_all = noise, renoise
        self.frames, self.transitions = frames_per_chunk, steps - 1

    def initial(self, chunk: int) -> torch.Tensor:
        return self.noise[:, chunk * self.frames : (chunk + 1) * self.frames]

    def renoise(self, chunk: int, step: int) -> torch.Tensor:
        return self.renoise_all[chunk * self.transitions + step][None]


def switch_chunks_from_frames(switch_frames: Sequence[int], frames_per_chunk: int) -> tuple[int, ...]:
    """Chunks where each next prompt starts, given latent switch frames (the official rule).

    A switch happens at the first chunk whose start frame is at or after its index,
    and at most one switch happens per chunk.
    """
    chunks: list[int] = []
    for frame in switch_frames:
        chunk = -(-frame // frames_per_chunk)
        chunks.append(max(chunk, chunks[-1] + 1) if chunks else chunk)
    return tuple(chunks)


# Makes, for one video, the callable that runs each pass in place of `model(x, timestep, state)`.
PassRunnerFactory = Callable[[CausalWanTransformer], Callable[[torch.Tensor, float, PassState], torch.Tensor]]


class MemFlowGenerator:
    """Streams latent chunks of one video from a `CausalWanTransformer`."""

    def __init__(
        self, model: CausalWanTransformer, settings: GenerationSettings, *, passes: PassRunnerFactory | None = None
    ):
        self.model = model
        self.settings = settings
        self.passes = passes  # runs the passes of one video in place of the model (the fast path's CUDA graphs)
        self.schedule = FlowSchedule(settings.sampler)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.rope_dtype = torch.float64 if self.dtype == torch.float64 or self.dtype == torch.float32 else torch.float32

    def noise_shape(self, batch: int = 1) -> tuple[int, ...]:
        geometry = self.settings.geometry
        return (batch, geometry.frames_per_chunk, *geometry.latent_shape(1)[1:])

    @torch.no_grad()
    def generate(
        self,
        prompt_embeds: torch.Tensor,
        num_chunks: int,
        noise: NoiseSource,
        switch_chunks: Sequence[int] = (),
    ) -> Iterator[torch.Tensor]:
        """Yield `num_chunks` denoised latent chunks [B, F, C, h, w].

        prompt_embeds: [n_prompts, text_len, text_dim] (or [n_prompts, B, ...]); prompt i+1
        takes over at chunk `switch_chunks[i]`.
        """
        if len(switch_chunks) != len(prompt_embeds) - 1:
            raise ValueError(f"{len(prompt_embeds)} prompts need {len(prompt_embeds) - 1} switch chunks")
        memory_settings = self.settings.memory
        geometry = self.settings.geometry
        config = self.model.config
        contexts = prompt_embeds.to(self.device, self.dtype)
        if contexts.dim() == 3:
            contexts = contexts[:, None]  # [n_prompts, B=1, T, D]
        if contexts.shape[2] < config.text_len:  # zero rows up to the text length, as the text encoder pads
            contexts = torch.nn.functional.pad(contexts, (0, 0, 0, config.text_len - contexts.shape[2]))
        batch = contexts.shape[1]
        memory = KVMemory(config, memory_settings, geometry.tokens_per_frame, batch, self.device, self.dtype)
        text = TextCache(config, batch, self.device, self.dtype)
        interactive = len(switch_chunks) > 0
        frames = geometry.frames_per_chunk
        history = torch.zeros(
            (batch, memory_settings.window, *geometry.latent_shape(1)[1:]), device=self.device, dtype=self.dtype
        )
        timesteps = self.schedule.denoising_timesteps
        run_pass = self.passes(self.model) if self.passes else self.model
        segment = 0
        for chunk in range(num_chunks):
            # 1. prompt switch: new text, recent frames re-encoded under it
            if segment < len(switch_chunks) and chunk >= switch_chunks[segment]:
                segment += 1
                self._recache(chunk, contexts[segment], memory, text, history)
            context = contexts[segment]

            # 2. denoise the chunk, one pass per step
            plan = memory.plan(chunk * geometry.tokens_per_chunk, geometry.tokens_per_chunk)
            memory.begin(plan)
            state = self._state(plan, memory, text, chunk * frames, frames, self._bank_view(chunk))
            x = noise.initial(chunk).to(self.device, self.dtype)
            for step, timestep in enumerate(timesteps):
                if step == 0:
                    memory.bank_pre_update(text)
                if not text.valid:
                    self.model.embed_text(context, text)
                x0 = self.schedule.to_x0(run_pass(x, timestep, state), x, timestep)
                if step + 1 < len(timesteps):
                    x = self.schedule.add_noise(x0, noise.renoise(chunk, step).to(x0.device), timesteps[step + 1])

            # 3. write the clean chunk into the cache (and stage it for the bank)
            run_pass(x0, float(self.settings.sampler.context_noise), state)
            record = not interactive or chunk % memory_settings.record_interval == 0
            memory.commit(
                plan,
                stage=record,
                record_interval=memory_settings.record_interval,
                chunk_tokens=geometry.tokens_per_chunk,
            )
            history[:, :-frames] = history[:, frames:].clone()
            history[:, -frames:] = x0
            yield x0

    def _bank_view(self, chunk: int, recache: bool = False) -> int:
        memory = self.settings.memory
        if memory.bank_frames == 0 or memory.sink_frames == 0:  # without a sink the bank is never attended
            return 0
        return bank_view_frames(
            chunk, record_interval=memory.record_interval, bank_size=memory.bank_frames, recache=recache
        )

    def _state(self, plan, memory: KVMemory, text: TextCache, frame0: int, frames: int, bank_view: int) -> PassState:
        geometry = self.settings.geometry
        grid_h = geometry.latent_height // geometry.patch_hw
        grid_w = geometry.latent_width // geometry.patch_hw
        angles = rope_angles(self.model.config, frame0, frames, grid_h, grid_w, self.device)
        settings = self.settings.memory
        sma = settings.sma_top_k if settings.sma and settings.sink_frames else None
        return PassState(plan, memory, text, rope_tables(angles, self.rope_dtype), bank_view, sma)

    def _recache(
        self, chunk: int, context: torch.Tensor, memory: KVMemory, text: TextCache, history: torch.Tensor
    ) -> None:
        """Re-encode the last `window` frames under the new prompt (LongLive's KV re-cache)."""
        text.reset()
        geometry = self.settings.geometry
        start_frame = chunk * geometry.frames_per_chunk
        if start_frame == 0:
            return
        frames = min(self.settings.memory.window, start_frame)
        first = start_frame - frames
        plan = memory.plan(first * geometry.tokens_per_frame, frames * geometry.tokens_per_frame)
        memory.begin(plan)
        state = self._state(plan, memory, text, first, frames, self._bank_view(chunk, recache=True))
        memory.bank_pre_update(text)  # reads the zeroed text keys, as the released code does
        self.model.embed_text(context, text)
        self.model(history[:, -frames:], 0.0, state)
        memory.commit(plan, stage=False, record_interval=1, chunk_tokens=geometry.tokens_per_chunk)
        text.reset()
