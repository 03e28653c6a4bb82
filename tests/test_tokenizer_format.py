"""The umT5 tokenizer folder of `Wan-AI/Wan2.1-T2V-1.3B` (`google/umt5-xxl/`), in its own format.

The folder is built here as the release lays it out: a SentencePiece model (`spiece.model`, trained here,
small), its `tokenizer.json`, a `tokenizer_config.json` naming `T5Tokenizer` with `extra_ids: 100` and
`<extra_id_N>` additional special tokens, and `special_tokens_map.json`. Twice: with 100 such tokens, and
with 300 (the released tokenizer has 256,300 tokens for a SentencePiece vocabulary of 256,000; a count
that differs from `extra_ids` is what transformers refuses in Wan-Video/Wan2.1#157). memflow must load it with the
installed transformers (CI runs the suite at the lowest and the latest supported versions) and produce
what the official wrapper produces: SentencePiece's own ids, then EOS (id 1), padded with 0 to 512 or
truncated at 512 with EOS last, and the mask of the real tokens.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import UMT5Config, UMT5EncoderModel

from memflow_cli.text_encoder import DEFAULT_MAX_LENGTH, TextEncoder, load_tokenizer
from memflow_cli.weights import ModelFiles, load_text_encoder

from .test_weights import wan_t5_state

EXTRA_IDS = 100
PAD, EOS, UNK = 0, 1, 2
SPECIAL = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
SENTINEL_COUNTS = (100, 300)


def sentinels(count: int) -> list[str]:
    return [f"<extra_id_{i}>" for i in range(count)]

WORDS = (
    "a white lighthouse on a rocky cliff at sunset waves crash below the old keeper climbs the spiral "
    "staircase with a lantern gulls circle the tower storm clouds gather over the grey sea a small boat "
    "returns to the harbour children run along the beach their dog chases the ball into the surf"
).split()


def corpus() -> list[str]:
    """Sentences of the words above in many orders (deterministic)."""
    generator = torch.Generator().manual_seed(0)
    sentences = []
    for _ in range(400):
        picks = torch.randint(len(WORDS), (int(torch.randint(4, 16, (1,), generator=generator)),), generator=generator)
        sentences.append(" ".join(WORDS[i] for i in picks.tolist()))
    return sentences


def train_spiece() -> bytes:
    """A unigram SentencePiece model with T5's special ids: pad 0, eos 1, unk 2, no bos."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=model,
        model_type="unigram",
        vocab_size=180,
        hard_vocab_limit=False,
        character_coverage=1.0,
        normalization_rule_name="identity",
        pad_id=PAD,
        eos_id=EOS,
        unk_id=UNK,
        bos_id=-1,
        pad_piece=SPECIAL["pad_token"],
        eos_piece=SPECIAL["eos_token"],
        unk_piece=SPECIAL["unk_token"],
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def tokenizer_json(processor: spm.SentencePieceProcessor, sentinel_count: int) -> Tokenizer:
    """The fast tokenizer of the SentencePiece model, as in a T5 `tokenizer.json`: the unigram pieces and
    scores, a metaspace pre-tokenizer, EOS appended, and the extra ids as special tokens after the vocab
    (`<extra_id_99>` first, as in T5's files)."""
    pieces = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS)]
    )
    tokenizer.add_special_tokens([AddedToken(token, normalized=False) for token in SPECIAL.values()])
    tokenizer.add_special_tokens([AddedToken(token, normalized=False) for token in reversed(sentinels(sentinel_count))])
    return tokenizer


def write_umt5_tokenizer_folder(folder: Path, sentinel_count: int) -> spm.SentencePieceProcessor:
    """`google/umt5-xxl/` in the release's format, with a small SentencePiece model; returns its processor."""
    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(train_spiece())
    processor = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    tokenizer_json(processor, sentinel_count).save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "T5Tokenizer",
        "extra_ids": EXTRA_IDS,
        "additional_special_tokens": sentinels(sentinel_count),
        **SPECIAL,
        "model_max_length": 1000000000000000019884624838656,
        "sp_model_kwargs": {},
        "clean_up_tokenization_spaces": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_tokens = {**SPECIAL, "additional_special_tokens": sentinels(sentinel_count)}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens))
    return processor


@pytest.fixture(scope="module", params=SENTINEL_COUNTS, ids=[f"{n}-sentinels" for n in SENTINEL_COUNTS])
def umt5_folder(request, tmp_path_factory) -> tuple[Path, spm.SentencePieceProcessor, int]:
    folder = tmp_path_factory.mktemp("wan") / "google" / "umt5-xxl"
    return folder, write_umt5_tokenizer_folder(folder, request.param), request.param


