"""Prompts longer than the text encoder reads: which segments are cut, and after which word.

The text encoder reads the first `max_length` tokens of a prompt, its end-of-sequence token included (512
for umT5 in the release, 256 for the demo model), and silently drops the rest: a prompt of ten thousand
words steers the video with its first few hundred. `prompt_cuts` finds such prompts before anything renders.

Counting is exact with the model's tokenizer, as a `TokenCounter`: `counter_from_tokenizer` wraps a loaded
transformers tokenizer (what `render` has), `load_token_counter` reads a `tokenizer.json` with the
`tokenizers` library alone (what `check` can afford: no torch, no transformers). Without either,
`estimate_tokens` counts roughly and on the high side for prose: a run of ASCII letters counts one token
for every four letters, every digit and punctuation mark one, a letter of another script one, a symbol or
emoji one per UTF-8 byte. That makes about 1.7 tokens per English word on the shared stories, where a
sentencepiece vocabulary as large as umT5's typically needs 1.2 to 1.5 (not measured here: no umT5
tokenizer ships with the tests), so an estimate may warn about a prompt that just fits rather than miss one
that does not. Its cuts say "about" and `PromptCut.exact` is False. The demo model's tiny BPE tokenizer
needs more tokens than the estimate for words it was not trained on: count with it where it is loaded.

Nothing here imports torch.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .script import format_seconds

TokenCounter = Callable[[str], int]  # tokens of one prompt as the encoder reads it, end-of-sequence included

END_OF_SEQUENCE = 1  # tokens the encoder appends to every prompt (umT5's </s>)
CONTEXT_WORDS = 6  # words shown before a cut
CONTEXT_CHARS = 60  # at most this many characters of them
COUNTED_CHARS = 200_000  # a longer prompt's tokens are counted in its head (see _cut)
COUNTED_LIMITS = 2  # the head where a prompt's cut is looked for holds twice the limit's tokens (see prompt_head)
# The head of a prompt kept for N tokens: whitespace parts words, and a word is a token or more, a token a few
# characters; 4 words and 256 characters a token leave room for words the cleaning or the tokenizer drop. That is
# a bound by construction only with a check: the text encoder tokenises a longer head where one falls short
# (`TextEncoder.tokenize`). A prompt shorter than its head is its own head.
HEAD_WORDS_PER_TOKEN = 4
HEAD_CHARS_PER_TOKEN = 256

_PIECE = re.compile(r"[A-Za-z]+|\S")
_WORD = re.compile(r"\S+")


def prompt_head(text: str, tokens: int) -> str:
    """The start of `text` that holds its first `tokens` tokens and more (whole words where it can): `text` itself
    unless it is longer. Read in time and memory of the head, not of `text`: a prompt of millions of words is
    tokenised, cleaned and counted by its head alone."""
    words, chars = HEAD_WORDS_PER_TOKEN * tokens, HEAD_CHARS_PER_TOKEN * tokens
    for count, word in enumerate(_WORD.finditer(text), start=1):
        chars -= len(word.group())
        if chars < 0:  # within a long run of characters without whitespace (a CJK prompt)
            return text[: word.end() + chars]
        if (count == words or chars == 0) and _WORD.search(text, word.end()):  # more words follow
            return text[: word.end()]
    return text


class _SegmentLike(Protocol):
    prompt: str
    start_s: float


@dataclass(frozen=True)
class PromptCut:
    """A prompt the text encoder does not read to its end."""

    segment: int  # index of the segment in the story
    start_s: float  # where the segment starts, as written
    words: int  # words of the prompt
    tokens: int  # tokens of the whole prompt, end-of-sequence included (estimated when not `exact`)
    limit: int  # tokens the encoder reads
    kept_words: int  # words read before the cut: words[kept_words:] are dropped
    last_kept: str  # the few words just before the cut
    exact: bool  # counted by the model's tokenizer, not estimated
    at_least: bool = False  # `tokens` is a lower bound, counted in the prompt's head (`prompt_head`)

    def describe(self) -> str:
        """One line for a warning, such as `segment 2 (at 20s): 10000 words, 13012 tokens; ...`."""
        about = "" if self.exact else "about "
        counted = f"{self.tokens} tokens" if self.exact else f"about {self.tokens} tokens by a rough count"
        if self.at_least:
            counted = f"at least {self.tokens} tokens" + ("" if self.exact else " by a rough count")
        start = format_seconds(self.start_s)
        where = "the start of its first word"
        if self.kept_words:
            where = f"{about}word {self.kept_words} ('...{self.last_kept}')"
        dropped = "dropped" if self.exact else "likely dropped"
        return (
            f"segment {self.segment} (at {start}): {self.words} words, {counted}; the text encoder reads "
            f"{self.limit}, so everything after {where} is {dropped}"
        )


def prompt_cuts(story: Any, limit: int, count: TokenCounter | None = None) -> list[PromptCut]:
    """The segments of `story` (a Story, a Timeline, or their segments) whose prompts exceed `limit` tokens.

    `count` is the model's tokenizer as a `TokenCounter`; without it the counts are estimates.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < END_OF_SEQUENCE + 1:
        raise ValueError(f"the token limit must be a whole number of at least 2, got {limit!r}")
    segments: Iterable[_SegmentLike] = getattr(story, "segments", story)
    cuts = []
    for position, segment in enumerate(segments):
        index = getattr(segment, "index", position)
        if (cut := _cut(index, segment, limit, count)) is not None:
            cuts.append(cut)
    return cuts


