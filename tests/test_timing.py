"""Time to video: a render's phases from its process's start, and the compile choice that decides most of a
short render's wait (the cache folders and keys, the choice itself, the warm markers), with fakes for the GPU."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from memflow_cli import IMPORTED_AT
from memflow_cli.decoders import DecoderChoice, DecoderRequest
from memflow_cli.engine import load_engine
from memflow_cli.output import sidecar_path
from memflow_cli.render import render_story
from memflow_cli.request import CompileMode
from memflow_cli.script import Segment, Story
from memflow_cli.settings import GenerationSettings, VideoGeometry
from memflow_cli.speed import compile_cache, process
from memflow_cli.speed.compile_cache import CompileCosts, CompileKey, CompilePath, choose_compile
from memflow_cli.timing import _process_age_from_proc, since_process_start, warmup_seconds

ROUNDING = 3e-3  # the sidecar rounds each phase to the millisecond: five of them may sum 2.5 ms above the total
H200 = CompileKey(gpu="NVIDIA H200", torch="2.11.0+cu130", cuda="13.0", memflow="0.1.0")


# -- the process clock and the phases -----------------------------------------------------------------------------


def test_the_clock_starts_with_the_process_not_with_memflow():
    age = _process_age_from_proc()
    assert age is not None  # Linux
    assert age >= time.perf_counter() - IMPORTED_AT - 0.05  # Python and the imports before memflow count too
    assert since_process_start() == pytest.approx(age, abs=0.1)


@pytest.mark.parametrize(
    ("chunk_s", "warmup"),
    [([], 0.0), ([5.0], 0.0), ([5.0, 1.0, 1.2, 0.8], 4.0), ([1.0, 1.0, 2.0], 0.0), ([0.5, 1.0, 1.0], 0.0)],
)
def test_the_warm_up_is_what_the_first_chunk_took_beyond_a_steady_one(chunk_s, warmup):
    assert warmup_seconds(chunk_s) == pytest.approx(warmup)


def test_a_render_sidecar_records_its_phases(tmp_path: Path):
    story = Story(path=tmp_path / "fox.yaml", title="fox", seed=0, duration_s=3.0,
                  segments=(Segment(0.0, "a red fox"), Segment(1.5, "the fox sleeps")))  # fmt: skip
    with load_engine("demo", "cpu", decoder=DecoderRequest(DecoderChoice.TAE)) as engine:  # not the subject
        settings = GenerationSettings(geometry=engine.geometry)
        result = render_story(engine, story, tmp_path / "fox.mp4", settings, seed=0)
    meta = json.loads(sidecar_path(tmp_path / "fox.mp4").read_text(encoding="utf-8"))
    timings = meta["timings"]
    assert meta["compile"] == "eager"
    assert set(timings) == {"import_s", "load_s", "encode_s", "warmup_s", "first_frame_s", "render_s", "finish_s",
                            "total_s", "time_to_first_frame_s"}  # fmt: skip
    assert timings["import_s"] > 0 and timings["load_s"] > 0 and timings["encode_s"] > 0
    steps = [timings[name] for name in ("import_s", "load_s", "encode_s", "render_s", "finish_s")]
    assert sum(steps) <= timings["total_s"] + ROUNDING <= since_process_start() + ROUNDING
    assert timings["warmup_s"] <= timings["first_frame_s"] <= timings["render_s"]
    assert timings["time_to_first_frame_s"] < timings["total_s"]
    assert result.timings.render_s == pytest.approx(timings["render_s"], abs=1e-3)


# -- where compiled kernels are kept ------------------------------------------------------------------------------


def test_compiled_kernels_live_in_memflows_cache_folder_beside_the_prompt_embeddings():
    key = H200.folder_name
    both = {"MEMFLOW_CACHE_DIR": "/m", "XDG_CACHE_HOME": "/x"}
    assert compile_cache.compile_cache_dir(H200, both) == Path("/m/compile") / key
    assert compile_cache.compile_cache_dir(H200, {"XDG_CACHE_HOME": "/x"}) == Path("/x/memflow/compile") / key
    assert compile_cache.compile_cache_dir(H200, {}) == Path.home() / ".cache" / "memflow" / "compile" / key


def test_compiled_kernels_are_kept_per_gpu_torch_cuda_and_memflow():
    folder = compile_cache.compile_cache_dir(H200, {"MEMFLOW_CACHE_DIR": "/c"})
    assert folder == Path("/c/compile/NVIDIA_H200-torch2.11.0+cu130-cuda13.0-memflow0.1.0")
    others = [
        CompileKey("NVIDIA H100 80GB HBM3", H200.torch, H200.cuda, H200.memflow),
        CompileKey(H200.gpu, "2.12.0+cu130", H200.cuda, H200.memflow),
        CompileKey(H200.gpu, H200.torch, "12.8", H200.memflow),
        CompileKey(H200.gpu, H200.torch, H200.cuda, "0.2.0"),
    ]
    names = {key.folder_name for key in [H200, *others]}
    assert len(names) == 5 and not any("/" in name or " " in name for name in names)


def test_the_compile_caches_point_into_memflows_folder_unless_the_user_set_their_own():
    folder = Path("/c/compile/x")
    assert compile_cache.compile_cache_env(folder, {}) == {
        "TORCHINDUCTOR_CACHE_DIR": "/c/compile/x/inductor", "TRITON_CACHE_DIR": "/c/compile/x/triton",
    }  # fmt: skip
    assert compile_cache.compile_cache_env(folder, {"TORCHINDUCTOR_CACHE_DIR": "/mine"}) == {
        "TRITON_CACHE_DIR": "/c/compile/x/triton"
    }


def test_torchs_own_default_inductor_folder_is_not_taken_for_the_users():
    """Importing dynamo (diffusers does) writes torch's default folder into TORCHINDUCTOR_CACHE_DIR: not a choice."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    environ = {"TORCHINDUCTOR_CACHE_DIR": default_cache_dir(), "TRITON_CACHE_DIR": "/mine/triton"}
    assert compile_cache.compile_cache_env(Path("/c/compile/x"), environ) == {
        "TORCHINDUCTOR_CACHE_DIR": "/c/compile/x/inductor"
    }


