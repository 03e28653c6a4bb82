"""Short previews of values for one-line messages, in time and memory bounded by the preview's width.

A script can hold anything: a list nested a thousand deep, a number of a million digits, a string of a
megabyte, the same list referenced a billion times. `builtins.repr` of such a value takes as long (and as
much memory) as the value is big once expanded, then the message throws all but 40 characters away.
`preview` looks at a few items of a few levels only, so its cost does not depend on the value.
"""

from __future__ import annotations

import datetime
import itertools
import reprlib
from typing import Any

WIDTH = 40  # characters of a preview, "..." included


class _Preview(reprlib.Repr):
    """reprlib with small limits everywhere, and no full `repr` of a number or an unknown object."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxtuple = self.maxlist = self.maxarray = self.maxdict = self.maxset = self.maxfrozenset = 4
        self.maxdeque = 4
        self.maxstring = WIDTH
        self.maxlong = WIDTH
        self.maxother = WIDTH

    def repr_int(self, value: int, level: int) -> str:
        if value.bit_length() > 4 * self.maxlong:  # repr would print thousands of digits, or refuse to
            return f"<a {value.bit_length()}-bit number>"
        return super().repr_int(value, level)

    def repr_dict(self, value: dict, level: int) -> str:
        if not value:
            return "{}"
        if level <= 0:
            return "{...}"
        shown = [
            f"{self.repr1(key, level - 1)}: {self.repr1(item, level - 1)}"
            for key, item in itertools.islice(value.items(), self.maxdict)
        ]  # in the order written, where reprlib sorts the keys
        more = ", ..." if len(value) > self.maxdict else ""
        return "{" + ", ".join(shown) + more + "}"

    def repr_str(self, value: str, level: int) -> str:
        return repr(value[: self.maxstring])  # the start of a string, cut by `preview`

    def repr_instance(self, value: Any, level: int) -> str:
        if isinstance(value, (bytes, bytearray)):
            return repr(value[: self.maxother])
        if isinstance(value, (datetime.date, datetime.time)):  # YAML reads 2024-01-01 as a date: shown as written
            return f"the date {value.isoformat()}" if isinstance(value, datetime.date) else value.isoformat()
        if isinstance(value, (float, complex, datetime.timedelta)):
            return repr(value)  # a few dozen characters at most
        return f"<{type(value).__name__}>"


_PREVIEW = _Preview()


def preview(value: Any, width: int = WIDTH) -> str:
    """`repr(value)` cut to `width` characters, without ever building the whole of it."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return str(value).lower()
    try:
        text = _PREVIEW.repr(value)
    except (RecursionError, ValueError):
        text = f"<{type(value).__name__}>"
    return cut(text, width)


def cut(text: str, width: int = WIDTH) -> str:
    """`text` cut to `width` characters, the cut marked with "..."."""
    return text if len(text) <= width else text[: width - 3] + "..."
