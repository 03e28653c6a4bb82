"""Previews of values for messages: short, in the order written, and cheap whatever the value."""

from __future__ import annotations

import datetime
import time

from memflow_cli.preview import preview


def test_a_billion_laughs_list_is_previewed_at_once():
    value: list = ["x"] * 9
    for _ in range(30):  # 9**31 items once expanded: repr would never end
        value = [value] * 9
    start = time.perf_counter()
    assert preview(value) == "[[[[...], [...], [...], [...], ...], ..."
    assert time.perf_counter() - start < 0.1


def test_a_number_of_a_million_digits_is_named_by_its_size():
    assert preview(10**1_000_000) == "<a 3321929-bit number>"
    assert preview(2**64 - 1) == "18446744073709551615"


def test_long_text_keeps_its_start():
    assert preview("A" * 1_000_000) == "'" + "A" * 36 + "..."
    assert preview(b"\x00" * 1_000_000).startswith("b'\\x00\\x00")


def test_mappings_keep_the_order_written():
    assert preview({"start": "0s", "prompt": "x"}) == "{'start': '0s', 'prompt': 'x'}"


def test_small_values_read_as_written():
    assert [preview(value) for value in (None, True, 1.5, float("nan"), [1, 2], datetime.date(2024, 1, 2))] == [
        "nothing", "true", "1.5", "nan", "[1, 2]", "the date 2024-01-02",
    ]  # fmt: skip