def _cut(index: int, segment: _SegmentLike, limit: int, count: TokenCounter | None) -> PromptCut | None:
    """The cut is looked for in the prompt's head (`prompt_head`), and a prompt of more than COUNTED_CHARS
    characters is counted there alone (its count then a lower bound): time and memory stay bounded."""
    head = prompt_head(segment.prompt, COUNTED_LIMITS * limit)
    counted = segment.prompt if len(segment.prompt) <= COUNTED_CHARS else head
    at_least = len(counted) < len(segment.prompt.rstrip())
    words = counted.split()
    if count is None:
        per_word = [estimate_tokens(word) - END_OF_SEQUENCE for word in words]
        tokens = END_OF_SEQUENCE + sum(per_word)
        if tokens <= limit:
            return None
        kept, total = 0, END_OF_SEQUENCE
        while total + per_word[kept] <= limit:  # the cut falls inside the head, so this stops in range
            total += per_word[kept]
            kept += 1
    else:
        tokens = count(" ".join(words))  # whitespace as the encoder's cleaning leaves it
        if tokens <= limit:
            return None
        kept = _words_that_fit(words if head is counted else head.split(), limit, count)  # split once if one text
    total_words = sum(1 for _ in _WORD.finditer(segment.prompt)) if at_least else len(words)  # no list of them
    last = " ".join(words[max(0, kept - CONTEXT_WORDS) : kept])[-CONTEXT_CHARS:]
    return PromptCut(index, segment.start_s, total_words, tokens, limit, kept, last, count is not None, at_least)


def _words_that_fit(words: list[str], limit: int, count: TokenCounter) -> int:
    """The most leading of `words` whose text still fits `limit` tokens, all of them not (binary search: a few
    dozen counts, of at most about `limit` words each where every word is a token or more)."""
    low, high = 0, min(len(words), limit)
    while high < len(words) and count(" ".join(words[:high])) <= limit:  # words the tokenizer dropped
        low, high = high, min(len(words), 2 * high)
    # words[:low] fits, words[:high] does not
    while high - low > 1:
        middle = (low + high) // 2
        if count(" ".join(words[:middle])) <= limit:
            low = middle
        else:
            high = middle
    return low


def estimate_tokens(text: str) -> int:
    """A rough token count of `text` with end-of-sequence, meant to err high for umT5 on ordinary prose."""
    return END_OF_SEQUENCE + sum(_piece_tokens(piece) for piece in _PIECE.findall(text))


def _piece_tokens(piece: str) -> int:
    if piece.isascii():
        return math.ceil(len(piece) / 4) if piece.isalpha() else 1
    if unicodedata.category(piece)[0] in "LM":  # a letter of another script: umT5 knows most of them
        return 1
    return len(piece.encode("utf-8"))  # a symbol or emoji may fall back to one token per byte


def counter_from_tokenizer(tokenizer: Any) -> TokenCounter:
    """A `TokenCounter` from a loaded transformers tokenizer (the one `TextEncoder.tokenizer` holds)."""

    def count(text: str) -> int:
        ids = tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return len(ids)

    return count


def load_token_counter(folder: Path | str) -> TokenCounter | None:
    """A `TokenCounter` from `folder/tokenizer.json`, or None when there is none or it cannot be read.

    Uses the `tokenizers` library only, so it costs no torch import. A tokenizer whose file adds no
    end-of-sequence token itself gets one counted, as the encoder's tokenizer appends it.
    """
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception:  # a broken or foreign file: the caller falls back to the estimate and says so
        return None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    extra = 0 if tokenizer.post_processor is not None else END_OF_SEQUENCE

    def count(text: str) -> int:
        return len(tokenizer.encode(text).ids) + extra

    return count
