"""The chunk loop: prompt embeddings and noise in, denoised latent chunks out.

One chunk is `frames_per_chunk` latent frames. For each chunk the transformer
runs one pass per denoising step, then a cache-writing pass on the clean
result at the context timestep. A prompt source says, at every chunk boundary,
which prompt drives the next chunk (a script's switches known in advance, or the
prompts of a live session as they arrive); on a switch the loop re-encodes the
recent frames under the new prompt (the KV re-cache). With one prompt and no
switch it follows the single-prompt pipeline.

At a prompt switch the loop can hand out a `BoundaryState`, and start from one: the chunks from the
switch on are then the ones a stream from chunk 0 would make, bit for bit. What that state holds is
exactly what the rest of the video depends on (`snapshots.py` says why each part is needed).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .model.cache import KVMemory, MemoryState, PassGroup, TextCache
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
        return torch.randn(self.shape, generator=self.generator, device=self.device, dtype=torch.float32).to(self.dtype)

    def initial(self, chunk: int) -> torch.Tensor:
        return self._draw()

    def renoise(self, chunk: int, step: int) -> torch.Tensor:
        return self._draw()

    def state(self) -> torch.Tensor:
        """The generator's state (uint8, on the CPU): what the next draws depend on."""
        return self.generator.get_state()

    def restore(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


class ResumableNoise(NoiseSource, Protocol):
    """A noise source whose position in its sequence can be saved and restored (`SeededNoise`)."""

    def state(self) -> torch.Tensor: ...

    def restore(self, state: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class BoundaryState:
    """What the chunks from `chunk` on depend on, taken at a prompt switch before the switch runs (or where a
    switch could run: a stream that switches prompt at `chunk` can resume from it)."""

    chunk: int  # the first chunk of the new segment
    segment: int  # the segment of the chunk before it
    history: torch.Tensor  # [B, window, C, h, w]: the latent frames the re-cache re-encodes
    memory: MemoryState  # sink, bank and staged prototype, the cache's positions
    noise: torch.Tensor  # the noise generator's state (uint8)


class PromptSource(Protocol):
    """Which prompt drives each chunk, asked at the chunk boundary before the chunk starts."""

    def at(self, chunk: int) -> tuple[int, torch.Tensor] | None:
        """(segment index, embeddings [text_len, text_dim] or [B, text_len, text_dim]) for `chunk`; None: the
        video ends before `chunk`. A segment index other than the last one's switches prompt there."""
        ...


class ScriptedPrompts:
    """The prompts of a script: prompt i + 1 takes over at chunk `switch_chunks[i]`; `chunks` chunks in all."""

    def __init__(self, embeds: torch.Tensor, switch_chunks: Sequence[int], chunks: int):
        self.embeds, self.switch_chunks, self.chunks = embeds, tuple(switch_chunks), chunks

    def at(self, chunk: int) -> tuple[int, torch.Tensor] | None:
        if chunk >= self.chunks:
            return None
        segment = bisect.bisect_right(self.switch_chunks, chunk)
        return segment, self.embeds[segment]


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
        boundaries: Callable[[BoundaryState], None] | None = None,
        switchable: Collection[int] = (),
    ) -> Iterator[torch.Tensor]:
        """Yield `num_chunks` denoised latent chunks [B, F, C, h, w] of a scripted video.

        prompt_embeds: [n_prompts, text_len, text_dim] (or [n_prompts, B, ...]); prompt i+1
        takes over at chunk `switch_chunks[i]`. The memory records as an interactive story's does
        when there are switches, unless the memory settings say which way (`interactive`).
        `boundaries` gets the state at every switch and after the last chunk, and at the chunks of `switchable`,
        as in `stream`.
        """
        if len(switch_chunks) != len(prompt_embeds) - 1:
            raise ValueError(f"{len(prompt_embeds)} prompts need {len(prompt_embeds) - 1} switch chunks")
        interactive = self.settings.memory.interactive
        if interactive is None:
            interactive = len(switch_chunks) > 0
        prompts = ScriptedPrompts(prompt_embeds, switch_chunks, num_chunks)
        yield from self.stream(prompts, noise, interactive=interactive, boundaries=boundaries, switchable=switchable)

    @torch.no_grad()
    def stream(
        self,
        prompts: PromptSource,
        noise: NoiseSource,
        *,
        interactive: bool,
        resume: BoundaryState | None = None,
        boundaries: Callable[[BoundaryState], None] | None = None,
        last_boundary: int | None = None,
        switchable: Collection[int] = (),
    ) -> Iterator[torch.Tensor]:
        """Yield denoised latent chunks [B, F, C, h, w] until `prompts` ends the video.

        `prompts` is asked at every chunk boundary, before the chunk starts, which prompt drives it: a
        new segment index switches prompt there (KV re-cache, bank scored under the new text), as a
        scripted switch does. `interactive` is the memory's recording policy (`KVMemory`).

        `boundaries`, if given, gets the state at every switch, before the switch, and after the last chunk
        (the noise must then be a `ResumableNoise`), up to chunk `last_boundary` (None: every one), and at the
        chunks of `switchable` where the prompt goes on (where another story could switch; a story resuming from
        such a point must record its memory as this one does: the same `interactive`, or a `record_interval` of
        1, since the point does not say which way it recorded). With
        `resume`, the stream starts from such a state: it yields the chunks from `resume.chunk` on, where
        `prompts` must switch to a new segment.
        """
        opening = prompts.at(resume.chunk if resume else 0)
        if opening is None:
            return
        segment, context = opening[0], self._context(opening[1])  # context: [B, text_len, text_dim]
        batch = context.shape[0]
        memory = self._memory(batch, interactive=interactive)
        text = TextCache(self.model.config, batch, self.device, self.dtype)
        history = self._history(batch)  # the last `window` latent frames, for a re-cache
        run_pass = self.passes(self.run_pass) if self.passes else self.run_pass
        chunk = 0
        if resume is not None:  # the state before the switch at resume.chunk, which the loop then makes
            chunk, segment = self._resumed(resume, segment, memory, history, noise)
        while True:
            # 1. prompt switch: new text, recent frames re-encoded under it
            if chunk > 0:
                now = prompts.at(chunk)
                wanted = boundaries is not None and (last_boundary is None or chunk <= last_boundary)
                # a point a story could switch at: this one switches, ends here (and may be appended to), or is asked
                point = now is None or now[0] != segment or chunk in switchable
                if wanted and point:
                    boundaries(_boundary(chunk, segment, history, memory, noise))
                if now is None:
                    return
                if now[0] != segment:
                    segment, context = now[0], self._context(now[1])
                    self._recache(chunk, context, memory, text, history)

            # 2. what the chunk attends to (the bank takes its staged prototype first), and its prompt's text
            passes = memory.begin_chunk(chunk, text)
            if not text.valid:
                self.model.embed_text(context, text)
            state = self._state(passes, memory, text)

            # 3. denoise the chunk, one pass per step
            x0 = self._denoise(run_pass, state, noise, chunk)

            # 4. write the clean chunk into the cache; the memory stages it for the bank when the chunk records
            run_pass(x0, float(self.settings.sampler.context_noise), state)
            memory.end_chunk(passes, chunk)
            _push(history, x0)
            yield x0
            chunk += 1

    def _resumed(
        self, state: BoundaryState, segment: int, memory: KVMemory, history: torch.Tensor, noise: NoiseSource
    ) -> tuple[int, int]:
        """Take a boundary's state; returns (its chunk, the segment before it)."""
        if state.chunk < 1 or segment == state.segment:
            raise ValueError(f"a stream resumes only where the prompt switches; chunk {state.chunk} does not")
        if tuple(state.history.shape) != tuple(history.shape):
            raise ValueError(f"latent history {list(state.history.shape)} does not fit {list(history.shape)}")
        memory.restore(state.memory)
        history.copy_(state.history)
        _resumable(noise).restore(state.noise)
        return state.chunk, state.segment

    def _history(self, batch: int) -> torch.Tensor:
        """Zeros [B, window, C, h, w]: room for the most recent `window` latent frames."""
        frame = self.settings.geometry.latent_shape(1)[1:]
        return torch.zeros((batch, self.settings.memory.window, *frame), device=self.device, dtype=self.dtype)

    def _context(self, embeds: torch.Tensor) -> torch.Tensor:
        """One prompt's embeddings as [B, text_len, text_dim] on the device, zero rows up to the text length."""
        text_len = self.model.config.text_len
        context = embeds.to(self.device, self.dtype)
        if context.dim() == 2:
            context = context[None]  # [B=1, T, D]
        if context.shape[1] < text_len:  # zero rows up to the text length, as the text encoder pads
            context = torch.nn.functional.pad(context, (0, 0, 0, text_len - context.shape[1]))
        return context

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


def _resumable(noise: NoiseSource) -> ResumableNoise:
    if not (hasattr(noise, "state") and hasattr(noise, "restore")):
        raise TypeError(f"{type(noise).__name__} cannot save its place: snapshots need a SeededNoise")
    return noise  # type: ignore[return-value]


def _boundary(chunk: int, segment: int, history: torch.Tensor, memory: KVMemory, noise: NoiseSource) -> BoundaryState:
    return BoundaryState(chunk, segment, history.clone(), memory.kept_state(), _resumable(noise).state())


def _push(history: torch.Tensor, x0: torch.Tensor) -> None:
    """Shift the recent latent frames [B, window, C, h, w] left by a chunk and put the chunk x0 last."""
    frames = x0.shape[1]
    history[:, :-frames] = history[:, frames:].clone()
    history[:, -frames:] = x0
