"""Reading the parity fixtures (official MemFlow outputs on tiny random weights) into our settings."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from memflow_cli.checkpoint import load_transformer
from memflow_cli.generator import BoundaryState, MemFlowGenerator, ScriptedPrompts
from memflow_cli.model.transformer import CausalWanTransformer
from memflow_cli.settings import GenerationSettings, LoraSettings, MemorySettings, SamplerSettings, VideoGeometry

ROOT = Path(__file__).resolve().parent.parent
PARITY_DIR = Path(os.environ.get("MEMFLOW_PARITY_DIR", ROOT.parent / "shared" / "parity" / "public"))
REQUIRED = "MEMFLOW_PARITY_DIR" in os.environ or os.environ.get("CI", "").lower() in ("1", "true")


class FixedNoise:
    """Noise given up front, in the parity fixtures' layout (a `generator.NoiseSource`).

    noise: [B, T, C, h, w] for all latent frames; renoise: [chunks * (steps - 1), F, C, h, w].
    """

    def __init__(self, noise: torch.Tensor, renoise: torch.Tensor, frames_per_chunk: int, steps: int):
        self.noise, self.renoise_all = noise, renoise
        self.frames, self.transitions = frames_per_chunk, steps - 1

    def initial(self, chunk: int) -> torch.Tensor:
        return self.noise[:, chunk * self.frames : (chunk + 1) * self.frames]

    def renoise(self, chunk: int, step: int) -> torch.Tensor:
        return self.renoise_all[chunk * self.transitions + step][None]

    def state(self) -> torch.Tensor:
        """Nothing to keep: the noise is looked up by chunk (a `generator.ResumableNoise`)."""
        return torch.empty(0, dtype=torch.uint8)

    def restore(self, state: torch.Tensor) -> None:
        pass


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


def manifest() -> dict:
    path = PARITY_DIR / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {"scenarios": {}}


# The scenario test_parity.py also resumes from a snapshot at full resolution (its render is reused).
RESUMED = "three_prompts"
# The scenarios are shared out over files, which pytest-xdist's --dist loadfile gives to its workers whole: the
# resumed one's family (`families`: it and the scenarios it forks from or that fork from it, each rendered once,
# the forks from their parents' states) in test_parity.py, the other families in turn in the share files
# (test_parity_share_1.py, ...), so that two workers get about the same time, each rendering only its own.
SHARES = 1


def first_switch(man: dict, scenario: dict) -> int | None:
    """The chunk of a scenario's first prompt switch; None where it has none."""
    chunks = switch_chunks_from_frames(scenario["switch_frames"], man["frames_per_chunk"])
    return chunks[0] if chunks else None


def forks_from(man: dict, name: str) -> tuple[str, int] | None:
    """(parent, k): a scenario whose first k chunks are scenario `name`'s, computed the same way, k being `name`'s
    first switch; `name` then resumes from the parent's state at chunk k (`MemFlowGenerator.stream`'s
    `switchable`). None where no scenario is such a parent.

    A parent has the same settings but for its prompts and switches, the same first prompt, enough frames, no
    switch before k, and a memory that records those chunks as `name`'s does (every chunk, or interactive as
    `name` is); it forks from none itself. Of two scenarios switching at the same chunk only the later-named
    can fork from the other, so no two fork from each other.
    """
    scenarios = man["scenarios"]
    scenario, k = scenarios[name], first_switch(man, scenarios[name])
    if k is None:
        return None

    def shared_part(s: dict) -> dict:
        return {key: value for key, value in s.items() if key not in ("prompts", "switch_frames", "frames")}

    def is_parent(other: str) -> bool:
        candidate = scenarios[other]
        other_first = first_switch(man, candidate)
        return (
            shared_part(candidate) == shared_part(scenario)
            and candidate["prompts"][0] == scenario["prompts"][0]
            and candidate.get("frames", man["frames"]) >= k * man["frames_per_chunk"]
            and (other_first is None or (other_first, other) > (k, name))
            and (candidate["record_interval"] == 1 or other_first is not None)
            and forks_from(man, other) is None  # ends: each step asks about a scenario switching later
        )

    return next(((other, k) for other in sorted(scenarios) if other != name and is_parent(other)), None)


