"""Settings ranges: every user-facing number is checked for range and finiteness, and the error names the field."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from memflow_cli.cli import app
from memflow_cli.settings import (
    SETTING_NAMES,
    SETTING_RANGES,
    GenerationSettings,
    LoraSettings,
    SettingsError,
)

INTEGER_RANGES = {name: bounds for name, bounds in SETTING_RANGES.items() if name != "shift"}


def overrides(name: str, value) -> dict:
    """`name: value`, with a window wide enough that a large sink is not blamed on the window."""
    return {name: value, "window": 64} if name == "sink" else {name: value}


def refusal(given: dict) -> SettingsError:
    with pytest.raises(SettingsError) as caught:
        GenerationSettings().with_overrides(given)
    return caught.value


def test_the_release_defaults_lie_inside_every_range():
    settings = GenerationSettings()
    for name, (low, high) in SETTING_RANGES.items():
        group, attribute = SETTING_NAMES[name]
        assert low <= getattr(getattr(settings, group), attribute) <= high, name


@pytest.mark.parametrize(("given", "name", "value"), [
    ({"window": 3, "sink": 0}, "window", 3),  # the smallest window that holds a chunk
    ({"window": 64}, "window", 64),
    ({"sink": 0}, "sink", 0),
    ({"sink": 61, "window": 64}, "sink", 61),
    ({"bank_size": 1}, "bank_size", 1),
    ({"bank_size": 64}, "bank_size", 64),
    ({"record_interval": 1}, "record_interval", 1),
    ({"record_interval": 1000}, "record_interval", 1000),
    ({"sma_top_k": 1}, "sma_top_k", 1),
    ({"sma_top_k": 128}, "sma_top_k", 128),
])  # fmt: skip
def test_the_ends_of_the_ranges_are_accepted(given: dict, name: str, value: int):
    group, attribute = SETTING_NAMES[name]
    assert getattr(getattr(GenerationSettings().with_overrides(given), group), attribute) == value


@pytest.mark.parametrize("name", INTEGER_RANGES)
def test_one_past_the_top_of_a_range_is_refused_with_the_field_and_the_limit(name: str):
    high = INTEGER_RANGES[name][1]
    error = refusal(overrides(name, high + 1))
    assert error.field == name
    assert error.message.startswith(f"must be at most {high}")
    assert error.message.endswith(f", got {high + 1}")


def test_a_bank_of_100_million_frames_is_refused_before_anything_allocates():
    error = refusal({"bank_size": 100_000_000})
    assert (error.field, error.message) == ("bank_size", "must be at most 64 frames, got 100000000")


@pytest.mark.parametrize("name", ["bank_size", "record_interval", "sma_top_k"])
def test_zero_is_below_the_range(name: str):
    error = refusal({name: 0})
    assert (error.field, error.message) == (name, "must be at least 1, got 0")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_shift_must_be_finite(value: float):
    error = refusal({"shift": value})
    assert error.field == "shift"
    assert error.message == f"must be a finite number from 0.01 to 100, got {value}"


@pytest.mark.parametrize(("value", "message"), [
    (0, "must be at least 0.01, got 0.0"),
    (-5, "must be at least 0.01, got -5.0"),
    (100.5, "must be at most 100, got 100.5"),
    (10**400, "must be at most 100, got <a 1329-bit number>"),
])  # fmt: skip
def test_shift_outside_its_range_is_refused(value, message: str):
    error = refusal({"shift": value})
    assert (error.field, error.message) == ("shift", message)


def test_shift_at_its_ends_is_accepted():
    assert GenerationSettings().with_overrides({"shift": 0.01}).sampler.shift == 0.01
    assert GenerationSettings().with_overrides({"shift": 100}).sampler.shift == 100.0


@pytest.mark.parametrize(("steps", "message"), [
    ("1000,²", "'²' is not a whole number; write the steps like 1000,750,500,250"),
    ("1000," + "9" * 5000, "each step must be a timestep like 1000 or 250, got '" + "9" * 36 + "..."),
    ([1000, 10**5000], "each step must be in 1..1000, got <a 16610-bit number>"),
])  # fmt: skip
def test_steps_that_are_not_timesteps_are_refused_in_a_short_message(steps, message: str):
    error = refusal({"steps": steps})
    assert (error.field, error.message) == ("steps", message)


def test_a_huge_window_in_a_message_is_previewed_not_printed():
    error = refusal({"window": 10**5000})
    assert error.message == "must be at most 64 frames, got <a 16610-bit number>"


@pytest.mark.parametrize(("given", "field", "message"), [
    ({"rank": 0}, "lora_rank", "must be a whole number from 1 up, got 0"),
    ({"alpha": math.nan}, "lora_alpha", "must be a finite number, got nan"),
    ({"alpha": math.inf}, "lora_alpha", "must be a finite number, got inf"),
])  # fmt: skip
def test_lora_rank_and_alpha_are_checked(given: dict, field: str, message: str):
    with pytest.raises(SettingsError) as caught:
        LoraSettings(**given)
    assert (caught.value.field, caught.value.message) == (field, message)


def test_lora_rank_may_come_from_the_file():
    assert LoraSettings(rank=None, alpha=8).rank is None


def test_steps_out_of_order_are_shown_short():
    error = refusal({"steps": [1] * 15_000})
    assert (error.field, error.message) == ("steps", "must be strictly decreasing, got [1, 1, 1, 1, ...]")


@pytest.mark.parametrize(("setting", "message"), [
    ("shift: .nan", "settings.shift: must be a finite number from 0.01 to 100, got nan"),
    ("bank_size: 100000000", "settings.bank_size: must be at most 64 frames, got 100000000"),
])  # fmt: skip
def test_render_refuses_a_setting_out_of_range_before_loading_anything(tmp_path, monkeypatch, setting, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "story.yaml").write_text(
        f"segments:\n  - start: 0s\n    prompt: a lighthouse at dusk\nsettings:\n  {setting}\n", encoding="utf-8"
    )
    result = CliRunner().invoke(app, ["render", "story.yaml", "--model", "demo", "--device", "cpu", "-o", "out.mp4"])
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.splitlines()) == 1  # the error and its fix
    assert sorted(path.name for path in tmp_path.iterdir()) == ["story.yaml"]  # no video, partial, lock or sidecar
