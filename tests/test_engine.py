"""The one pipeline (`Engine.stream`) on the demo model, how `render` scopes its resources, and what
`bench --no-compile` runs (the flag reaches the engine; on a GPU the eager path is what gets timed).

The decoder is not the subject here: the demo engine decodes with its TAEHV decoder, a fraction of the Wan VAE's
CPU time (the Wan VAE's stream and MP4: test_cli.py, test_wan_vae.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from memflow_cli import engine as engine_module
from memflow_cli import mp4
from memflow_cli.cli import app
from memflow_cli.decoders import DecoderChoice, DecoderRequest
from memflow_cli.engine import Video, load_engine
from memflow_cli.output import partial_path, sidecar_path
from memflow_cli.render import render_story
from memflow_cli.request import CompileMode
from memflow_cli.script import Segment, Story
from memflow_cli.settings import GenerationSettings
from memflow_cli.speed import compile_cache

from .video import probe_video

PROMPTS = ("a red fox trots across a snowy field", "the fox stops at the edge of a pine forest")
TAE = ("--decoder", "tae")


@pytest.fixture(scope="module")
def engine():
    with load_engine("demo", "cpu", decoder=DecoderRequest(DecoderChoice.TAE)) as engine:
        yield engine


def story(tmp_path: Path, prompts: tuple[str, str] = PROMPTS) -> Story:
    segments = (Segment(0.0, prompts[0]), Segment(1.5, prompts[1]))
    return Story(path=tmp_path / "fox.yaml", title="fox", seed=0, duration_s=3.0, segments=segments)


def test_the_stream_stops_at_latents_at_frames_or_at_the_mp4(engine, tmp_path):
    settings = GenerationSettings(geometry=engine.geometry)
    engine.encode(PROMPTS)
    video = Video(engine.embeddings(PROMPTS), chunks=4, switch_chunks=(2,))
    latents_only = list(engine.stream(video, settings, seed=0, decode=False))
    assert [(c.index, c.segment, c.frames) for c in latents_only] == [(0, 0, None), (1, 0, None), (2, 1, None),
                                                                      (3, 1, None)]  # fmt: skip
    assert latents_only[0].latents.shape == (1, 3, 16, 8, 12)

    with engine.mp4_writer(tmp_path / "fox.mp4") as writer:
        written = list(engine.stream(video, settings, seed=0, writer=writer))
        assert writer.frames_written == 9 + 3 * 12
    for chunk, latents in zip(written, latents_only, strict=True):
        assert torch.equal(chunk.latents, latents.latents)  # the same video, whether decoded or not
    assert [c.frames.shape[0] for c in written] == [9, 12, 12, 12]
    assert written[1].frames.dtype == torch.uint8 and written[1].frames.shape[1:] == (64, 96, 3)
    assert probe_video(tmp_path / "fox.mp4").frames == 45


def test_a_render_whose_prompt_encoding_fails_leaves_no_ffmpeg_and_no_file(engine, tmp_path, monkeypatch):
    started: list[subprocess.Popen] = []
    popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    def failing_encode(prompts, *args, **kwargs):
        raise RuntimeError("the text encoder ran out of memory")

    monkeypatch.setattr(mp4.subprocess, "Popen", recording_popen)
    monkeypatch.setattr(engine.text_encoder, "encode", failing_encode)
    target = tmp_path / "fox.mp4"
    new_prompts = ("a heron wades through the reeds", "it takes off over the lake")  # not encoded before
    with pytest.raises(RuntimeError, match="ran out of memory"):
        render_story(engine, story(tmp_path, new_prompts), target, GenerationSettings(geometry=engine.geometry), seed=0)
    assert all(process.poll() is not None for process in started)  # no ffmpeg left running
    assert not target.exists() and not partial_path(target).exists() and not sidecar_path(target).exists()
    assert list(tmp_path.iterdir()) == []
    assert engine.text_encoder.device.type == "cpu"  # offloaded all the same


def test_a_render_that_fails_mid_stream_keeps_only_the_partial_it_wrote(engine, tmp_path, monkeypatch):
    real_stream = engine_module.Engine.stream

    def two_chunks_then_fail(self, *args, **kwargs):
        for chunk in real_stream(self, *args, **kwargs):
            yield chunk
            if chunk.index == 1:
                raise RuntimeError("the GPU fell off the bus")

    monkeypatch.setattr(engine_module.Engine, "stream", two_chunks_then_fail)
    target = tmp_path / "fox.mp4"
    with pytest.raises(RuntimeError, match="fell off"):
        render_story(engine, story(tmp_path), target, GenerationSettings(geometry=engine.geometry), seed=0)
    assert not target.exists() and not sidecar_path(target).exists()
    assert probe_video(partial_path(target)).frames == 9 + 12  # playable, the frames of the finished chunks


# -- bench --no-compile ---------------------------------------------------------------------------------


def bench(monkeypatch: pytest.MonkeyPatch, *args: str) -> dict:
    """`memflow bench` of one chunk, without timing the decoder alone (12 decodes): what is read needs neither."""
    monkeypatch.setattr("memflow_cli.bench.decode_ms_per_chunk", lambda *args, **kwargs: 50.0)
    result = CliRunner().invoke(app, ["bench", "--frames", "3", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("flags", "mode", "compile"),
    [
        (["--no-compile"], CompileMode.NEVER, False),
        (["--compile"], CompileMode.ALWAYS, True),
        ([], CompileMode.AUTO, None),
    ],
)
def test_bench_hands_the_compile_flag_to_the_engine(monkeypatch, flags, mode, compile):
    """Without a flag bench asks for what render would run for its video (on CUDA: eager unless compiling pays)."""
    asked: list[CompileMode] = []
    choose = compile_cache.choose_compile

    def spy(mode_asked: CompileMode, *args, **kwargs):
        asked.append(mode_asked)
        return choose(mode_asked, *args, **kwargs)

    monkeypatch.setattr(compile_cache, "choose_compile", spy)
    record = bench(monkeypatch, "--model", "demo", "--device", "cpu", *TAE, *flags)
    assert asked == [mode]
    assert record["compile"] is False and record["fast_path"] == "eager"  # a CPU runs plain PyTorch, whatever was asked


def test_bench_takes_the_generation_options_render_takes(monkeypatch):
    record = bench(
        monkeypatch,
        "--model", "demo", "--device", "cpu", "--window", "9", "--sink", "2", "--record-interval", "2",
        "--bank-size", "2", "--steps", "1000,500", "--sma", *TAE,
    )  # fmt: skip
    assert (record["window"], record["sink"], record["record_interval"], record["bank_size"]) == (9, 2, 2, 2)
    assert record["steps"] == [1000, 500] and record["sma"] is True


def test_bench_refuses_a_bad_option_as_render_does():
    result = CliRunner().invoke(app, ["bench", "--model", "demo", "--device", "cpu", "--window", "2"])
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0] == (
        "error: --window: the sink (3 frames) must be smaller than the window (2 frames) — see `--window` in the "
        "command's --help"
    )
    assert "Traceback" not in result.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_no_compile_times_the_eager_model_on_the_gpu(monkeypatch):
    """--no-compile: no graph is compiled and no CUDA graph captured while bench times the demo model on CUDA."""
    import torch._dynamo.utils

    counters = torch._dynamo.utils.counters
    graphs_before = counters["stats"]["unique_graphs"]
    captures: list[object] = []
    original = torch.cuda.CUDAGraph.capture_begin

    def counting_capture(self, *args, **kwargs):
        captures.append(self)
        return original(self, *args, **kwargs)

    torch.cuda.CUDAGraph.capture_begin = counting_capture
    try:
        eager = bench(monkeypatch, "--model", "demo", "--device", "cuda", "--no-compile")
    finally:
        torch.cuda.CUDAGraph.capture_begin = original
    assert eager["compile"] is False
    assert counters["stats"]["unique_graphs"] == graphs_before and captures == []
    assert eager["chunk_latency_ms"] > 0 and eager["peak_memory_gib"] > 0
    assert eager["fps_generate"] > eager["fps_end_to_end"] > 0

    compiled = bench(monkeypatch, "--model", "demo", "--device", "cuda", "--compile")
    assert compiled["compile"] is True
    assert counters["stats"]["unique_graphs"] > graphs_before
