"""Prompts longer than the text encoder reads: which segments are cut, after which word, exact or estimated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from memflow_cli.script import Segment, Story
from memflow_cli.settings import VideoGeometry
from memflow_cli.text_encoder import clean_prompt
from memflow_cli.tokens import (
    PromptCut,
    counter_from_tokenizer,
    estimate_tokens,
    load_token_counter,
    prompt_cuts,
)

from .scripts import NO_SHARED, SHARED_STORIES

REPO = Path(__file__).resolve().parents[1]


def one_token_per_word(text: str) -> int:
    """A tokenizer stand-in whose counts are obvious: a token per word, and the end-of-sequence token."""
    return len(text.split()) + 1


def story(*prompts: str) -> Story:
    segments = tuple(Segment(10.0 * index, prompt) for index, prompt in enumerate(prompts))
    return Story(Path("story.yaml"), "story", 0, 10.0 * len(prompts), segments)


def numbered(count: int) -> str:
    return " ".join(f"w{index}" for index in range(1, count + 1))


def test_a_prompt_that_fits_with_its_end_token_is_not_cut():
    assert prompt_cuts(story("a dog", numbered(255)), 256, one_token_per_word) == []


def test_one_token_too_many_cuts_the_last_word():
    (cut,) = prompt_cuts(story("a dog", numbered(256)), 256, one_token_per_word)
    assert cut == PromptCut(
        segment=1, start_s=10.0, words=256, tokens=257, limit=256, kept_words=255,
        last_kept="w250 w251 w252 w253 w254 w255", exact=True,
    )  # fmt: skip


def test_a_ten_thousand_word_prompt_says_where_it_is_cut():
    cuts = prompt_cuts(story("a dog", "a cat", numbered(10_000)), 512, one_token_per_word)
    assert [cut.describe() for cut in cuts] == [
        "segment 2 (at 20s): 10000 words, 10001 tokens; the text encoder reads 512, so everything after "
        "word 511 ('...w506 w507 w508 w509 w510 w511') is dropped"
    ]


def test_every_long_segment_is_reported_in_order():
    cuts = prompt_cuts(story(numbered(600), "short", numbered(513)), 512, one_token_per_word)
    assert [(cut.segment, cut.kept_words) for cut in cuts] == [(0, 511), (2, 511)]


def test_a_timeline_keeps_the_segment_numbers_of_its_story():
    timeline = story(numbered(5), numbered(600)).timeline(VideoGeometry())
    (cut,) = prompt_cuts(timeline, 512, one_token_per_word)
    assert (cut.segment, cut.start_s, cut.kept_words) == (1, 10.0, 511)


def test_a_first_word_longer_than_the_limit_is_named():
    (cut,) = prompt_cuts(story("x" * 4000), 512)
    assert cut.kept_words == 0
    assert cut.describe().endswith("so everything after the start of its first word is likely dropped")


def test_the_cut_matches_what_the_demo_tokenizer_keeps(tokenizer):
    count = counter_from_tokenizer(tokenizer)
    prompt = "The beekeeper lifts a frame covered with honeybees from the hive, then smiles. " * 100
    (cut,) = prompt_cuts(story(prompt), 256, count)
    words = prompt.split()
    assert cut.tokens == len(tokenizer(clean_prompt(prompt), verbose=False)["input_ids"]) > 256
    assert count(" ".join(words[: cut.kept_words])) <= 256 < count(" ".join(words[: cut.kept_words + 1]))
    # the encoder's truncated ids are the ids of the kept words, plus the start of the next one at most
    truncated = tokenizer(clean_prompt(prompt), truncation=True, max_length=256)["input_ids"]
    kept = tokenizer(" ".join(words[: cut.kept_words]))["input_ids"]
    assert truncated[: len(kept) - 1] == kept[:-1]


def test_tokenizer_json_counts_like_the_tokenizer_without_torch(tokenizer, tmp_path: Path):
    tokenizer.save_pretrained(tmp_path)
    count = load_token_counter(tmp_path)
    prompt = "A knight in silver armour rides a brown horse through a misty valley, 日本 🙂."
    assert count is not None and count(prompt) == len(tokenizer(prompt)["input_ids"])
    code = (
        "import sys; from memflow_cli.tokens import load_token_counter, prompt_cuts; "
        f"count = load_token_counter({str(tmp_path)!r}); "
        "print(count('a dog on a beach'), 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.stdout.split() == [str(len(tokenizer("a dog on a beach")["input_ids"])), "False", "False"]


def test_no_tokenizer_json_or_a_broken_one_gives_no_counter(tmp_path: Path):
    assert load_token_counter(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    assert load_token_counter(tmp_path) is None


def test_estimate_counts_words_letters_digits_scripts_and_symbols():
    assert estimate_tokens("") == 1
    assert estimate_tokens("a dog") == 3  # two short words and the end token
    assert estimate_tokens("photorealistic, 2024") == 1 + 4 + 1 + 4  # 14 letters, a comma, four digits
    assert estimate_tokens("日本 é") == 1 + 2 + 1
    assert estimate_tokens("🙂") == 1 + 4  # a symbol may fall back to its UTF-8 bytes


def test_an_estimated_cut_says_it_is_an_estimate():
    (cut,) = prompt_cuts(story("a dog", "walks " * 600), 512)
    assert not cut.exact and (cut.tokens, cut.kept_words) == (1 + 600 * 2, 255)
    assert cut.describe() == (
        "segment 1 (at 10s): 600 words, about 1201 tokens by a rough count; the text encoder reads 512, so "
        "everything after about word 255 ('...walks walks walks walks walks walks') is likely dropped"
    )


@pytest.mark.parametrize("path", SHARED_STORIES or [NO_SHARED], ids=lambda path: getattr(path, "name", "none"))
def test_the_shared_stories_fit_the_release_encoder_by_estimate(path: Path):
    from memflow_cli.script import load_scripts

    assert [cut for story in load_scripts(path) for cut in prompt_cuts(story, 512)] == []


@pytest.mark.parametrize("limit", [0, 1, 2.5, True])
def test_a_limit_below_two_tokens_is_refused(limit):
    with pytest.raises(ValueError, match="token limit"):
        prompt_cuts(story("a dog"), limit)
