"""The plan below the commands, in-process: a request -> jobs -> what to do with each output.

No model is loaded here; outputs are claimed on real files (locks, partials, sidecars) in a temporary folder.
Subprocesses show that output problems are found, and finished videos skipped, before torch is imported.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from memflow_cli import __version__
from memflow_cli.output import OutputLock, lock_path, partial_path, sidecar_path
from memflow_cli.plan import (
    EXIT_BAD_INPUT,
    Claim,
    PlanError,
    RenderRequest,
    claim,
    parse_duration,
    plan_jobs,
    safe_filename,
)
from memflow_cli.record import request_record
from memflow_cli.request import GenerationOptions, ModelSource
from memflow_cli.settings import VideoGeometry

from .cli_helpers import EXAMPLES, dead_render, write_jsonl, write_story

GEOMETRY = VideoGeometry()  # 832x480: a chunk is 0.75 s, as with the demo model


def request(*scripts: Path, **options) -> RenderRequest:
    return RenderRequest(scripts=tuple(scripts), **options)


# ---------------------------------------------------------------------------------------------------------------------
# Jobs


def test_a_folder_request_plans_one_job_per_story_with_its_seed_settings_and_length(tmp_path: Path):
    fox = write_story(tmp_path / "fox.yaml", ["0s", "1s"], "3s", title="Fox", seed=7)
    boats = write_jsonl(tmp_path / "boats.jsonl", [["a boat", "a storm"], ["a calm", "a wave"]])
    asked = request(fox, boats, out_dir=tmp_path / "out", options=GenerationOptions(window=9))
    jobs, problems = plan_jobs(asked, GEOMETRY)
    assert problems == []
    assert [job.target.name for job in jobs] == ["Fox.mp4", "boats-001.mp4", "boats-002.mp4"]
    assert [job.seed for job in jobs] == [7, 0, 0]
    assert [job.chunks for job in jobs] == [4, 27, 27]  # 3 s and 20 s on the 0.75 s grid
    assert all(job.settings.memory.window == 9 for job in jobs)

    preview, _ = plan_jobs(request(fox, out_dir=tmp_path / "out", seed=3, duration_s=1.5), GEOMETRY)
    assert [(job.seed, job.chunks) for job in preview] == [(3, 2)]


def test_a_bad_script_stops_the_plan_or_is_listed_when_going_on(tmp_path: Path):
    good = write_story(tmp_path / "good.yaml", ["0s"], "3s")
    bad = tmp_path / "bad.yaml"
    bad.write_text("segments:\n- start: 0s\n  promt: a\n", encoding="utf-8")
    with pytest.raises(PlanError) as stopped:
        plan_jobs(request(good, bad, out_dir=tmp_path / "out"), GEOMETRY)
    assert stopped.value.exit_code == EXIT_BAD_INPUT
    assert stopped.value.message.startswith(f"{bad}:3: segments[0].promt: ")
    jobs, problems = plan_jobs(request(good, bad, out_dir=tmp_path / "out"), GEOMETRY, keep_going=True)
    assert [job.target.name for job in jobs] == ["good.mp4"]
    assert len(problems) == 1 and problems[0].startswith(f"{bad}:3: segments[0].promt: ")


def test_two_titles_that_name_one_file_are_refused_naming_both(tmp_path: Path):
    first = write_story(tmp_path / "one.yaml", ["0s"], "3s", title="a/b")
    second = write_story(tmp_path / "two.yaml", ["0s"], "3s", title="a_b")
    with pytest.raises(PlanError, match=r"two stories would both write .*a_b\.mp4: 'a/b' \(.*one\.yaml\) and 'a_b'"):
        plan_jobs(request(first, second, out_dir=tmp_path / "out"), GEOMETRY)


def test_a_bad_option_is_blamed_on_the_option(tmp_path: Path):
    fox = write_story(tmp_path / "fox.yaml", ["0s"], "3s")
    with pytest.raises(PlanError, match="^--bank-size: must be at least 1, got 0$"):
        plan_jobs(request(fox, output=tmp_path / "fox.mp4", options=GenerationOptions(bank_size=0)), GEOMETRY)
    with pytest.raises(PlanError, match="^--duration: must be longer than 0s$"):
        parse_duration("0s")


def test_titles_with_control_characters_make_one_line_file_names():
    assert safe_filename("fox\nnight\r\x7f") == "fox_night__"
    assert safe_filename(" ../.. ") == "_"  # never a way out of the folder


# ---------------------------------------------------------------------------------------------------------------------
# Outputs refused before anything heavy is imported

NO_TORCH = """
import json, sys
from memflow_cli.cli import app
results = []
for args in json.loads(sys.argv[1]):
    results.append(app(args, standalone_mode=False))  # the exit code, without leaving
