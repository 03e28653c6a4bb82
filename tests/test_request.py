"""The typed request: `--model` resolved once, and generation options that write themselves back as flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from memflow_cli.cli import app
from memflow_cli.commands import render as render_command
from memflow_cli.request import CompileMode, GenerationOptions, ModelKind, ModelSource
from memflow_cli.settings import GenerationSettings, LoraSettings

STORY = Path(__file__).resolve().parents[1] / "scripts_examples" / "lighthouse.yaml"


@pytest.mark.parametrize(
    ("given", "kind", "folder", "flags"),
    [
        (None, ModelKind.WEIGHTS, None, []),
        ("demo", ModelKind.DEMO, None, ["--model", "demo"]),
        ("random", ModelKind.RANDOM, None, ["--model", "random"]),
        ("/models/memflow", ModelKind.WEIGHTS, "/models/memflow", ["--model", "/models/memflow"]),
        ("./demo", ModelKind.WEIGHTS, "./demo", ["--model", "./demo"]),  # a folder that happens to be named demo
    ],
)
def test_the_model_option_is_resolved_once_into_a_source(given, kind, folder, flags):
    source = ModelSource.parse(given)
    assert (source.kind, source.folder, source.flags()) == (kind, folder, flags)
    assert ModelSource.parse(source) is source
    assert source.architecture == ("demo" if kind is ModelKind.DEMO else "wan2.1-t2v-1.3b")


def parsed_by_render(flags: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> GenerationOptions:
    """The options `memflow render` builds from `flags` (stopped before anything runs)."""
    seen = []
    monkeypatch.setattr(render_command, "_run", lambda request, *rest: seen.append(request.options) or 0)
    result = CliRunner().invoke(app, ["render", str(STORY), "-o", str(tmp_path / "out.mp4"), *flags])
    assert result.exit_code == 0, result.output
    (options,) = seen
    return options


@pytest.mark.parametrize(
    "options",
    [
        GenerationOptions(),
        GenerationOptions(model=ModelSource.parse("demo"), device="cpu", compile=CompileMode.NEVER),
        GenerationOptions(
            model=ModelSource.parse("/models/memflow"), device="cuda:0", decode_device="cuda:1", memory="sink",
            window=9, sink=2, bank_size=5, record_interval=4, sma=True, steps="1000,500",
            lora=LoraSettings(rank=8, alpha=4.5), compile=CompileMode.ALWAYS, fp8=True,
        ),  # fmt: skip
        GenerationOptions(sma=False, compile=CompileMode.AUTO),
    ],
)
def test_options_written_as_flags_are_the_options_render_parses(options, monkeypatch, tmp_path):
    assert parsed_by_render(options.flags(), monkeypatch, tmp_path) == options


def test_every_setting_written_out_reproduces_the_settings(monkeypatch, tmp_path):
    settings = GenerationSettings().with_overrides({"window": 15, "bank_size": 4, "sma": True, "steps": "1000,500"})
    options = GenerationOptions(model=ModelSource.parse("demo")).with_settings(settings)
    assert set(options.settings()) == {"memory", "window", "sink", "bank_size", "record_interval", "sma", "steps"}
    parsed = parsed_by_render(options.flags(), monkeypatch, tmp_path)
    assert GenerationSettings().with_overrides(parsed.settings()) == settings
    assert options.without_settings().settings() == {} and options.without_settings().model == options.model
