"""`--model random`'s parts: the full-size random umT5 (built here at a tiny size) and the engine option."""

from __future__ import annotations

import pytest
import torch
from transformers import UMT5Config

from memflow_cli.engine import load_engine
from memflow_cli.random_model import UMT5_XXL, random_text_encoder

TINY = UMT5Config(
    vocab_size=UMT5_XXL.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
    relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
)  # fmt: skip


def test_the_full_size_config_is_umt5_xxl():
    config = UMT5_XXL
    assert (config.vocab_size, config.d_model, config.d_ff, config.num_layers, config.num_heads) == (
        256384, 4096, 10240, 24, 64,
    )  # fmt: skip
    assert config.d_kv * config.num_heads == config.d_model


def test_random_text_encoder_is_seeded_lives_on_the_cpu_and_pads_with_zeros():
    first = random_text_encoder(torch.device("cpu"), torch.float32, TINY, max_length=64)
    second = random_text_encoder(torch.device("cpu"), torch.float32, TINY, max_length=64)
    assert first.device.type == "cpu" and first.dtype == torch.float32
    assert first.describe() == "umT5 2 layers x 32"
    embedding = first.encoder.get_input_embeddings().weight
    assert embedding.shape == (256384, 32) and embedding.data_ptr() == first.encoder.shared.weight.data_ptr()

    prompts = ["a red fox trots across a snowy field", "night falls"]
    embeds = first.encode(prompts)
    assert embeds.shape == (2, 64, 32) and torch.isfinite(embeds).all()
    assert torch.equal(embeds, second.encode(prompts))  # the same seed, the same weights
    lengths = first.tokenize(prompts)[1].sum(dim=1)
    for row, length in zip(embeds, lengths, strict=True):
        assert row[:length].abs().sum() > 0 and torch.count_nonzero(row[length:]) == 0


def test_only_the_random_model_takes_a_full_size_text_encoder():
    with pytest.raises(ValueError, match="only the random model"):
        load_engine("demo", "cpu", full_text_encoder=True)