def test_process_settings_set_the_cache_environment_for_a_gpu_before_anything_compiles(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setattr(CompileKey, "current", classmethod(lambda cls, device: H200))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    process.process_settings(torch.device("cpu"), compile=True)
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ and torch.backends.cudnn.benchmark is True  # CPU: nothing
    # a GPU: cuDNN never times its algorithms, whose choice could differ from one process to the next
    process.process_settings(torch.device("cuda"), compile=False)
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ and torch.backends.cudnn.benchmark is False
    process.process_settings(torch.device("cuda"), compile=True)
    folder = tmp_path / "compile" / H200.folder_name
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(folder / "triton")


COSTS = CompileCosts(cold_s=70.6, warm_s=10.7, saved_per_chunk_s=0.149)


# -- compile or not ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "chunks", "cuda", "warm", "path", "compile"),
    [
        (None, 40, False, False, CompilePath.EAGER_DEVICE, False),  # CPU: plain PyTorch whatever was asked
        (True, 40, False, True, CompilePath.EAGER_DEVICE, False),
        (False, 4000, True, True, CompilePath.EAGER_ASKED, False),  # --no-compile: plain eager, no graphs
        (True, 2, True, False, CompilePath.COMPILED_COLD, True),  # --compile always compiles
        (True, 2, True, True, CompilePath.COMPILED_WARM, True),
        (None, 40, True, False, CompilePath.EAGER, False),  # the default: eager where compiling does not pay
        (None, 40, True, True, CompilePath.EAGER, False),  # 39 x 0.149 s saved < 10.7 s warm
        (None, 80, True, True, CompilePath.COMPILED_WARM, True),  # 79 x 0.149 s > 10.7 s
        (None, 400, True, False, CompilePath.EAGER, False),  # 399 x 0.149 s < 70.6 s cold
        (None, 500, True, False, CompilePath.COMPILED_COLD, True),
        (None, 4000, True, True, CompilePath.COMPILED_WARM, True),
    ],
)
def test_the_default_compiles_only_where_the_video_wins_the_compile_back(
    monkeypatch, asked, chunks, cuda, warm, path, compile
):  # fmt: skip
    # where AUTO's uncompiled path is plain eager (compiled code is faster than it: the balance decides)
    monkeypatch.setattr(compile_cache, "AUTO_UNCOMPILED", CompilePath.EAGER)
    assert COSTS == CompileCosts()  # the defaults: the H200 measurements
    choice = choose_compile(CompileMode(asked), chunks, cuda=cuda, warm=warm, costs=COSTS)
    assert (choice.path, choice.compile) == (path, compile)
    assert choice.reason


def test_a_warm_marker_is_what_makes_a_cache_warm(tmp_path):
    folder = tmp_path / "compile" / H200.folder_name
    signature = compile_cache.graphs_signature({"model": "wan", "steps": [1000, 750]})
    assert signature == compile_cache.graphs_signature({"steps": [1000, 750], "model": "wan"})  # order-free
    assert signature != compile_cache.graphs_signature({"model": "wan", "steps": [1000, 500]})
    assert not compile_cache.is_warm(folder, signature)
    compile_cache.mark_warm(folder, signature, {"model": "wan"})
    assert compile_cache.is_warm(folder, signature) and not compile_cache.is_warm(folder, "0" * 16)
    assert [path.name for path in (folder / "warm").iterdir()] == [f"{signature}.json"]  # no temporary left