@pytest.fixture(scope="module")
def text_encoder(umt5_folder) -> TextEncoder:
    folder, processor, sentinel_count = umt5_folder
    config = UMT5Config(vocab_size=processor.get_piece_size() + sentinel_count, d_model=16, d_kv=4, d_ff=32,
                        num_layers=1, num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=PAD,
                        eos_token_id=EOS, decoder_start_token_id=PAD)  # fmt: skip
    torch.manual_seed(0)
    return TextEncoder(load_tokenizer(folder), UMT5EncoderModel(config).eval())


def expected_ids(processor: spm.SentencePieceProcessor, prompt: str) -> tuple[list[int], int]:
    """What the official wrapper gives: SentencePiece's ids, EOS, truncated at 512 keeping EOS, padded with 0."""
    ids = processor.encode(prompt)[: DEFAULT_MAX_LENGTH - 1] + [EOS]
    return ids + [PAD] * (DEFAULT_MAX_LENGTH - len(ids)), len(ids)


PROMPTS = {
    "short": "a white lighthouse on a rocky cliff at sunset",
    "unseen words": "the keeper whistles softly beside a lantern",
    "one word": "gulls",
    "511 tokens": None,  # built from the model: exactly 511 pieces, so EOS lands on the last position
    "long": " ".join(WORDS * 12),  # far more than 512 pieces: truncated
}


def prompt_for(case: str, processor: spm.SentencePieceProcessor) -> str:
    if PROMPTS[case] is not None:
        return PROMPTS[case]
    words: list[str] = []
    while len(processor.encode(" ".join(words))) < DEFAULT_MAX_LENGTH - 1:
        words.append(WORDS[len(words) % len(WORDS)])
    while len(processor.encode(" ".join(words))) > DEFAULT_MAX_LENGTH - 1:
        words[-1] = "a"  # a one-piece word
        if len(processor.encode(" ".join(words))) > DEFAULT_MAX_LENGTH - 1:
            words.pop()
    return " ".join(words)


def test_the_folder_is_in_the_release_format(umt5_folder):
    folder, processor, sentinel_count = umt5_folder
    assert sorted(p.name for p in folder.iterdir()) == [
        "special_tokens_map.json", "spiece.model", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "T5Tokenizer" and config["extra_ids"] == 100
    assert config["additional_special_tokens"] == [f"<extra_id_{i}>" for i in range(sentinel_count)]
    assert [processor.pad_id(), processor.eos_id(), processor.unk_id(), processor.bos_id()] == [0, 1, 2, -1]


def test_the_loaded_tokenizer_keeps_the_special_ids(text_encoder, umt5_folder):
    _, processor, sentinel_count = umt5_folder
    tokenizer = text_encoder.tokenizer
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (PAD, EOS, UNK)
    assert len(tokenizer) == processor.get_piece_size() + sentinel_count
    extra = tokenizer.convert_tokens_to_ids(sentinels(sentinel_count))
    assert sorted(extra) == list(range(processor.get_piece_size(), processor.get_piece_size() + sentinel_count))


@pytest.mark.parametrize("case", list(PROMPTS))
def test_ids_are_sentencepiece_ids_then_eos_padded_to_512(text_encoder, umt5_folder, case):
    _, processor, _ = umt5_folder
    prompt = prompt_for(case, processor)
    ids, mask = text_encoder.tokenize([prompt])
    expected, length = expected_ids(processor, prompt)
    assert ids.shape == mask.shape == (1, DEFAULT_MAX_LENGTH) and ids.dtype == torch.int64
    assert ids[0].tolist() == expected
    assert mask[0].tolist() == [1] * length + [0] * (DEFAULT_MAX_LENGTH - length)
    if case == "511 tokens":
        assert length == DEFAULT_MAX_LENGTH and len(processor.encode(prompt)) == DEFAULT_MAX_LENGTH - 1
    if case == "long":
        assert len(processor.encode(prompt)) > DEFAULT_MAX_LENGTH and ids[0, -1] == EOS


def test_the_official_layout_loads_this_folder(umt5_folder, text_encoder, tmp_path):
    """`load_text_encoder` on the official layout: the umT5 `.pth` beside this tokenizer folder."""
    folder, processor, _ = umt5_folder
    t5_file = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(wan_t5_state(text_encoder.encoder), t5_file)
    files = ModelFiles(tmp_path / "base.pt", tmp_path / "lora.pt", t5_file, folder, tmp_path / "Wan2.1_VAE.pth")
    loaded = load_text_encoder(files, dtype=torch.float32)
    prompt = PROMPTS["short"]
    assert loaded.tokenize([prompt])[0][0].tolist() == expected_ids(processor, prompt)[0]
    torch.testing.assert_close(loaded.encode([prompt]), text_encoder.encode([prompt]), rtol=0, atol=0)
