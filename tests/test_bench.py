"""`memflow bench` on the demo model: the CPU smoke run that CI makes, ending with its JSON line."""

from __future__ import annotations

import json

import pytest
import torch
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


def test_bench_encodes_its_prompts_as_a_render_does_and_reports_it():
    result = CliRunner().invoke(app, ["bench", "--model", "demo", "--device", "cpu", "--frames", "6"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["text_encoder"] == "umT5 2 layers x 32"  # the demo's tiny umT5 ran, not random embeddings
    assert record["encode_s"] > 0
    assert record["peak_memory_encode_gib"] is None and record["peak_reserved_gib"] is None  # CPU: no statistics
    assert "memory_limit_gib" not in record


def test_bench_text_encoder_goes_with_random_weights_only():
    result = CliRunner().invoke(app, ["bench", "--model", "demo", "--device", "cpu", "--text-encoder"])
    assert result.exit_code == 2
    assert "--text-encoder goes with --random-weights" in result.output
    assert "Traceback" not in result.output


def test_bench_memory_limit_needs_a_cuda_device():
    result = CliRunner().invoke(app, ["bench", "--model", "demo", "--device", "cpu", "--memory-limit", "24"])
    assert result.exit_code == 2
    assert "--memory-limit caps a CUDA device's memory" in result.output


def test_a_run_over_the_memory_limit_is_one_line_naming_the_limit(monkeypatch):
    from memflow_cli import bench as bench_mod

    def too_big(options, status):
        assert options.memory_limit_gib == 24.0 and options.full_text_encoder is True
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")

    monkeypatch.setattr(bench_mod, "run", too_big)
    monkeypatch.setattr("memflow_cli.commands.bench.checked_device", lambda device, *args: "cuda:0")
    args = ["bench", "--random-weights", "--text-encoder", "--memory-limit", "24"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "the run does not fit the --memory-limit of 24 GiB: CUDA out of memory. Tried to allocate 2.00 GiB" in (
        " ".join(result.output.split())
    )
    assert "more details" not in result.output and "Traceback" not in result.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_under_a_memory_limit_on_the_gpu():
    args = ["bench", "--model", "demo", "--device", "cuda", "--frames", "6", "--no-compile", "--memory-limit", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["memory_limit_gib"] == 1.0
    assert 0 < record["peak_memory_encode_gib"] <= record["peak_reserved_gib"] <= 1.0
    # the cap ends with the run: two GiB can be had again
    torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
