"""`memflow bench` on the demo model: the CPU smoke run that CI makes, ending with its JSON line."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from memflow_cli.cli import app
from memflow_cli.request import CompileMode, ModelSource

REQUIRED = {
    "device", "model", "latent_frames", "video_frames", "fps_end_to_end", "fps_generate",
    "time_to_first_frame_s", "peak_memory_gib", "warmup_s", "decode_ms_per_chunk",
}  # fmt: skip
DEMO_CPU = ("bench", "--model", "demo", "--device", "cpu")


@pytest.fixture(scope="module")
def demo_run():
    """One `memflow bench` of 9 latent frames with 2 switches on the demo model, which the tests below only read.
    It decodes with the demo's TAEHV decoder: on the Wan VAE the run takes seconds of CPU more, most of them in
    the decoder's timing (the Wan VAE's bench: the time-to-video test below)."""
    result = CliRunner().invoke(app, [*DEMO_CPU, "--frames", "9", "--switches", "2", "--decoder", "tae"])
    assert result.exit_code == 0, result.output
    return result


def last_json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_bench_demo_cpu_ends_with_json_line(demo_run):
    result = demo_run
    record = last_json(result)
    assert REQUIRED <= set(record)
    assert record["device"] == "cpu" and record["model"] == "demo" and record["decoder"] == "tae"
    assert record["latent_frames"] == 9
    assert record["video_frames"] == 33  # 4 * 9 - 3 decoded frames, never latent frames
    assert record["fps_generate"] > record["fps_end_to_end"] > 0
    # the decoder alone, a steady 3-latent chunk (12 frames): no longer than a whole decoded chunk took
    assert 0 < record["decode_ms_per_chunk"] < 1000 * 33 / record["fps_decode"]
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


def test_bench_encodes_its_prompts_as_a_render_does_and_reports_it(demo_run):
    record = last_json(demo_run)
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


# -- switches: no more than the chunks allow (issue #20, defect 10) ----------------------------------------------


def test_bench_refuses_more_switches_than_its_chunks_allow():
    result = CliRunner().invoke(app, [*DEMO_CPU, "--frames", "9", "--switches", "50"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "--switches 50: 9 latent frames make 3 chunks, which allow at most 2 switches" in lines[0]


def test_bench_refuses_a_length_it_could_not_finish_at_once():
    result = CliRunner().invoke(app, [*DEMO_CPU, "--frames", "100000000"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output == "error: --frames 100000000: give a number from 3 to 12000\n"  # one line: option, bound


def test_bench_reports_the_switches_it_made(demo_run):
    assert last_json(demo_run)["switches"] == 2


@pytest.mark.parametrize("chunks", [1, 2, 3, 5, 7, 9, 40])
def test_switches_land_on_distinct_chunks_inside_the_video(chunks):
    from memflow_cli.bench import BenchError, switch_chunks

    for switches in range(chunks):
        at = switch_chunks(chunks, switches)
        assert len(at) == switches and len(set(at)) == switches and list(at) == sorted(at)
        assert all(1 <= chunk <= chunks - 1 for chunk in at)
    with pytest.raises(BenchError):
        switch_chunks(chunks, chunks)


# -- FPS: a run that did more work never ranks above one that did less -------------------------------------------


def test_fps_of_decoding_is_bounded_by_the_run_that_decoded_and_wrote(monkeypatch):
    """One run per phase is noisy on a shared CPU: a decode-only run slower than the decode-and-write run
    (seen as fps_end_to_end 7.39 above fps_decode 5.35) is bounded by it."""
    from memflow_cli import bench as bench_mod

    seconds = {bench_mod.Phase.GENERATE: 1.0, bench_mod.Phase.DECODE: 4.0, bench_mod.Phase.MP4: 3.0}

    def fake_run(engine, settings, chunks, switches, seed, phase, folder):
        return bench_mod.RunTimes(seconds[phase], 0.5, [100.0] * chunks, bench_mod.Peaks(None, None))

    monkeypatch.setattr(bench_mod, "_timed_run", fake_run)
    monkeypatch.setattr(bench_mod, "decode_ms_per_chunk", lambda *args, **kwargs: 50.0)  # not read here: 12 decodes
    record = bench_mod.run(
        bench_mod.BenchOptions(
            model=ModelSource.parse("demo"), device=torch.device("cpu"), settings=_demo_settings(), latent_frames=9
        )
    )
    assert record["video_frames"] == 33
    assert record["fps_end_to_end"] == round(33 / 3.0, 2)
    assert record["fps_decode"] == record["fps_end_to_end"]  # bounded by the faster run that did more
    assert record["fps_generate"] == round(33 / 1.0, 2)


def _demo_settings():
    from memflow_cli.demo import DEMO_GEOMETRY
    from memflow_cli.settings import GenerationSettings

    return GenerationSettings(geometry=DEMO_GEOMETRY)


# -- time to video: whole render processes, cold and warm -------------------------------------------------------


def test_bench_times_whole_render_processes_cold_and_warm():
    args = ["bench", "--model", "demo", "--device", "cpu", "--frames", "3", "--time-to-video"]  # one chunk
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["decoder"] == "wan" and record["video_frames"] == 9  # the bench itself, on the default Wan VAE
    # the Wan VAE alone, a steady 3-latent chunk (12 frames): timed, to float frames and to the writer's uint8 ones
    assert record["decode_ms_per_chunk"] > 0 and record["decode_to_cpu_ms_per_chunk"] > 0
    to_video = record["time_to_video_s"]
    assert set(to_video) == {"cold", "warm"}
    for start, run in to_video.items():
        assert run["video_frames"] == 4 * 3 - 3, start  # the bench's video, rendered by `memflow render`
        assert run["compile"] == "eager (no compiled path on this device)"
        phases = [run[name] for name in ("import_s", "load_s", "encode_s", "render_s", "finish_s")]
        assert all(value >= 0 for value in phases) and run["import_s"] > 0 and run["render_s"] > 0
        assert sum(phases) <= run["total_s"] + 3e-3 and run["total_s"] <= run["process_s"]  # phases rounded to ms
        assert run["warmup_s"] <= run["first_frame_s"] <= run["render_s"]
        assert run["import_s"] + run["load_s"] < run["time_to_first_frame_s"] <= run["total_s"]
        assert run["exit_s"] == pytest.approx(run["process_s"] - run["total_s"], abs=2e-3)


def test_bench_without_time_to_video_runs_no_render_process(demo_run):
    assert "time_to_video_s" not in last_json(demo_run)


def test_the_time_to_video_render_is_the_bench_video_with_its_settings(tmp_path):
    from memflow_cli.bench import BenchOptions, _write_bench_story, render_command
    from memflow_cli.script import load_scripts
    from memflow_cli.settings import MemorySettings, SamplerSettings

    memory, sampler = MemorySettings(mode="sink", window=9, sink=2), SamplerSettings((1000, 500))
    settings = replace(_demo_settings(), memory=memory, sampler=sampler)
    options = BenchOptions(model=ModelSource.parse("demo"), device=torch.device("cpu"), settings=settings,
                           latent_frames=12, switches=2, compile=CompileMode.NEVER, seed=5)  # fmt: skip
    story = load_scripts(_write_bench_story(tmp_path / "story.yaml", options), 10.0, settings.geometry)[0]
    timeline = story.timeline(settings.geometry)
    assert timeline.chunks == 4 and timeline.switch_chunks == (1, 3) and story.seed == 5
    command = render_command(tmp_path / "story.yaml", tmp_path / "out.mp4", options)
    joined = " ".join(command[1:])
    assert joined.startswith(f"-m memflow_cli render {tmp_path / 'story.yaml'} -o {tmp_path / 'out.mp4'}")
    for part in ("--model demo", "--device cpu", "--memory sink", "--window 9", "--sink 2", "--steps 1000,500",
                 "--no-compile", "--no-sma"):  # fmt: skip
        assert part in joined
