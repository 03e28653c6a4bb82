"""Many processes: the plan, the torchrun environment, batch rendering under torchrun (gloo, demo model on CPU),
`--decode-device`, and `--model random`'s labelling.

The torchrun runs start `python -m torch.distributed.run --standalone` (a free port of its own) in a subprocess,
with stories of 1.5 s (two chunks) so that two processes on a CI machine's two cores finish in seconds.
The first runs the default Wan VAE (and so does the Ctrl-C of `--gpus 2`); the others decode with the demo's
TAEHV decoder (`TAE`), their subject being how the processes share the stories, not the decoder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memflow_cli.distributed import (
    RankEnv,
    RankReport,
    StoryOutcome,
    assign,
    launch_problem,
    rank_device,
    rank_env,
    without_option,
)
from memflow_cli.handover import handed_over
from memflow_cli.output import OutputLock, sidecar_path
from memflow_cli.random_model import RANDOM_NOTICE, NoiseTextEncoder
from memflow_cli.request import ModelSource

from .cli_helpers import DEMO, TAE, assert_video, dead_render, decoded, memflow, video_frames, write_jsonl, write_story
from .video import probe_video

REPO = Path(__file__).resolve().parents[1]
PREVIEW = ("--duration", "1.5s")  # two chunks
BAD_SCRIPT = "segments:\n- start: 0s\n  promt: a fox\n"


# ---------------------------------------------------------------------------------------------------------------------
# The plan: longest first, to the least loaded rank


def test_assign_hand_computed():
    # by cost: 0 (5), 1 (3), 2 (3), 3 (2), 4 (1); loads after each: [5,0] [5,3] [5,6] [7,6] [7,7]
    assert assign([5, 3, 3, 2, 1], 2) == [[0, 3], [1, 2, 4]]


def test_assign_breaks_ties_by_story_then_rank():
    assert assign([1, 1, 1, 1], 2) == [[0, 2], [1, 3]]
    assert assign([2, 2], 3) == [[0], [1], []]
    assert assign([], 2) == [[], []]


@pytest.mark.parametrize("ranks", [1, 2, 3, 8])
def test_assign_gives_every_story_once_and_balances(ranks: int):
    costs = [(i * 37) % 11 + 1 for i in range(40)]
    shares = assign(costs, ranks)
    assert sorted(index for share in shares for index in share) == list(range(len(costs)))
    loads = [sum(costs[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(costs)  # longest-first's bound
    for share in shares:  # each rank renders its longest stories first
        assert [costs[i] for i in share] == sorted((costs[i] for i in share), reverse=True)
    assert assign(costs, ranks) == shares  # the same plan on every process


def test_assign_needs_a_rank():
    with pytest.raises(ValueError, match="at least one rank"):
        assign([1.0], 0)


# ---------------------------------------------------------------------------------------------------------------------
# The torchrun environment


def test_rank_env_is_none_without_torchrun():
    assert rank_env({}) is None
    assert rank_env({"LOCAL_RANK": "0"}) is None


def test_rank_env_reads_torchrun_variables():
    environ = {
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "TORCHELASTIC_RESTART_COUNT": "2",
    }  # fmt: skip
    assert rank_env(environ) == RankEnv(rank=5, local_rank=1, world_size=8, restart=2, local_world_size=4)
    assert not RankEnv(5, 1, 8).is_main and RankEnv(0, 0, 8).is_main


@pytest.mark.parametrize(
    "environ",
    [
        {"RANK": "x", "WORLD_SIZE": "2"},
        {"RANK": "2", "WORLD_SIZE": "2"},
        {"RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "2"},
    ],
)
def test_rank_env_refuses_nonsense(environ: dict[str, str]):
    with pytest.raises(ValueError):
        rank_env(environ)


def test_rank_device_is_the_local_gpu_or_the_cpu():
    env = RankEnv(rank=3, local_rank=1, world_size=4, local_world_size=2)
    assert rank_device(env, None, gpus_here=2) == "cuda:1"
    assert rank_device(env, "cuda", gpus_here=8) == "cuda:1"
    assert rank_device(env, None, gpus_here=0) == "cpu"
    assert rank_device(env, "cpu", gpus_here=2) == "cpu"
    with pytest.raises(ValueError, match="cuda:LOCAL_RANK"):
        rank_device(env, "cuda:0", gpus_here=2)
    with pytest.raises(ValueError, match="started 2 processes on this machine, which has 1 GPU"):
        rank_device(env, None, gpus_here=1)


def test_a_rank_report_survives_the_store():
    report = RankReport(1, "cuda:1", 2.5, 30.25, (StoryOutcome(3, True, "", 12.5, 45), StoryOutcome(0, False, "boom")))
    assert RankReport.from_json(report.to_json()) == report


# ---------------------------------------------------------------------------------------------------------------------
# torchrun --nproc-per-node 2 over a mixed folder, against one process


def torchrun(*args: str | Path, processes: int = 2, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc-per-node N -m memflow_cli render ARGS`."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return run_python(*launcher[1:], "-m", "memflow_cli", "render", *args, cwd=cwd)


def run_python(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def mixed_folder(folder: Path) -> tuple[list[Path], Path]:
    """Two YAML stories of different lengths and seeds, a JSONL file of two stories, and a bad script."""
    folder.mkdir()
    good = [
        write_story(folder / "fox.yaml", ["0s", "0.75s"], "3s", title="Fox", seed=7),
        write_story(folder / "owl.yml", ["0s"], "1.5s", title="Owl", seed=3),
        write_jsonl(folder / "boats.jsonl", [["a boat", "a storm"], ["a lighthouse", "night falls"]]),
    ]
    bad = folder / "broken.yaml"
    bad.write_text(BAD_SCRIPT, encoding="utf-8")
    return good, bad


def sidecar_without_timings(video: Path) -> dict:
    """The sidecar less what depends on the run: its timings, and which prompts it found in the embedding cache."""
    data = json.loads(sidecar_path(video).read_text(encoding="utf-8"))
    data.pop("timings")
    data.pop("prompts")
    return data


NAMES = ["Fox.mp4", "Owl.mp4", "boats-001.mp4", "boats-002.mp4"]


def test_torchrun_renders_each_story_once_as_one_process_would(tmp_path: Path):
    good, bad = mixed_folder(tmp_path / "scripts")
    scripts = sorted([*good, bad])
    out = tmp_path / "out"

    first = torchrun(*scripts, "--out-dir", out, *DEMO, *PREVIEW, cwd=tmp_path)
    output = first.stdout + first.stderr
    assert first.returncode != 0, output  # the bad script
    assert sorted(path.name for path in out.glob("*.mp4")) == NAMES
    assert output.count("segments[0].promt") == 1, output  # reported once, not once per process
    (summary,) = [line for line in first.stdout.splitlines() if line.startswith("batch:")]
    assert summary.startswith("batch: 4 rendered, 0 skipped, 0 failed, 1 bad script on 2 processes"), summary
    rank_lines = [line for line in first.stdout.splitlines() if line.lstrip().startswith("rank ")]
    assert len(rank_lines) == 2 and all("(cpu)" in line for line in rank_lines)
    per_rank = [int(line.split(": ")[1].split(" rendered")[0]) for line in rank_lines]
    assert sum(per_rank) == 4 and min(per_rank) >= 1  # every story once, both processes worked
    assert sorted(line for line in first.stdout.splitlines() if line.endswith(".mp4")) == [
        str(out / name) for name in NAMES
    ]
    assert output.count("demo model: tiny random weights") == 1
    assert not list(out.glob("*.partial.mp4"))

    single = tmp_path / "single"
    result = memflow("render", *good, "--out-dir", single, *DEMO, *PREVIEW, "-q")
    assert result.exit_code == 0, result.stderr
    for name in NAMES:
        assert decoded(out / name) == decoded(single / name), name
        assert sidecar_without_timings(out / name) == sidecar_without_timings(single / name), name
    assert_video(out / "Fox.mp4", video_frames(2))

    # a rank killed (kill -9) while it rendered Owl: its partial and lock file stay, no process holds the lock
    for path in (out / "Owl.mp4", sidecar_path(out / "Owl.mp4")):
        path.unlink()
    dead_render(out / "Owl.mp4")
    stamps = {path.name: path.stat().st_mtime_ns for path in out.iterdir() if not path.name.startswith(".")}
    # the same through `memflow render --gpus 2`, which starts torchrun itself (here: two CPU processes)
    second = run_python("-m", "memflow_cli", "render", *good, "--out-dir", out, *DEMO, *PREVIEW, "--gpus", "2",
                        cwd=tmp_path)  # fmt: skip
    assert second.returncode == 0, second.stdout + second.stderr
    (summary,) = [line for line in second.stdout.splitlines() if line.startswith("batch:")]
    assert summary.startswith("batch: 1 rendered, 3 skipped, 0 failed on 2 processes"), summary
    assert second.stderr.count("skip: ") == 3
    assert sorted(line for line in second.stdout.splitlines() if line.endswith(".mp4")) == [
        str(out / name) for name in NAMES
    ]  # the finished videos, as a render with --skip-existing prints them
    assert {name: (out / name).stat().st_mtime_ns for name in stamps} == stamps  # finished videos untouched
    assert decoded(out / "Owl.mp4") == decoded(single / "Owl.mp4")  # rendered again from the start
    assert sorted(path.name for path in out.iterdir()) == sorted([*NAMES, *(n.replace(".mp4", ".json") for n in NAMES)])


def test_gpus_a_failed_story_is_one_line_a_story_rendered_elsewhere_is_in_progress(tmp_path: Path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    owl = write_story(scripts / "owl.yaml", ["0s"], "1.5s", title="Owl")
    fox = write_story(scripts / "fox.yaml", ["0s"], "1.5s", title="Fox")
    elk = write_story(scripts / "elk.yaml", ["0s"], "1.5s", title="Elk")
    out = tmp_path / "out"
    out.mkdir()
    (out / "Fox.mp4").write_bytes(b"not memflow's")  # no sidecar: not a finished render, and not ours to replace
    other = OutputLock(out / "Elk.mp4")  # another live memflow process renders Elk now
    other.acquire()
    try:
        result = run_python("-m", "memflow_cli", "render", owl, fox, elk, "--out-dir", out, *DEMO, *TAE, *PREVIEW,
                            "--gpus", "2", cwd=tmp_path)  # fmt: skip
    finally:
        other.release()
    assert result.returncode == 1
    summary = "batch: 1 rendered, 0 skipped, 1 failed, 1 in progress elsewhere on 2 processes"
    assert result.stdout.count(summary) == 1, result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: Fox"), result.stderr
    assert errors[0].endswith(
        "exists; nothing was rendered (no memflow metadata Fox.json beside it) (use --overwrite to replace it)"
    )
    assert f"in progress: {out / 'Elk.mp4'} (another memflow process is rendering it)" in result.stderr
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr  # not torchrun's report
    assert (out / "Fox.mp4").read_bytes() == b"not memflow's"
    assert_video(out / "Owl.mp4", video_frames(2))
    assert not (out / "Elk.mp4").exists()


def test_gpus_ctrl_c_is_one_message_per_stop_and_the_batch_resumes(tmp_path: Path):
    """Ctrl-C in the terminal (SIGINT to the whole process group) of `--gpus 2`: no launcher traceback, and each
    rank names the partial video it kept."""
    scripts, out = tmp_path / "scripts", tmp_path / "out"
    scripts.mkdir()
    stories = [write_story(scripts / f"{name}.yaml", ["0s"], "10m", title=name) for name in ("Elk", "Yak")]
    command = [sys.executable, "-m", "memflow_cli", "render", *map(str, stories), "--out-dir", str(out), *DEMO, "-q"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([*command, "--gpus", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, cwd=tmp_path, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while sum(path.stat().st_size > 2000 for path in out.glob(".*.partial.mp4")) < 2:  # both ranks wrote
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no frames were written in 300 s"
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "SignalException" not in stderr, stderr
    assert "interrupted: the batch was stopped; finished videos stay, run it again to resume" in stderr
    assert all(path.name.startswith(".") for path in out.iterdir())  # no finished video; the partials stay
    partials = sorted(out.glob(".*.partial.mp4"))
    assert len(partials) == 2, partials
    for partial in partials:  # each named once, by the rank that wrote it (rank 1's stderr is otherwise quiet)
        assert stderr.count(f"playable partial video: {partial}") == 1, stderr

    # the Ctrl-C ran the default Wan VAE; the resume, whose subject is the batch, the TAEHV decoder (no finished
    # video to match: the partials of the stopped renders are rendered again from the start)
    resumed = run_python("-m", "memflow_cli", "render", *stories, "--out-dir", out, *DEMO, *TAE, *PREVIEW,
                         "--gpus", "2", cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "batch: 2 rendered, 0 skipped, 0 failed on 2 processes" in resumed.stdout
    assert sorted(path.name for path in out.iterdir()) == ["Elk.json", "Elk.mp4", "Yak.json", "Yak.mp4"]


def test_under_torchrun_a_device_with_an_index_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    script = write_story(tmp_path / "owl.yaml", ["0s"], "1.5s")
    result = memflow("render", script, "--out-dir", tmp_path / "out", "--model", "demo", "--device", "cuda:0")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --device cuda:0: under torchrun each process renders on cuda:LOCAL_RANK")
    result = memflow("render", script, "--out-dir", tmp_path / "out", *DEMO, "--decode-device", "cpu")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --decode-device is for one process rendering one story at a time")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# --decode-device


def test_decode_device_cpu_gives_the_frames_of_one_device(tmp_path: Path):
    script = write_story(tmp_path / "fox.yaml", ["0s", "0.75s"], "1.5s", seed=5)
    one, two = tmp_path / "one.mp4", tmp_path / "two.mp4"
    assert memflow("render", script, *DEMO, "-o", one, "-q").exit_code == 0
    result = memflow("render", script, *DEMO, "--decode-device", "cpu", "-o", two, "-q")
    assert result.exit_code == 0, result.stderr
    assert decoded(one) == decoded(two)
    assert json.loads(sidecar_path(two).read_text())["decode_device"] == "cpu"
    assert "decode_device" not in json.loads(sidecar_path(one).read_text())


def test_bench_times_a_decode_device():
    """On the demo's TAEHV decoder: the subject is the decode device, and the bench times about 20 decodes
    (test_bench.py benches the Wan VAE)."""
    from memflow_cli.bench import BenchOptions, run
    from memflow_cli.decoders import DecoderChoice, DecoderRequest
    from memflow_cli.demo import DEMO_GEOMETRY
    from memflow_cli.settings import GenerationSettings

    cpu = torch.device("cpu")
    settings = GenerationSettings(geometry=DEMO_GEOMETRY)
    demo, tae = ModelSource.parse("demo"), DecoderRequest(DecoderChoice.TAE)
    options = BenchOptions(model=demo, device=cpu, settings=settings, latent_frames=3, decode_device=cpu, decoder=tae)
    result = run(options)
    assert result["decode_device"] == "cpu" and result["video_frames"] == 9
    assert result["fps_end_to_end"] > 0


def test_handed_over_leaves_chunks_already_there_alone():
    chunks = [torch.randn(1, 3, 16, 4, 6) for _ in range(3)]
    moved = list(handed_over(iter(chunks), torch.device("cpu")))
    assert all(a is b for a, b in zip(moved, chunks, strict=True))


# ---------------------------------------------------------------------------------------------------------------------
# --model random


def test_noise_text_encoder_is_seeded_by_the_prompt():
    encoder = NoiseTextEncoder(text_len=16, text_dim=8)
    a, b, a_again = encoder.encode(["a fox", "a boat", "a fox"])
    assert a.shape == (16, 8)
    assert torch.equal(a, a_again) and not torch.equal(a, b)
    assert torch.count_nonzero(a[4:]) == 0 and torch.count_nonzero(a[:4]) == 32  # a quarter of the rows carry values
    assert encoder.to("cuda") is encoder and encoder.offload() is encoder


def test_random_weights_are_labelled_noise():
    assert "noise" in RANDOM_NOTICE and "random" in RANDOM_NOTICE


# ---------------------------------------------------------------------------------------------------------------------
# GPU: `pytest -m gpu tests/test_distributed.py` on a machine with 2 GPUs (one GPU runs the first only)

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_render_with_random_weights_is_labelled_noise(tmp_path: Path):
    script = write_story(tmp_path / "fox.yaml", ["0s"], "3s")
    target = tmp_path / "fox.mp4"
    result = memflow("render", script, "--model", "random", "-o", target, *PREVIEW, "-q")
    assert result.exit_code == 0, result.stderr
    assert "random model: full-size random weights" in result.stderr
    sidecar = json.loads(sidecar_path(target).read_text())
    assert sidecar["weights"] == {"model": "random", "note": RANDOM_NOTICE}
    info = probe_video(target)
    assert (info.frames, info.width, info.height) == (video_frames(2), 832, 480)


@pytest.mark.gpu
@two_gpus
def test_gpu_decode_on_a_second_gpu_matches_one_gpu(tmp_path: Path):
    import numpy as np

    script = write_story(tmp_path / "fox.yaml", ["0s", "1.5s"], "3s", seed=9)
    one, two = tmp_path / "one.mp4", tmp_path / "two.mp4"
    assert memflow("render", script, *DEMO[:2], "--device", "cuda:0", "-o", one, "-q").exit_code == 0
    result = memflow("render", script, *DEMO[:2], "--device", "cuda:0", "--decode-device", "cuda:1", "-o", two, "-q")
    assert result.exit_code == 0, result.stderr
    a = np.frombuffer(decoded(one), np.uint8).astype(np.int16)
    b = np.frombuffer(decoded(two), np.uint8).astype(np.int16)
    assert a.shape == b.shape
    assert np.abs(a - b).mean() < 0.5  # same model, same arithmetic; only kernel choices may differ between GPUs


@pytest.mark.gpu
@two_gpus
def test_gpu_bench_decodes_on_a_second_gpu():
    from memflow_cli.bench import BenchOptions, run
    from memflow_cli.demo import DEMO_GEOMETRY
    from memflow_cli.settings import GenerationSettings

    settings = GenerationSettings(geometry=DEMO_GEOMETRY)
    demo = ModelSource.parse("demo")
    options = BenchOptions(model=demo, device=torch.device("cuda:0"), settings=settings, latent_frames=12)
    one = run(options)
    two = run(dataclasses.replace(options, decode_device=torch.device("cuda:1")))
    assert "decode_device" not in one and two["decode_device"] == "cuda:1"
    assert two["video_frames"] == one["video_frames"] == 45


@pytest.mark.gpu
@two_gpus
def test_gpu_handed_over_between_gpus_keeps_values():
    chunks = [torch.randn(1, 3, 16, 60, 104, device="cuda:0", dtype=torch.bfloat16) for _ in range(4)]
    moved = list(handed_over(iter(chunks), torch.device("cuda:1")))
    torch.cuda.synchronize("cuda:1")
    for a, b in zip(chunks, moved, strict=True):
        assert b.device == torch.device("cuda:1") and torch.equal(a.cpu(), b.cpu())


@pytest.mark.gpu
@two_gpus
def test_gpu_torchrun_on_two_gpus_renders_each_story_once(tmp_path: Path):
    good, bad = mixed_folder(tmp_path / "scripts")
    out = tmp_path / "out"
    result = torchrun(*good, "--out-dir", out, "--model", "demo", *PREVIEW, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "batch: 4 rendered, 0 skipped, 0 failed on 2 processes" in result.stdout
    assert "rank 0 (cuda:0)" in result.stdout and "rank 1 (cuda:1)" in result.stdout
    for name in NAMES:
        assert_video(out / name, video_frames(2))


# ---------------------------------------------------------------------------------------------------------------------
# memflow render --gpus N: torchrun started for the user


def test_without_option_drops_the_option_and_its_value():
    argv = ["render", "a.yaml", "--gpus", "4", "--out-dir", "out", "--gpus=2", "-q"]
    assert without_option(argv, "--gpus") == ["render", "a.yaml", "--out-dir", "out", "-q"]


def test_launch_problem():
    assert launch_problem(2, None, gpus_here=8) is None
    cores = len(os.sched_getaffinity(0))
    assert launch_problem(cores, "cpu", gpus_here=0) is None
    for many in (cores + 1, 100_000):  # never a process a core more than the machine has
        assert launch_problem(many, "cpu", gpus_here=0) == (
            f"--gpus {many} --device cpu: {cores} CPU core(s) here", f"use --gpus {cores} or fewer"
        )
    assert launch_problem(4, None, gpus_here=2) == ("--gpus 4: 2 CUDA GPU(s) here", "use --gpus 2")
    assert launch_problem(1, None, gpus_here=0)[1] == "add --device cpu to share the stories over CPU processes"
    assert "each process renders on a GPU of its own" in launch_problem(2, "cuda:1", gpus_here=2)[0]
