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

from .model.cache import KVMemory, PassGroup, TextCache
from .model.transformer import CausalWanTransformer, PassFunction, PassState, rope_angles, rope_tables
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


# Makes, for one video, what runs its passes from the pass function (the fast path's CUDA graphs).
PassRunnerFactory = Callable[[PassFunction], PassFunction]


class MemFlowGenerator:
    """Streams latent chunks of one video from a `CausalWanTransformer`.

    `run_pass` computes one pass (default: the model; the fast path's has compiled block steps) and
    `passes`, if given, wraps it for each video (`speed.graphs.GraphedPasses`).
    """

    def __init__(
        self,
        model: CausalWanTransformer,
        settings: GenerationSettings,
        *,
        run_pass: PassFunction | None = None,
        passes: PassRunnerFactory | None = None,
    ):
        self.model = model
        self.settings = settings
        self.run_pass = run_pass or model
        self.passes = passes
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
        contexts = self._contexts(prompt_embeds)  # [n_prompts, B, text_len, text_dim]
        batch = contexts.shape[1]
        memory = self._memory(batch, interactive=len(switch_chunks) > 0)
        text = TextCache(self.model.config, batch, self.device, self.dtype)
        history = self._history(batch)  # the last `window` latent frames, for a re-cache
        run_pass = self.passes(self.run_pass) if self.passes else self.run_pass
        segment = 0
        for chunk in range(num_chunks):
            # 1. prompt switch: new text, recent frames re-encoded under it
            if segment < len(switch_chunks) and chunk >= switch_chunks[segment]:
                segment += 1
                self._recache(chunk, contexts[segment], memory, text, history)

            # 2. what the chunk attends to (the bank takes its staged prototype first), and its prompt's text
            passes = memory.begin_chunk(chunk, text)
            if not text.valid:
                self.model.embed_text(contexts[segment], text)
            state = self._state(passes, memory, text)

            # 3. denoise the chunk, one pass per step
            x0 = self._denoise(run_pass, state, noise, chunk)

            # 4. write the clean chunk into the cache; the memory stages it for the bank when the chunk records
            run_pass(x0, float(self.settings.sampler.context_noise), state)
            memory.end_chunk(passes, chunk)
            _push(history, x0)
            yield x0

    def _history(self, batch: int) -> torch.Tensor:
        """Zeros [B, window, C, h, w]: room for the most recent `window` latent frames."""
        frame = self.settings.geometry.latent_shape(1)[1:]
        return torch.zeros((batch, self.settings.memory.window, *frame), device=self.device, dtype=self.dtype)

    def _contexts(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings as [n_prompts, B, text_len, text_dim] on the device, zero rows up to the text length."""
        text_len = self.model.config.text_len
        contexts = prompt_embeds.to(self.device, self.dtype)
        if contexts.dim() == 3:
            contexts = contexts[:, None]  # [n_prompts, B=1, T, D]
        if contexts.shape[2] < text_len:  # zero rows up to the text length, as the text encoder pads
            contexts = torch.nn.functional.pad(contexts, (0, 0, 0, text_len - contexts.shape[2]))
        return contexts

    def _memory(self, batch: int, *, interactive: bool) -> KVMemory:
        geometry = self.settings.geometry
        return KVMemory(
            self.model.config, self.settings.memory, geometry.tokens_per_frame, geometry.frames_per_chunk,
            batch, self.device, self.dtype, interactive=interactive,
        )  # fmt: skip

    def _denoise(self, run_pass: PassFunction, state: PassState, noise: NoiseSource, chunk: int) -> torch.Tensor:
        """The few-step sampler on one chunk: predict x0, re-noise to the next step, ...; returns the last x0."""
        timesteps = self.schedule.denoising_timesteps
        x = noise.initial(chunk).to(self.device, self.dtype)
        for step, timestep in enumerate(timesteps):
            x0 = self.schedule.to_x0(run_pass(x, timestep, state), x, timestep)
            if step + 1 < len(timesteps):
                x = self.schedule.add_noise(x0, noise.renoise(chunk, step).to(x0.device), timesteps[step + 1])
        return x0

    def _state(self, passes: PassGroup, memory: KVMemory, text: TextCache) -> PassState:
        geometry = self.settings.geometry
        grid_h = geometry.latent_height // geometry.patch_hw
        grid_w = geometry.latent_width // geometry.patch_hw
        angles = rope_angles(self.model.config, passes.first_frame, passes.frames, grid_h, grid_w, self.device)
        rope = rope_tables(angles, self.rope_dtype)
        return PassState(passes.plan, memory, text, rope, passes.bank_view, memory.sma_top_k)

    def _recache(
        self, chunk: int, context: torch.Tensor, memory: KVMemory, text: TextCache, history: torch.Tensor
    ) -> None:
        """Re-encode the last `window` frames under the new prompt (LongLive's KV re-cache)."""
        text.reset()
        passes = memory.begin_recache(chunk, text)  # the bank's update reads the zeroed text keys, as released
        if passes is None:
            return
        self.model.embed_text(context, text)
        self.run_pass(history[:, -passes.frames :], 0.0, self._state(passes, memory, text))
        memory.end_recache(passes)
        text.reset()


def _push(history: torch.Tensor, x0: torch.Tensor) -> None:
    """Shift the recent latent frames [B, window, C, h, w] left by a chunk and put the chunk x0 last."""
    frames = x0.shape[1]
    history[:, :-frames] = history[:, frames:].clone()
    history[:, -frames:] = x0