def test_a_cache_that_cannot_be_written_only_costs_the_next_choice(tmp_path):
    (tmp_path / "a-file").write_text("")
    compile_cache.mark_warm(tmp_path / "a-file" / "compile", "abc", {})  # no error
    assert not compile_cache.is_warm(tmp_path / "a-file" / "compile", "abc")


@pytest.mark.parametrize("chunks", [2, 40, 80, 4000])
@pytest.mark.parametrize("warm", [False, True])
def test_by_default_cuda_runs_the_triton_glue_which_beats_compiled_code_at_any_length(chunks, warm):
    choice = choose_compile(CompileMode.AUTO, chunks, cuda=True, warm=warm)
    assert (choice.path, choice.compile, choice.glue) == (CompilePath.TRITON_GRAPHED, None, True)
    assert choice.reason == "triton-graphed runs a chunk faster than compiled code"
    assert choose_compile(CompileMode.ALWAYS, chunks, cuda=True, warm=warm).compile is True  # --compile still does
    assert choose_compile(CompileMode.NEVER, chunks, cuda=True, warm=warm).path is CompilePath.EAGER_ASKED


def test_a_render_runs_eager_unless_asked_and_compiles_warm_once_its_graphs_are_cached(monkeypatch, tmp_path):
    monkeypatch.setattr(compile_cache, "AUTO_UNCOMPILED", CompilePath.EAGER)  # the balance of eager and compiled
    monkeypatch.setenv("MEMFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(CompileKey, "current", classmethod(lambda cls, device: H200))
    settings = GenerationSettings(geometry=VideoGeometry())
    minute, preview = [(80, settings)], [(40, settings)]  # 60 s and 30 s of video: chunks and settings
    auto, cuda = CompileMode.AUTO, torch.device("cuda")

    def choice(videos, fp8=False, asked=auto, device=cuda):
        return compile_cache.choose_for_videos(asked, device, "wan2.1-t2v-1.3b", fp8, videos)

    assert choice(minute, device=torch.device("cpu")).path is CompilePath.EAGER_DEVICE
    cold = choice(minute)
    assert cold.path is CompilePath.EAGER and "80 chunks" in cold.reason and "cold" in cold.reason
    description = compile_cache.graphs_description("wan2.1-t2v-1.3b", settings, False)
    folder = compile_cache.compile_cache_dir(H200)
    compile_cache.mark_warm(folder, compile_cache.graphs_signature(description), description)
    assert choice(minute).path is CompilePath.COMPILED_WARM
    assert choice(minute, fp8=True).path is CompilePath.EAGER  # --fp8: other graphs
    assert choice(preview).path is CompilePath.EAGER  # a 40-chunk preview
    assert choice(minute, asked=CompileMode.NEVER).path is CompilePath.EAGER_ASKED


# -- on a GPU: the compiled path's kernels land in memflow's cache, and the next render finds them warm ---------------


def _render_process(story: Path, target: Path, cache: Path, *options: str) -> dict:
    import subprocess
    import sys

    own = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")  # the render must choose its cache folders itself
    env = {key: value for key, value in os.environ.items() if key not in own}
    env["MEMFLOW_CACHE_DIR"] = str(cache)
    command = [sys.executable, "-m", "memflow_cli", "render", str(story), "-o", str(target), "--model", "demo",
               "--device", "cuda", "--overwrite", "-q", *options]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(sidecar_path(target).read_text(encoding="utf-8"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernels_are_cached_per_gpu_and_found_by_the_next_render(tmp_path):
    story = tmp_path / "fox.yaml"
    story.write_text(json.dumps({"title": "fox", "duration": "3s", "segments": [{"start": "0s", "prompt": "a fox"}]}))
    cache = tmp_path / "cache"
    short = _render_process(story, tmp_path / "short.mp4", cache)
    assert short["compile"] == "triton-graphed"  # the default: the Triton glue, nothing compiled by Inductor
    assert not list(cache.glob("compile/*/warm/*")) and not list(cache.glob("compile/*/inductor/*"))
    cold = _render_process(story, tmp_path / "cold.mp4", cache, "--compile")
    (folder,) = (cache / "compile").iterdir()
    assert folder.name == CompileKey.current(torch.device("cuda")).folder_name
    assert cold["compile"] == "compiled-cold" and any((folder / "inductor").rglob("*"))
    assert len(list((folder / "warm").iterdir())) == 1
    warm = _render_process(story, tmp_path / "warm.mp4", cache, "--compile")
    assert warm["compile"] == "compiled-warm"
    assert warm["timings"]["warmup_s"] < cold["timings"]["warmup_s"]
