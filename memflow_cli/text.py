"""Text from outside memflow (scripts, the page, stdin, paths): what may be kept, and how it is shown.

Two rules, used by every command:

- `text_problem` says why a text cannot be used: a lone surrogate (valid as a JSON or YAML escape, but no
  UTF-8 can hold it: the tokenizer, the sidecar and the terminal would all fail on it), or a control
  character other than the ones the caller allows (tab and newline in a prompt). Scripts and the page
  refuse such text where it is read.
- `shown` / `one_line` escape what a terminal would obey (escape sequences, carriage returns, bells,
  line and paragraph separators, bidirectional overrides) as `\\x1b`, `\\u2028`...; `one_line` escapes newlines
  and tabs too, for text printed inside one line. `SafeConsole` applies `shown` to every string it prints.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
import unicodedata

from rich.console import Console
from rich.text import Text

PROMPT_WHITESPACE = "\t\n"  # control characters a prompt may hold: they mean a space to the tokenizer
# characters that reorder what follows on a terminal: a file name or prompt could show another text than it holds
_REORDERING = "\u202a-\u202e\u2066-\u2069"  # embeddings, overrides, isolates: a regex class
_BIDI_CONTROLS = "\u061c\u200e\u200f" + _REORDERING  # those and the direction marks: escaped when shown


# C0, DEL and C1 controls, line and paragraph separators, lone surrogates: Unicode's categories Cc, Zl, Zp, Cs
_CONTROLS = "\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff"


@functools.cache
def _pattern(characters: str, allowed: str) -> re.Pattern[str]:
    """A regex of one character of the class `characters` that is not in `allowed` (searched at C speed)."""
    unless = f"(?![{re.escape(allowed)}])" if allowed else ""
    return re.compile(f"{unless}[{characters}]")


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def lone_surrogate(text: str) -> int | None:
    """The index of the first character UTF-8 cannot hold (half of a surrogate pair), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None


def text_problem(text: str, allowed: str = "") -> str | None:
    """Why `text` cannot be used, in a few words naming the character and where it is; None if it can."""
    index = lone_surrogate(text)
    if index is not None:
        return f"holds {_escape(text[index])} at character {index + 1}, half of a surrogate pair: UTF-8 cannot hold it"
    if found := _pattern(_CONTROLS, allowed).search(text):
        return f"holds the control character {_escape(found.group())} at character {found.start() + 1}"
    return None


def blank(text: str) -> bool:
    """Whether `text` shows nothing: whitespace and invisible format characters (zero-width spaces, joiners, BOMs)
    only. Stops at the first visible character."""
    return not any(not char.isspace() and unicodedata.category(char) != "Cf" for char in text)


def bidi_control(text: str) -> str | None:
    """The first character of `text` that reorders what a terminal or file browser shows after it (an embedding,
    override or isolate: U+202A-U+202E, U+2066-U+2069), or None. The invisible direction marks of Hebrew and
    Arabic text (U+200E, U+200F, U+061C) reorder nothing: they are text."""
    found = _pattern(_REORDERING, "").search(text)
    return found.group() if found else None


def shown(text: str, keep: str = "\n\t") -> str:
    """`text` with every character a terminal would obey escaped (`\\x1b`), but those in `keep`."""
    return _pattern(_CONTROLS + _BIDI_CONTROLS, keep).sub(lambda found: _escape(found.group()), text)


def json_line(value: object) -> str:
    """`value` as one line of JSON whose text a terminal shows as it is: what it would obey (C1 controls, line
    separators, bidirectional overrides) written as JSON's `\\uXXXX` escapes, other characters as they are."""
    text = json.dumps(value, ensure_ascii=False)  # C0 controls are escaped by JSON itself
    return _pattern(_CONTROLS + _BIDI_CONTROLS, "").sub(lambda found: f"\\u{ord(found.group()):04x}", text)


def one_line(text: str) -> str:
    """`text` escaped to print within one line: newlines and tabs escaped too."""
    return shown(text, keep="")


def ascii_int(text: str) -> int | None:
    """The integer `text` writes in the digits 0-9 (a leading minus allowed), else None: `int()` would also take
    `1_0`, ` 7`, `+3` and other scripts' digits (`٤٢`, `８`), which no option nor address of memflow means."""
    digits = text.removeprefix("-")
    return int(text) if digits.isascii() and digits.isdigit() else None


def plural(count: int, word: str, words: str | None = None) -> str:
    """`1 chunk`, `2 chunks`; `words` where adding an s is wrong (`1 story`, `2 stories`)."""
    return f"{count} {word if count == 1 else words or word + 's'}"


def did_you_mean(given: str, known: tuple[str, ...], prefix: str = "") -> str:
    """`did you mean --model demo? ` for a near miss of one of `known`, else nothing."""
    match = difflib.get_close_matches(given.casefold(), known, n=1, cutoff=0.6) if len(given) <= 40 else []
    return f"did you mean {prefix}{match[0]}? " if match else ""


class SafeConsole(Console):
    """A rich Console whose printed strings never reach the terminal as control sequences.

    Every string it prints (messages, table cells and titles) goes through `render_str`: control characters
    other than newline and tab are shown escaped before markup is read. rich's own styling is unaffected.
    """

    def render_str(self, text: str, **options) -> Text:  # type: ignore[override]
        return super().render_str(shown(text), **options)
