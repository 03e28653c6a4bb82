"""The parts of `--model random` (`engine._random_engine`) that are not the transformer: a seeded VAE and
prompts as seeded noise.

Nothing is loaded or downloaded, so throughput (on one GPU or many) can be measured anywhere; the video is
noise and `RANDOM_NOTICE` says so on the terminal and in every sidecar. The weights come from fixed seeds,
so every process of a torchrun job builds the same model. The 5B-parameter text encoder is not built:
prompts become seeded random embeddings of the real encoder's shape (its cost is once per prompt anyway).
"""

from __future__ import annotations

import hashlib

import torch

RANDOM = "random"
RANDOM_NOTICE = "random model: full-size random weights, nothing loaded - the video is noise, for speed measurements"


class NoiseTextEncoder:
    """Prompt -> [text_len, text_dim] random embeddings seeded by the prompt's text (same prompt, same rows).

    Shaped like umT5's output: a quarter of the rows carry values, the rest are padding zeros.
    """

    def __init__(self, text_len: int, text_dim: int):
        self.text_len, self.text_dim = text_len, text_dim

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return torch.stack([self._embedding(prompt) for prompt in prompts])

    def _embedding(self, prompt: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little")
        generator = torch.Generator().manual_seed(seed)
        embeds = torch.randn((self.text_len, self.text_dim), generator=generator) * 0.1
        embeds[self.text_len // 4 :] = 0
        return embeds

    def to(self, device: torch.device | str) -> NoiseTextEncoder:
        return self

    def offload(self) -> NoiseTextEncoder:
        return self


def random_vae(device: torch.device, dtype: torch.dtype):
    """The Wan2.1 VAE with weights drawn from seed 0 (diffusers' own initialisation)."""
    from diffusers import AutoencoderKLWan

    from .weights import WAN21_VAE_CONFIG

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKLWan(**WAN21_VAE_CONFIG)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)