print(json.dumps({"codes": results, "torch": "torch" in sys.modules}))
"""


def test_output_problems_are_found_at_once_before_torch_is_imported(tmp_path: Path):
    script = EXAMPLES / "lighthouse.yaml"
    (tmp_path / "folder.mp4").mkdir()
    newline, newline_dir = str(tmp_path / "two\nlines.mp4"), str(tmp_path / "a\nb")
    cases = {
        "/dev/null": "error: /dev/null: the output must be an .mp4 file",
        str(tmp_path): f"error: {tmp_path}: the output must be an .mp4 file",
        str(tmp_path / "x.txt"): f"error: {tmp_path / 'x.txt'}: the output must be an .mp4 file",
        str(tmp_path / "folder.mp4"): f"error: cannot write {tmp_path / 'folder.mp4'}: it is a folder",
        str(tmp_path / "missing" / "x.mp4"): f"error: cannot write {tmp_path / 'missing' / 'x.mp4'}: folder "
        f"{tmp_path / 'missing'} does not exist",
        newline: f"error: -o {ascii(newline)}: the path has a control character (such as a newline) in it",
    }
    runs = [["render", str(script), "--model", "demo", "-o", target] for target in cases]
    runs.append(["render", str(script), "--model", "demo", "--out-dir", newline_dir])
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", NO_TORCH, json.dumps(runs)], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report == {"codes": [2] * len(runs), "torch": False}, result.stderr
    errors = [line.partition(" — ")[0] for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors[:-1] == list(cases.values())  # each with its fix after " — "
    assert errors[-1].startswith(f"error: --out-dir {ascii(newline_dir)}: the path has a control")
    assert len(result.stderr.splitlines()) == len(runs)  # each error is one line, its fix included
    assert time.monotonic() - started < 60  # torch alone takes longer than that on a busy machine
    assert sorted(path.name for path in tmp_path.iterdir()) == ["folder.mp4"]


def test_bad_lora_options_are_one_line_naming_the_option_before_anything_loads(tmp_path: Path):
    script, target = EXAMPLES / "lighthouse.yaml", str(tmp_path / "x.mp4")
    runs = [["render", str(script), "--model", "demo", "-o", target, "--lora-alpha", "nan"],
            ["render", str(script), "--model", "demo", "-o", target, "--lora-rank", "0"],
            ["live", "--prompt", "a fox", "--model", "demo", "-o", target, "--lora-alpha", "inf"]]  # fmt: skip
    result = subprocess.run([sys.executable, "-c", NO_TORCH, json.dumps(runs)], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["codes"] == [2, 2, 2], result.stderr
    errors = [line.partition(" — ")[0] for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --lora-alpha nan: not a number",
                      "error: --lora-rank: must be a whole number from 1 up, got 0",
                      "error: --lora-alpha inf: not a number"]  # fmt: skip
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------------
# Claims: what is on disk


def finished_render(job, duration_s: float | None = None) -> None:
    """Write what a finished render of `job` leaves: a video (any bytes here) and memflow's sidecar."""
    job.target.write_bytes(b"video")
    record = request_record(job.story, job.story.timeline(GEOMETRY, duration_s), job.settings, job.seed)
    sidecar_path(job.target).write_text(json.dumps({"memflow_version": __version__, **record, "fp8": False}))


def one_job(tmp_path: Path, **options):
    fox = write_story(tmp_path / "fox.yaml", ["0s"], "3s", title="fox")
    req = request(fox, out_dir=tmp_path / "out", **options)
    (tmp_path / "out").mkdir(exist_ok=True)
    (job,), _ = plan_jobs(req, GEOMETRY)
    return req, job


def test_a_render_over_finished_videos_skips_them_without_importing_torch(tmp_path: Path):
    """A batch run again over finished stories (the batch script's `render --skip-existing` per script): no
    device is needed, so torch is not imported; a device name is still checked."""
    fox = write_story(tmp_path / "fox.yaml", ["0s"], "3s", title="fox")
    owl = write_story(tmp_path / "owl.yaml", ["0s"], "1.5s", title="owl")
    out = tmp_path / "out"
    out.mkdir()
    jobs, _ = plan_jobs(request(fox, owl, out_dir=out, skip_existing=True), GEOMETRY)
    for job in jobs:
        finished_render(job)
    stamps = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    again = ["render", str(fox), str(owl), "--out-dir", str(out), "--skip-existing"]
    runs = [[*again, "--device", "cpu"], [*again, "--device", "cdua"]]
    result = subprocess.run([sys.executable, "-c", NO_TORCH, json.dumps(runs)], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"codes": [0, 2], "torch": False}, result.stderr
    assert result.stdout.splitlines()[:-1] == [str(out / "fox.mp4"), str(out / "owl.mp4")]
    assert result.stderr.splitlines()[:3] == [
        f"skip: {out / 'fox.mp4'} (a finished render of this request)",
        f"skip: {out / 'owl.mp4'} (a finished render of this request)",
        "error: --device cdua: memflow does not run on cdua devices — use cpu, cuda or cuda:N (memflow runs on the "
        "CPU and on CUDA GPUs)",
    ]
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == stamps


