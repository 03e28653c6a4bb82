"""TextEncoder on a tiny random umT5 with the demo tokenizer: cleaning, padding, EOS, truncation."""

from __future__ import annotations

import pytest
import torch
from transformers import UMT5EncoderModel

from memflow_cli.demo import build_demo_tokenizer
from memflow_cli.text_encoder import TextEncoder, clean_prompt

MAX_LENGTH = 24


@pytest.fixture
def text_encoder(tokenizer, umt5) -> TextEncoder:
    return TextEncoder(tokenizer, umt5, max_length=MAX_LENGTH)


def test_clean_prompt_unescapes_twice_and_collapses_whitespace():
    assert clean_prompt("  Tom &amp;amp; Jerry\n\t run  ") == "Tom & Jerry run"
    assert clean_prompt("a&nbsp;&lt;b&gt;") == "a <b>"
    assert clean_prompt("\u3000wide\u2003 space ") == "wide space"


def test_clean_prompt_fixes_mojibake():
    assert clean_prompt("cafÃ© on the beach") == "café on the beach"


def test_encode_shape_dtype_and_device(text_encoder):
    embeds = text_encoder.encode(["a dog runs", "a cat sleeps on a sunny windowsill"])
    assert embeds.shape == (2, MAX_LENGTH, 32)
    assert embeds.dtype == torch.float32 and embeds.device.type == "cpu"


def test_padding_rows_are_exactly_zero_and_eos_is_counted(text_encoder, tokenizer):
    prompt = "a small dog runs across a green meadow"
    ids, mask = text_encoder.tokenize([prompt])
    words = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    length = int(mask.sum())
    assert length == len(words) + 1  # EOS appended and counted
    assert ids[0, length - 1] == tokenizer.eos_token_id
    assert (ids[0, length:] == 0).all()  # pad id 0

    embeds = text_encoder.encode([prompt])[0]
    assert (embeds[length:] == 0).all()
    assert (embeds[:length].abs().sum(dim=1) > 0).all()


def test_truncation_keeps_eos_at_max_length(text_encoder, tokenizer):
    prompt = " ".join(["the camera slowly pans over snowy mountains"] * 10)
    ids, mask = text_encoder.tokenize([prompt])
    assert ids.shape == (1, MAX_LENGTH) and int(mask.sum()) == MAX_LENGTH
    assert ids[0, -1] == tokenizer.eos_token_id
    assert (text_encoder.encode([prompt])[0].abs().sum(dim=1) > 0).all()


def test_prompts_are_cleaned_before_tokenizing(text_encoder):
    messy = text_encoder.encode(["  a knight &amp;amp;\n a   horse "])
    clean = text_encoder.encode(["a knight & a horse"])
    assert torch.equal(messy, clean)


def test_encode_is_deterministic_and_batch_independent(text_encoder):
    prompts = ["a red coat", "rain drips from the roof of a small cottage", "fog"]
    batch = text_encoder.encode(prompts, batch_size=2)
    assert torch.equal(batch, text_encoder.encode(prompts, batch_size=2))
    for i, prompt in enumerate(prompts):
        torch.testing.assert_close(batch[i], text_encoder.encode([prompt])[0])


def test_by_default_each_prompt_is_encoded_alone_as_the_official_inference_encodes_it(text_encoder, monkeypatch):
    # on a GPU a batch of several runs other matrix kernels: the bits of a prompt would depend on its neighbours
    batches: list[int] = []
    encode_tokens = text_encoder.encode_tokens

    def spy(ids, mask):
        batches.append(ids.shape[0])
        return encode_tokens(ids, mask)

    monkeypatch.setattr(text_encoder, "encode_tokens", spy)
    together = text_encoder.encode(["a red coat", "rain drips from the roof of a small cottage", "fog"])
    assert batches == [1, 1, 1]
    assert torch.equal(together[2], text_encoder.encode(["fog"])[0])


def test_keep_on_device_returns_the_encoder_dtype(tokenizer, umt5):
    half = TextEncoder(tokenizer, UMT5EncoderModel(umt5.config).to(torch.bfloat16), max_length=MAX_LENGTH)
    embeds = half.encode(["a cat"], keep_on_device=True)
    assert embeds.dtype == torch.bfloat16
    assert half.encode(["a cat"]).dtype == torch.float32


def test_offload_and_to_move_the_encoder(text_encoder):
    assert text_encoder.offload() is text_encoder
    assert text_encoder.to("cpu").device.type == "cpu"


def test_from_pretrained_loads_the_diffusers_layout(tmp_path, text_encoder, tokenizer, umt5):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    umt5.save_pretrained(tmp_path / "text_encoder")
    loaded = TextEncoder.from_pretrained(tmp_path, max_length=MAX_LENGTH)
    prompts = ["a beekeeper lifts a frame", "two friends ride bicycles"]
    torch.testing.assert_close(loaded.encode(prompts), text_encoder.encode(prompts))


def test_rejects_a_tokenizer_that_does_not_pad_with_zero(umt5):
    tokenizer = build_demo_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    with pytest.raises(ValueError, match="pad"):
        TextEncoder(tokenizer, umt5)
