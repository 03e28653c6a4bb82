"""`memflow bench` on the demo model: the CPU smoke run that CI makes, ending with its JSON line."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from memflow_cli.cli import app

REQUIRED = {
    "device", "model", "latent_frames", "video_frames", "fps_end_to_end", "fps_generate",
    "time_to_first_frame_s", "peak_memory_gib", "warmup_s",
}  # fmt: skip


def test_bench_demo_cpu_ends_with_json_line():
    result = CliRunner().invoke(app, ["bench", "--model", "demo", "--device", "cpu", "--frames", "9"])
    assert result.exit_code == 0, result.output
    last = result.stdout.strip().splitlines()[-1]
    record = json.loads(last)
    assert REQUIRED <= set(record)
    assert record["device"] == "cpu" and record["model"] == "demo"
    assert record["latent_frames"] == 9
    assert record["video_frames"] == 33  # 4 * 9 - 3 decoded frames, never latent frames
    assert record["fps_generate"] > record["fps_end_to_end"] > 0
    assert record["peak_memory_gib"] is None  # no allocator statistics on the CPU
    assert record["fp8"] is False and record["compile"] is False  # neither runs unless asked (compile: CUDA only)
    assert "measure" in result.stdout  # the Rich table comes before the JSON line


def test_bench_rejects_model_and_random_weights_together():
    result = CliRunner().invoke(app, ["bench", "--model", "demo", "--random-weights"])
    assert result.exit_code == 2
    assert "not both" in result.output


def test_bench_rejects_unknown_memory_mode():
    result = CliRunner().invoke(app, ["bench", "--model", "demo", "--device", "cpu", "--memory", "lots"])
    assert result.exit_code == 2
    assert "memory" in result.output and "nam, sink, none" in result.output
