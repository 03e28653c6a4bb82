"""The parts of `--model random` (`engine._random_engine`) that are not the transformer: a seeded VAE and
prompts as seeded noise.

Nothing is loaded or downloaded, so throughput (on one GPU or many) can be measured anywhere; the video is
noise and `RANDOM_NOTICE` says so on the terminal and in every sidecar. The weights come from fixed seeds,
so every process of a torchrun job builds the same model. By default the 5.7B-parameter text encoder is
not built: prompts become seeded random embeddings of the real encoder's shape (its cost is once per
prompt anyway). `random_text_encoder` builds it at full size, for measuring what a whole render needs.
"""

from __future__ import annotations

import hashlib

import torch
from transformers import UMT5Config, UMT5EncoderModel

from .text_encoder import TextEncoder

RANDOM = "random"
# umT5-XXL's encoder as Wan2.1 releases it (`models_t5_umt5-xxl-enc-bf16.pth`): 5.7B parameters, 11.4 GB in bf16
UMT5_XXL = UMT5Config(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)  # fmt: skip

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

    def describe(self) -> str:
        return "none (prompts become seeded noise)"

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


def random_text_encoder(
    device: torch.device, dtype: torch.dtype, config: UMT5Config = UMT5_XXL, max_length: int = 512
) -> TextEncoder:
    """umT5 (umT5-XXL by default) with seeded random weights, built and left on `device`.

    The engine builds it on first need, as it loads the real encoder, and leaves it on the GPU or sends it
    to the CPU after encoding as it does the real one (`prompt_embeds.py`), so its memory is a real
    render's. The demo tokenizer stands in for umT5's (ids fit the vocabulary; prompts are padded to
    `max_length` tokens either way).
    """
    from .demo import build_demo_tokenizer

    with torch.device("meta"):
        encoder = UMT5EncoderModel(config).to(dtype)  # in `dtype` before memory is taken: no float32 copy
    encoder = encoder.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    for param in encoder.parameters():
        if param.dim() == 1:  # the RMS norms' weights
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=generator)
    encoder.tie_weights()  # the input embedding is `shared`, one tensor
    return TextEncoder(build_demo_tokenizer(), encoder, max_length=max_length)