def fork_points(man: dict, parent: str) -> set[int]:
    """The chunks where scenarios fork from `parent` (`forks_from`)."""
    forks = (forks_from(man, name) for name in man["scenarios"])
    return {fork[1] for fork in forks if fork is not None and fork[0] == parent}


def families(man: dict) -> list[list[str]]:
    """The scenarios grouped with those they fork from (`forks_from`), each family sorted, in sorted order."""
    family = {name: {name} for name in man["scenarios"]}
    for name in sorted(man["scenarios"]):
        if (fork := forks_from(man, name)) is not None:
            joined = family[name] | family[fork[0]]
            for member in joined:
                family[member] = joined
    return [list(members) for members in sorted({tuple(sorted(members)) for members in family.values()})]


def resumed_family(man: dict) -> list[str]:
    """The scenarios test_parity.py renders: `RESUMED` and its family (none without fixtures)."""
    return next((f for f in families(man) if RESUMED in f), [])


def scenario_share(man: dict, share: int) -> list[str]:
    """Share `share` (1 .. SHARES) of the scenarios outside `RESUMED`'s family: the families taken in turn."""
    others = [f for f in families(man) if RESUMED not in f]
    return [name for f in others[share - 1 :: SHARES] for name in f]


def scenario_settings(man: dict, scenario: dict) -> GenerationSettings:
    channels, latent_h, latent_w = man["latent_shape"]
    geometry = VideoGeometry(
        height=latent_h * VideoGeometry.vae_stride_hw,
        width=latent_w * VideoGeometry.vae_stride_hw,
        latent_channels=channels,
        frames_per_chunk=man["frames_per_chunk"],
    )
    memory = MemorySettings(
        mode=scenario.get("memory", "nam"),
        window=scenario["local_attn_size"],
        sink=scenario["sink_size"],
        bank_size=scenario["bank_size"],
        record_interval=scenario["record_interval"],
        sma=scenario["sma"],
    )
    sampler = SamplerSettings(steps=tuple(scenario["denoising_step_list"]))
    return GenerationSettings(memory=memory, sampler=sampler, geometry=geometry)


def lora_settings(man: dict) -> LoraSettings:
    return LoraSettings(rank=man["lora"]["rank"], alpha=man["lora"]["alpha"])