def test_resuming_replaces_the_partial_of_a_dead_render(tmp_path: Path):
    req, job = one_job(tmp_path, skip_existing=True)
    dead_render(job.target)
    with ExitStack() as held:
        assert claim(job, req, GEOMETRY, held) is Claim.RENDER
        assert not partial_path(job.target).exists()  # the story starts again from the beginning
        assert lock_path(job.target).read_text() == f"{__import__('os').getpid()}\n"
    assert not lock_path(job.target).exists()


def test_without_resuming_a_partial_is_named_and_kept(tmp_path: Path):
    req, job = one_job(tmp_path)
    dead_render(job.target)
    with ExitStack() as held, pytest.raises(PlanError) as refused:
        claim(job, req, GEOMETRY, held)
    assert refused.value.message == (
        f"{partial_path(job.target)} holds the frames of an earlier render of fox.mp4 that was stopped; "
        "nothing was rendered"
    )
    assert partial_path(job.target).read_bytes() == b"the frames of a render that died"


def test_resuming_skips_a_finished_video_and_never_touches_it(tmp_path: Path):
    req, job = one_job(tmp_path, skip_existing=True)
    finished_render(job)
    before = job.target.stat().st_mtime_ns
    with ExitStack() as held:
        assert claim(job, req, GEOMETRY, held) is Claim.SKIP
    assert job.target.read_bytes() == b"video" and job.target.stat().st_mtime_ns == before
    assert not lock_path(job.target).exists()


def test_overwrite_with_resume_replaces_a_preview_but_skips_a_finished_video(tmp_path: Path):
    req, job = one_job(tmp_path, skip_existing=True, overwrite=True)
    finished_render(job, duration_s=1.5)  # a preview is not the finished render
    with ExitStack() as held:
        assert claim(job, req, GEOMETRY, held) is Claim.RENDER
    finished_render(job)
    with ExitStack() as held:
        assert claim(job, req, GEOMETRY, held) is Claim.SKIP


def test_a_story_another_live_process_renders_is_in_progress_in_a_batch(tmp_path: Path):
    req, job = one_job(tmp_path, skip_existing=True)
    partial_path(job.target).write_bytes(b"frames being written")
    other = OutputLock(job.target)  # flock: another open file conflicts as another process would
    other.acquire()
    try:
        with ExitStack() as held:
            assert claim(job, req, GEOMETRY, held) is Claim.IN_PROGRESS
        assert partial_path(job.target).read_bytes() == b"frames being written"  # never touched
        single = RenderRequest(scripts=req.scripts, output=job.target)
        with ExitStack() as held, pytest.raises(PlanError, match="is writing .* right now; nothing was rendered"):
            claim(job, single, GEOMETRY, held)  # -o: the one story cannot be done, an error
    finally:
        other.release()


# ---------------------------------------------------------------------------------------------------------------------
# Prompts the text encoder cuts


def long_prompt_story(tmp_path: Path, words: int) -> Path:
    prompt = " ".join(["a lighthouse keeper climbs the stairs"] * (words // 6))
    path = tmp_path / "long.yaml"
    segments = f"segments:\n  - start: 0s\n    prompt: a fox\n  - start: 1.5s\n    prompt: {prompt}\n"
    path.write_text(f"title: long\nduration: 3s\n{segments}")
    return path


def test_the_token_limits_are_the_text_encoders():
    from memflow_cli.demo import DEMO_TEXT_LEN
    from memflow_cli.plan import RELEASE_TEXT_TOKENS, text_token_limit
    from memflow_cli.text_encoder import DEFAULT_MAX_LENGTH

    hub, folder = ModelSource.parse(None), ModelSource.parse("/weights")
    assert text_token_limit(hub) == text_token_limit(folder) == RELEASE_TEXT_TOKENS == DEFAULT_MAX_LENGTH
    assert text_token_limit(ModelSource.parse("demo")) == DEMO_TEXT_LEN == 256


def test_only_the_segments_a_render_reaches_are_reported_cut(tmp_path: Path):
    from memflow_cli.plan import cut_prompts
    from memflow_cli.script import load_scripts

    (story,) = load_scripts(long_prompt_story(tmp_path, 600), geometry=GEOMETRY)
    (cut,) = cut_prompts(story, GEOMETRY, 512)  # counted by the estimate
    assert (cut.segment, cut.start_s, cut.words, cut.exact) == (1, 1.5, 600, False)
    assert cut_prompts(story, GEOMETRY, 512, duration_s=1.5) == []  # a preview that ends before segment 1
    one_token_a_word = lambda text: len(text.split()) + 1  # noqa: E731 - and the end token
    assert cut_prompts(story, GEOMETRY, 512, count=one_token_a_word) == [
        dataclasses.replace(
            cut, tokens=601, kept_words=511, last_kept="lighthouse keeper climbs the stairs a", exact=True
        )
    ]