def prompt_embeds(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Embeddings in float32 with every row past a prompt's length zeroed, as the text encoder gives them."""
    embeds = inputs["prompt_embeds"].float().clone()
    for i, length in enumerate(inputs["prompt_lens"].tolist()):
        embeds[i, length:] = 0
    return embeds


def load_inputs() -> dict[str, torch.Tensor]:
    return load_file(PARITY_DIR / "inputs.safetensors")


def fixed_noise(inputs: dict[str, torch.Tensor], settings: GenerationSettings) -> FixedNoise:
    steps = len(settings.sampler.steps)
    return FixedNoise(inputs["noise"].float(), inputs["renoise"].float(), settings.geometry.frames_per_chunk, steps)


def switch_chunks(scenario: dict, settings: GenerationSettings) -> tuple[int, ...]:
    return switch_chunks_from_frames(scenario["switch_frames"], settings.geometry.frames_per_chunk)


def relative_l2(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return float((ours.double() - expected.double()).norm() / expected.double().norm())


def load_float32_model() -> CausalWanTransformer:
    """The fixture's transformer through our own checkpoint loader, in float32 on CPU."""
    config = PARITY_DIR / "config.json"
    return load_transformer(
        PARITY_DIR / "base.pt",
        PARITY_DIR / "lora.pt",
        config if config.is_file() else None,
        lora_settings(manifest()),
        dtype=torch.float32,
    )


@dataclass(frozen=True)
class Rendered:
    """A scenario rendered by our generator: its latent chunks [B, F, C, h, w] and the state at every boundary
    (each switch, before it runs, and the end)."""

    chunks: tuple[torch.Tensor, ...]
    boundaries: tuple[BoundaryState, ...]


class ParityRenders:
    """Each scenario rendered once per process, from the fixture's embeddings and noise, in float32 on CPU,
    through `MemFlowGenerator.generate` (about a minute each on one core): test_parity.py compares the chunks
    and resumes one from a boundary. The model loads on first use."""

    def __init__(self):
        self._model: CausalWanTransformer | None = None
        self._inputs: dict[str, torch.Tensor] | None = None
        self._rendered: dict[str, Rendered] = {}

    @property
    def model(self) -> CausalWanTransformer:
        if self._model is None:
            self._model = load_float32_model()
        return self._model

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        if self._inputs is None:
            self._inputs = load_inputs()
        return self._inputs

    def scenario(self, name: str) -> Rendered:
        if name not in self._rendered:
            self._rendered[name] = self._render(name)
        return self._rendered[name]

    def _render(self, name: str) -> Rendered:
        """The scenario through `generate`; a fork (`forks_from`) from its parent's state at its first switch."""
        man = manifest()
        scenario = man["scenarios"][name]
        settings = scenario_settings(man, scenario)
        frames = scenario.get("frames", man["frames"])
        embeds = prompt_embeds(self.inputs)[scenario["prompts"]]
        switches = switch_chunks(scenario, settings)
        boundaries: list[BoundaryState] = []
        generator = MemFlowGenerator(self.model, settings)
        noise = fixed_noise(self.inputs, settings)
        if (fork := forks_from(man, name)) is None:
            chunks = generator.generate(
                embeds, frames // settings.geometry.frames_per_chunk, noise, switches,
                boundaries=boundaries.append, switchable=fork_points(man, name),
            )  # fmt: skip
            return Rendered(tuple(chunks), tuple(boundaries))
        parent, k = fork
        before = self.scenario(parent)
        state = next(point for point in before.boundaries if point.chunk == k)
        prompts = ScriptedPrompts(embeds, switches, frames // settings.geometry.frames_per_chunk)
        chunks = generator.stream(prompts, noise, interactive=True, resume=state, boundaries=boundaries.append)
        return Rendered(before.chunks[:k] + tuple(chunks), tuple(boundaries))


BAR = 1e-4  # relative L2 to the official latents, over the whole video and for each chunk


def assert_matches_official(name: str, renders: ParityRenders) -> None:
    """Scenario `name`, as `renders` rendered it, within `BAR` of the official latents, whole and per chunk."""
    man = manifest()
    per_chunk = man["frames_per_chunk"]
    frames = man["scenarios"][name].get("frames", man["frames"])
    expected = load_file(PARITY_DIR / f"expected_{name}.safetensors")["latents"][:, :frames]

    chunks = renders.scenario(name).chunks

    errors = [relative_l2(chunk, expected[:, i * per_chunk : (i + 1) * per_chunk]) for i, chunk in enumerate(chunks)]
    assert max(errors) <= BAR, f"per-chunk relative L2 errors: {[f'{e:.2e}' for e in errors]}"
    assert relative_l2(torch.cat(chunks, dim=1), expected) <= BAR


def fast_path_error(
    name: str, device: torch.device, dtype: torch.dtype, *, compile: bool | None, fp8: bool = False, glue: bool = False
):
    """Run scenario `name` through the fast path chosen for (device, dtype); returns (its relative L2, the model).

    The model is loaded as render loads it and run with the whole fast path (`compile`: None the graphed
    default, True compiled steps, both with CUDA graphs, False plain eager; FP8 layers where `fp8`; the fused
    Triton glue where `glue`); the error is against the float32 expectation.
    """
    from memflow_cli.loading import read_transformer_config
    from memflow_cli.speed import choose_fast_path

    man, d = manifest(), PARITY_DIR
    config = read_transformer_config(d / "config.json")
    fast = choose_fast_path(config, device, dtype, compile=compile, fp8=fp8, glue=glue)
    model = load_transformer(
        d / "base.pt", d / "lora.pt", config, lora_settings(man), device=device, dtype=dtype, kernels=fast.kernels
    )
    scenario = man["scenarios"][name]
    settings = scenario_settings(man, scenario)
    inputs = load_inputs()
    frames = scenario.get("frames", man["frames"])
    expected = load_file(d / f"expected_{name}.safetensors")["latents"][:, :frames]
    generator = MemFlowGenerator(model, settings, passes=fast.graphed_passes)
    with fast.sdpa_priority():
        chunks = generator.generate(
            prompt_embeds(inputs)[scenario["prompts"]],
            frames // settings.geometry.frames_per_chunk,
            fixed_noise(inputs, settings),
            switch_chunks(scenario, settings),
        )
        latents = torch.cat([c.float().cpu() for c in chunks], dim=1)
    return relative_l2(latents, expected), model
