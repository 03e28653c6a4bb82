"""Nothing lost, nothing clobbered, no tracebacks: `render` and the batch script against concurrent renders,
kills, signals, full disks and wrong outputs.

Renders run the real `memflow` in real processes on the demo model where processes matter (two renders at
once, kill -9, SIGTERM, a full disk); the rest run in-process through Typer's runner. Ctrl-C mid-render, Ctrl-C
while the model loads and a batch script test run the default Wan VAE; the other process tests, and the in-process
renders whose subject is a file or a request, decode with the demo's TAEHV decoder (`TAE`), their subject being
the process or the files, not the decoder.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memflow_cli import __version__, output
from memflow_cli.output import OutputLock, lock_path, partial_path, sidecar_path
from tests.cli_helpers import (
    BATCH_RENDER,
    DEMO,
    EXAMPLES,
    REPO,
    TAE,
    assert_video,
    chunks_until,
    dead_render,
    memflow,
    video_frames,
    wait_until,
    write_story,
)
from tests.video import probe_video

MEMFLOW = [sys.executable, "-m", "memflow_cli.cli"]
LONG = "10m"  # a render that is still running whatever the machine's speed, until the test stops it


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def start_render(script: Path, target: Path, *options: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*MEMFLOW, "render", str(script), *DEMO, "-o", str(target), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background jobs ignore SIGINT, and Python then never raises KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for_frames(partial: Path, process: subprocess.Popen) -> None:
    """Until the partial video holds a first fragment (its header is about 800 bytes)."""
    wait_until(lambda: partial.exists() and partial.stat().st_size > 2000, process, "no frames were written")


def run_memflow(*args: str | Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*MEMFLOW, *map(str, args)], capture_output=True, text=True, timeout=300, **kwargs)


def one_error(stderr: str) -> str:
    """The error line of a known error: no traceback, one `error:` line (its fix after ` — ` on that line)."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def error_without_fix(stderr: str) -> str:
    """The one error line (`one_error`) up to the fix that follows its last ` — `, checked to be there."""
    message, dash, fix = one_error(stderr).rpartition(" — ")
    assert dash and fix, stderr
    return message


# ---------------------------------------------------------------------------------------------------------------------
# Two renders of one output


def test_ctrl_c_keeps_a_playable_partial_while_a_second_render_of_it_stops_and_another_output_renders(tmp_path: Path):
    """One render in a real process; while it writes, a second render of its output stops at once and a render of
    another output runs beside it (both in this process); Ctrl-C (SIGINT) then stops the first: exit 130, its
    finished chunks stay playable, the target never appears."""
    script = write_story(tmp_path / "fox.yaml", ["0s"], LONG)
    target, partial = tmp_path / "same.mp4", partial_path(tmp_path / "same.mp4")
    beside = tmp_path / "beside" / "b.mp4"
    beside.parent.mkdir()
    first = start_render(script, target, "--seed", "1")
    try:
        wait_for_frames(partial, first)
        second = memflow("render", script, *DEMO, "-o", target, "--seed", "2", "--duration", "1.5s")
        other = memflow("render", script, *DEMO, "-o", beside, "--duration", "1.5s", "-q")
        assert first.poll() is None  # both ran while the first was still rendering
        first.send_signal(signal.SIGINT)
        stdout, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
    assert second.exit_code == 2
    assert one_error(second.stderr) == (
        f"error: another memflow render (process {first.pid}) is writing {target} right now; nothing was rendered"
        " — wait for it to finish, or choose another output"
    )
    assert "demo model" not in second.stderr  # stopped before the model loaded
    assert other.exit_code == 0, other.stderr
    assert_video(beside, video_frames(2))
    assert json.loads(sidecar_path(beside).read_text())["seed"] == 0

    assert first.returncode == 130, stderr
    assert stdout == "" and "Traceback" not in stderr
    assert not target.exists() and not sidecar_path(target).exists()
    assert names(tmp_path) == [".same.partial.mp4", "beside", "fox.yaml"]  # the first render's frames; no lock file
    frames = probe_video(partial).frames
    chunks = (frames + 3) // 12
    assert 0 < chunks < chunks_until(600.0) and frames == video_frames(chunks)
    assert f"interrupted: fox: {frames} frames written; playable partial video: {partial}" in stderr


# ---------------------------------------------------------------------------------------------------------------------
# The batch script and --skip-existing


def run_batch(scripts: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    memflow_command = Path(sys.executable).with_name("memflow")  # the console script of this environment
    if not memflow_command.is_file():
        pytest.skip(f"no {memflow_command}")
    env = {**os.environ, "MEMFLOW": str(memflow_command)}
    command = ["bash", str(BATCH_RENDER), str(scripts), str(out), *DEMO, "-q", *options]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@needs_bash
def test_the_batch_script_renders_a_preview_again_and_skips_a_finished_video(tmp_path: Path):
    scripts, out = tmp_path / "scripts", tmp_path / "out"
    scripts.mkdir()
    write_story(scripts / "fox.yaml", ["0s"], "3s")
    preview = run_batch(scripts, out, "--duration", "1.5s")
    assert preview.returncode == 0, preview.stderr
    assert_video(out / "fox.mp4", video_frames(2))

    full = run_batch(scripts, out)
    assert full.returncode == 1
    assert full.stdout.splitlines()[-1] == "batch: 0 rendered, 0 skipped, 1 failed"
    assert "fox.mp4 exists; nothing was rendered (it is 1.31 s long, 2.81 s were asked)" in full.stderr
    assert_video(out / "fox.mp4", video_frames(2))  # the preview stays until asked

    again = run_batch(scripts, out, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[-1] == "batch: 1 rendered, 0 skipped, 0 failed"
    assert_video(out / "fox.mp4", video_frames(chunks_until(3.0)))

    done = run_batch(scripts, out)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "batch: 0 rendered, 1 skipped, 0 failed"
    assert "demo model" not in done.stderr  # nothing to render: the model is not even loaded
    assert names(out) == ["failures.log", "fox.json", "fox.mp4"]


@needs_bash
def test_the_batch_script_takes_names_from_memflow_logs_failures_and_skips_finished_scripts(tmp_path: Path):
    scripts, out = tmp_path / "scripts", tmp_path / "out"
    scripts.mkdir()
    stories = {
        "1.yaml": "title: a/b\n",
        "2.yaml": "title: a_b\n",  # the same file name as a/b
        "3.yaml": 'title: "caf\\u00e9 #1"\n',  # a YAML escape
        "4.yaml": "title: >-\n  first\n  story\n",  # a block scalar
        "dots.yaml": 'title: "..."\n',  # memflow names it untitled.mp4
        "two.yml": "",  # no title: the file name
    }
    for name, title in stories.items():  # one prompt: encoded once, the later renders find it in the cache
        (scripts / name).write_text(title + "duration: 1.5s\nsegments:\n  - start: 0s\n    prompt: a fox\n")
    (scripts / "broken.yaml").write_text("segments:\n- start: 0s\n  promt: a\n", encoding="utf-8")
    (scripts / "notes.txt").write_text("not a script\n", encoding="utf-8")
    out.mkdir()
    dead_render(out / "two.mp4")  # a render of two.yml was killed (kill -9): partial and lock file stay, unheld

    first = run_batch(scripts, out, *TAE)
    assert first.returncode == 1, first.stderr
    assert first.stdout.splitlines()[-1] == "batch: 5 rendered, 0 skipped, 2 failed"  # the dead render is no failure
    assert str(out / "two.mp4") in first.stdout.splitlines()
    log = (out / "failures.log").read_text(encoding="utf-8")
    assert f"{scripts / '2.yaml'}: a story would write {out / 'a_b.mp4'}, which {scripts / '1.yaml'}" in log
    assert "broken.yaml" in log and "segments[0].promt" in log and "notes.txt" not in log
    assert json.loads(sidecar_path(out / "a_b.mp4").read_text())["title"] == "a/b"  # not replaced by a_b
    videos = ("a_b.mp4", "café #1.mp4", "first story.mp4", "two.mp4", "untitled.mp4")
    for name in videos:  # two.mp4: its dead render's partial replaced, rendered from the start
        assert_video(out / name, video_frames(2))

    finished = {name: (out / name).stat().st_mtime_ns for name in videos}
    second = run_batch(scripts, out, *TAE, "--overwrite")  # never lets one story replace another's video
    assert second.returncode == 1
    assert second.stdout.splitlines()[-1] == "batch: 0 rendered, 5 skipped, 2 failed"
    assert "skip:" in second.stderr and "4.yaml" in second.stderr and "two.yml" in second.stderr
    assert json.loads(sidecar_path(out / "a_b.mp4").read_text())["title"] == "a/b"
    assert {name: (out / name).stat().st_mtime_ns for name in videos} == finished  # --overwrite kept --skip-existing
    sidecars = [name.replace(".mp4", ".json") for name in videos]
    assert names(out) == sorted(["failures.log", *videos, *sidecars])  # no partial, no lock file


def test_check_json_names_every_output(tmp_path: Path):
    script = EXAMPLES / "two_stories.jsonl"
    result = memflow("check", script, "--out-dir", tmp_path / "renders", "--json")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["output"] for r in records] == [str(tmp_path / "renders" / f"two_stories-00{n}.mp4") for n in (1, 2)]
    assert [r["line"] for r in records] == [1, 2]


def test_skip_existing_skips_only_a_finished_render_of_the_same_request(tmp_path: Path):
    script = write_story(tmp_path / "fox.yaml", ["0s"], "10s", seed=4)
    target = tmp_path / "fox.mp4"
    assert memflow("render", script, *DEMO, *TAE, "-o", target, "--duration", "1.5s", "-q").exit_code == 0
    before = target.read_bytes()
    same = memflow("render", script, *DEMO, *TAE, "-o", target, "--duration", "1.5s", "--skip-existing")
    assert same.exit_code == 0
    assert same.stdout == f"{target}\n" and f"skip: {target}" in same.stderr and "demo model" not in same.stderr
    other = memflow("render", script, *DEMO, *TAE, "-o", target, "--duration", "1.5s", "--seed", "5", "--skip-existing")
    assert other.exit_code == 2
    assert "(it was rendered with seed 4, not 5) — " in one_error(other.stderr)
    assert target.read_bytes() == before


# ---------------------------------------------------------------------------------------------------------------------
# Files replaced without --overwrite


def test_the_sidecar_never_replaces_a_file_memflow_did_not_write(tmp_path: Path):
    script = write_story(tmp_path / "fox.yaml", ["0s"], "1.5s")
    notes = tmp_path / "notes.json"
    notes.write_text('{"todo": "buy milk"}\n')
    for options in ((), ("--overwrite",)):
        result = memflow("render", script, *DEMO, "-o", tmp_path / "notes.mp4", *options)
        assert result.exit_code == 2
        assert one_error(result.stderr) == (
            f"error: {notes} exists and was not written by memflow; the video's metadata would replace it, so "
            "nothing was rendered — move that file away, or choose another output name"
        )
    assert notes.read_text() == '{"todo": "buy milk"}\n'
    assert names(tmp_path) == ["fox.yaml", "notes.json"]


def test_a_story_titled_like_a_partial_file_keeps_its_video(tmp_path: Path):
    first = write_story(tmp_path / "a.yaml", ["0s"], "1.5s", title="x.partial")
    second = write_story(tmp_path / "b.yaml", ["0s"], "1.5s", title="x")
    out = tmp_path / "out"
    result = memflow("render", first, second, *DEMO, *TAE, "--out-dir", out, "-q")
    assert result.exit_code == 0, result.stderr
    assert names(out) == ["x.json", "x.mp4", "x.partial.json", "x.partial.mp4"]
    assert_video(out / "x.partial.mp4", video_frames(2))
    assert json.loads((out / "x.partial.json").read_text())["title"] == "x.partial"


# ---------------------------------------------------------------------------------------------------------------------
# The partial of a killed render, and resuming


def test_kill_9_leaves_a_partial_that_a_single_render_names_and_a_batch_renders_again(tmp_path: Path):
    script = write_story(tmp_path / "fox.yaml", ["0s"], LONG, title="k9")
    target = tmp_path / "k9.mp4"
    partial = partial_path(target)
    killed = start_render(script, target, *TAE)
    try:
        wait_for_frames(partial, killed)
    finally:
        killed.kill()
        killed.communicate()
    frames = probe_video(partial).frames
    assert frames > 0
    kept = partial.read_bytes()
    assert lock_path(target).exists()  # kill -9 leaves the lock file, but not the lock

    again = memflow("render", script, *DEMO, *TAE, "-o", target, "--duration", "1.5s")  # the kill: the process part
    assert again.exit_code == 2
    assert one_error(again.stderr) == (
        f"error: {partial} holds the frames of an earlier render of k9.mp4 that was stopped; nothing was rendered"
        " — watch or move it, or use --overwrite to render again from the start"
    )
    assert "--overwrite" in again.stderr
    assert partial.read_bytes() == kept

    resumed = memflow("render", script, *DEMO, *TAE, "--out-dir", tmp_path, "--skip-existing", "--duration", "1.5s",
                      "-q")  # fmt: skip
    assert resumed.exit_code == 0, resumed.stderr
    assert resumed.stdout == f"{target}\n"
    assert_video(target, video_frames(2))  # rendered again from the start
    assert names(tmp_path) == ["fox.yaml", "k9.json", "k9.mp4"]  # no partial, no lock file


def test_a_story_another_live_process_renders_is_in_progress_not_failed(tmp_path: Path):
    first = write_story(tmp_path / "a.yaml", ["0s"], "1.5s")
    second = write_story(tmp_path / "b.yaml", ["0s"], "1.5s")
    out = tmp_path / "out"
    out.mkdir()
    other = OutputLock(out / "b.mp4")  # what another memflow process holds while it renders b.mp4
    other.acquire()
    try:
        result = memflow("render", first, second, *DEMO, *TAE, "--out-dir", out, "-q")
    finally:
        other.release()
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [str(out / "a.mp4")]
    assert f"in progress: {out / 'b.mp4'} (another memflow process is rendering it)" in result.stderr.splitlines()
    assert "error" not in result.stderr
    assert names(out) == ["a.json", "a.mp4"]


# ---------------------------------------------------------------------------------------------------------------------
# One line, not a traceback


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["render", "bench"])
def test_cuda_without_cuda_is_bad_input(tmp_path: Path, command: str):
    script = write_story(tmp_path / "fox.yaml", ["0s"], "1.5s")
    args = [script, "--model", "demo", "-o", tmp_path / "fox.mp4"] if command == "render" else ["--model", "demo"]
    result = memflow(command, *args, "--device", "cuda")
    assert result.exit_code == 2
    assert one_error(result.stderr).startswith("error: --device cuda: ")
    assert "--device cpu" in result.stderr and "weights download" not in result.stderr
    assert names(tmp_path) == ["fox.yaml"]


def test_an_out_dir_naming_a_file_is_refused(tmp_path: Path):
    script = write_story(tmp_path / "fox.yaml", ["0s"], "1.5s")
    (tmp_path / "renders").write_text("not a folder")
    result = memflow("render", script, *DEMO, "--out-dir", tmp_path / "renders")
    assert result.exit_code == 2
    assert error_without_fix(result.stderr) == f"error: --out-dir {tmp_path / 'renders'}: it is a file, not a folder"


def test_an_out_dir_that_cannot_be_created_is_refused(tmp_path: Path):
    script = write_story(tmp_path / "fox.yaml", ["0s"], "1.5s")
    place = Path("/proc/memflow-renders")  # /proc takes no new folders, even from root
    if not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    result = memflow("render", script, *DEMO, "--out-dir", place)
    assert result.exit_code == 2
    assert one_error(result.stderr).startswith(f"error: --out-dir {place}: cannot create it: ")


def test_a_title_too_long_for_a_file_name_is_a_script_error(tmp_path: Path):
    script = write_story(tmp_path / "long.yaml", ["0s"], "1.5s", title="t" * 300)
    for command in ("check", "render"):
        options = () if command == "check" else (*DEMO, "--out-dir", tmp_path / "out")
        result = memflow(command, script, *options)
        assert result.exit_code == 2
        assert one_error(result.stderr) == (
            f"error: {script}:1: title: the title is 300 bytes long in UTF-8, at most 200 fit in a file name — "
            "shorten the title: it names the video file"
        )


def test_an_output_name_too_long_for_its_temporary_files_stops_before_the_model_loads(tmp_path: Path):
    script = write_story(tmp_path / "fox.yaml", ["0s"], "1.5s")
    target = tmp_path / ("n" * 241 + ".mp4")  # 245 bytes fit; its partial and lock files would not
    result = memflow("render", script, *DEMO, "-o", target)
    assert result.exit_code == 2
    assert "the file name is 245 bytes long" in one_error(result.stderr)
    assert "demo model" not in result.stderr
    assert names(tmp_path) == ["fox.yaml"]


def test_a_sidecar_that_cannot_be_written_names_the_complete_video(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    script = write_story(tmp_path / "fox.yaml", ["0s"], "1.5s")
    target = tmp_path / "fox.mp4"
    write_sidecar = output.write_sidecar

    def write_sidecar_on_a_full_disk(path: Path, data: dict) -> None:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, limit[1]))  # the disk fills up now (Python ignores SIGXFSZ)
        try:
            write_sidecar(path, data)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)

    monkeypatch.setattr(output, "write_sidecar", write_sidecar_on_a_full_disk)
    result = memflow("render", script, *DEMO, *TAE, "-o", target, "-q")
    assert result.exit_code == 1
    assert error_without_fix(result.stderr) == (
        f"error: fox: the video {target} is complete, but its metadata {sidecar_path(target)} could not be written: "
        "File too large"
    )
    assert_video(target, video_frames(2))
    assert names(tmp_path) == ["fox.mp4", "fox.yaml"]


# ---------------------------------------------------------------------------------------------------------------------
# Output problems found first; a full disk


def test_a_missing_output_folder_is_found_before_the_model_loads(tmp_path: Path):
    script = write_story(tmp_path / "fox.yaml", ["0s"], "1.5s")
    result = memflow("render", script, *DEMO, "-o", tmp_path / "missing" / "fox.mp4")
    assert result.exit_code == 2
    assert error_without_fix(result.stderr) == f"error: cannot write {tmp_path / 'missing' / 'fox.mp4'}: folder " + (
        f"{tmp_path / 'missing'} does not exist"
    )
    assert "demo model" not in result.stderr
    assert names(tmp_path) == ["fox.yaml"]


def test_a_full_disk_is_one_line_that_names_the_partial(tmp_path: Path):
    """A file-size limit on the render and its ffmpeg: what a full disk looks like to the writer."""
    script = write_story(tmp_path / "fox.yaml", ["0s"], LONG)
    target = tmp_path / "fox.mp4"

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, resource.RLIM_INFINITY))

    result = subprocess.run(
        [*MEMFLOW, "render", str(script), *DEMO, *TAE, "-o", str(target), "--duration", "10s", "-q"],
        capture_output=True, text=True, timeout=300, preexec_fn=small_disk,
    )  # fmt: skip
    assert result.returncode == 1
    line = one_error(result.stderr)
    assert line.startswith(f"error: fox: ffmpeg failed writing {partial_path(target)}: ")
    assert line.endswith("the file keeps the frames written so far")
    assert partial_path(target).exists() and not target.exists()
    assert not lock_path(target).exists()


# ---------------------------------------------------------------------------------------------------------------------
# A seed torch cannot take


def test_a_seed_too_large_is_bad_input_and_leaves_nothing(tmp_path: Path):
    script = write_story(tmp_path / "fox.yaml", ["0s"], "1.5s")
    result = memflow("render", script, *DEMO, "-o", tmp_path / "fox.mp4", "--seed", "99999999999999999999")
    assert result.exit_code == 2
    assert error_without_fix(result.stderr) == "error: --seed: must be between 0 and 2**64-1, got 99999999999999999999"
    assert names(tmp_path) == ["fox.yaml"]
    largest = memflow("render", script, *DEMO, *TAE, "-o", tmp_path / "fox.mp4", "--seed", str(2**64 - 1), "-q")
    assert largest.exit_code == 0, largest.stderr
    assert_video(tmp_path / "fox.mp4", video_frames(2))


INTEGER_OPTIONS = {
    "render": ["--seed", "--window", "--sink", "--bank-size", "--record-interval", "--lora-rank", "--gpus"],
    "bench": ["--frames", "--switches", "--window", "--sink", "--bank-size", "--record-interval"],
    "live": ["--seed", "--ahead", "--window", "--sink", "--bank-size", "--record-interval", "--lora-rank"],
}


def test_every_integer_option_of_every_command_reads_one_shared_parser():
    import typing

    from memflow_cli.cli import app

    for command in app.registered_commands:
        hints = typing.get_type_hints(command.callback, include_extras=True)
        options = {name: typing.get_args(hint) for name, hint in hints.items() if name != "return"}
        integers = {name for name, (kind, *_) in options.items() if int in (kind, *typing.get_args(kind))}
        parsers = {name for name in integers if options[name][1].parser is not None}
        assert integers == parsers, f"{command.callback.__name__}: {sorted(integers - parsers)} read by int()"
        declared = {f"--{name.replace('_', '-')}" for name in integers}
        assert declared == set(INTEGER_OPTIONS.get(command.callback.__name__, [])), command.callback.__name__


@pytest.mark.parametrize("command", sorted(INTEGER_OPTIONS))
def test_integer_options_take_ascii_digits_only_in_one_line(tmp_path: Path, command: str):
    script = write_story(tmp_path / "fox.yaml", ["0s"], "1.5s")
    before = {"render": [script, "-o", tmp_path / "fox.mp4"], "bench": [],
              "live": ["--prompt", "a fox", "-o", tmp_path / "fox.mp4"]}[command]  # fmt: skip
    for option in INTEGER_OPTIONS[command]:
        for value in ("\u0664\u0662", "1_0", "+3", " 7", "\uff18", "3.0"):  # Arabic-Indic 42, fullwidth 8
            result = memflow(command, *before, *DEMO, option, value)
            assert result.exit_code == 2, (option, value, result.output)
            assert one_error(result.stderr).startswith(f"error: {option} {value}: not a whole number written in the "
                                                       "digits 0-9"), result.stderr  # fmt: skip
            assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert names(tmp_path) == ["fox.yaml"]


@pytest.mark.parametrize("arguments, message", [
    (["bench", "--frames", "2"], "--frames 2: give a number from 3 to 12000"),
    (["bench", "--switches", "-1"], "--switches -1: give 0 or more"),
    (["live", "--prompt", "a fox", "-o", "fox.mp4", "--ahead", "65"], "--ahead 65: give a number from 0 to 64"),
    (["render", "fox.yaml", "-o", "fox.mp4", "--gpus", "0"], "--gpus 0: give 1 or more"),
])  # fmt: skip
def test_integer_options_out_of_their_range_are_one_line(arguments: list[str], message: str):
    result = memflow(*arguments)
    assert result.exit_code == 2 and one_error(result.stderr) == f"error: {message}", result.output


# ---------------------------------------------------------------------------------------------------------------------
# Signals: SIGTERM, SIGHUP, Ctrl-C while the model loads


@pytest.mark.parametrize(
    "stop, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGHUP, 129, "hung up")], ids=["TERM", "HUP"]
)
def test_sigterm_and_sighup_stop_like_ctrl_c_and_name_the_partial(tmp_path: Path, stop: int, code: int, word: str):
    script = write_story(tmp_path / "fox.yaml", ["0s"], LONG)
    target = tmp_path / "fox.mp4"
    partial = partial_path(target)
    process = start_render(script, target, *TAE)
    try:
        wait_for_frames(partial, process)
        process.send_signal(stop)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == code, stderr
    assert stdout == "" and "Traceback" not in stderr
    frames = probe_video(partial).frames
    assert f"{word}: fox: {frames} frames written; playable partial video: {partial}" in stderr
    assert names(tmp_path) == [".fox.partial.mp4", "fox.yaml"]  # the lock is released and its file removed


def test_ctrl_c_while_torch_and_the_model_load_is_reported(tmp_path: Path):
    script = write_story(tmp_path / "fox.yaml", ["0s"], "1.5s")
    process = start_render(script, tmp_path / "fox.mp4")
    try:
        maps = Path(f"/proc/{process.pid}/maps")  # "libtorch" there: the command has begun importing torch
        wait_until(lambda: "libtorch" in maps.read_text(), process, "torch was not loaded", poll_s=0.02)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert stdout == "" and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "interrupted: no video was being written"
    assert names(tmp_path) == ["fox.yaml"]


# ---------------------------------------------------------------------------------------------------------------------
# Messages that point at the right thing


def test_a_title_collision_names_both_stories(tmp_path: Path):
    first = write_story(tmp_path / "one.yaml", ["0s"], "1.5s", title="a/b")
    second = write_story(tmp_path / "two.yaml", ["0s"], "1.5s", title="a_b")
    result = memflow("render", first, second, *DEMO, "--out-dir", tmp_path / "out")
    assert result.exit_code == 2
    assert error_without_fix(result.stderr) == (
        f"error: two stories would both write {tmp_path / 'out' / 'a_b.mp4'}: 'a/b' ({first}) and 'a_b' ({second})"
    )


def test_weights_download_into_a_file_is_refused(tmp_path: Path):
    (tmp_path / "weights").write_text("")
    result = memflow("weights", "download", "--to", tmp_path / "weights")
    assert result.exit_code == 2
    assert error_without_fix(result.stderr) == f"error: --to {tmp_path / 'weights'}: it is a file, not a folder"


def test_a_weights_error_gives_its_hint_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    script = write_story(tmp_path / "fox.yaml", ["0s"], "1.5s")
    for args in (("render", script, "--device", "cpu", "-o", tmp_path / "fox.mp4"), ("weights", "verify")):
        result = memflow(*args)
        assert result.exit_code == 1
        assert result.stderr.count("memflow weights download") == 1, result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# First run


def test_check_does_not_import_torch():
    code = (
        "import sys\nfrom memflow_cli.cli import app\n"
        f"app(['check', {str(EXAMPLES / 'lighthouse.yaml')!r}], standalone_mode=False)\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


def test_version_prints_the_package_version():
    result = memflow("--version")
    assert result.exit_code == 0 and result.stdout == f"memflow {__version__}\n"


def test_render_help_shows_defaults_time_formats_and_examples():
    result = memflow("render", "--help")
    text = re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", result.stdout))
    assert "<list[" not in text and "<bool>" not in text
    assert re.search(r"Usage: \S+ render \[OPTIONS\] \{?SCRIPT\}?", text)  # SCRIPT or {SCRIPT}..., by typer version
    for shown in ("Default: 12", "Default: 3", "Default: nam", "Default: 1000,750,500,250", "1m30s", "Examples:"):
        assert shown in text, shown


def test_the_readme_check_example_is_the_real_output(monkeypatch: pytest.MonkeyPatch):
    """Every line of the README's example is in the real output (prompts shortened with '...' there)."""
    monkeypatch.chdir(REPO)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("memflow check scripts_examples/lighthouse.yaml\n", 1)[1].split("```", 1)[0]
    real = " ".join(without_boxes(memflow("check", "scripts_examples/lighthouse.yaml").stdout).split())
    example = [" ".join(without_boxes(line[1:]).replace("...", " ").split()) for line in block.splitlines()]
    assert len([line for line in example if line]) == 7  # title, header, three rows, totals, ok
    for line in example:
        assert line in real


def without_boxes(text: str) -> str:
    return re.sub("[\u2500-\u257f]", " ", text)


# ---------------------------------------------------------------------------------------------------------------------
# Install and threads


def test_ci_installs_torch_exactly_as_the_readme_says():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    (install,) = re.findall(r"pip install -q (torch\S* --index-url \S+)", ci)
    assert "--index-url https://download.pytorch.org/whl/cpu" in install
    assert f"pip install {install}" in readme


def test_waiting_cpu_threads_sleep_instead_of_spinning(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert memflow("check", EXAMPLES / "lighthouse.yaml").exit_code == 0
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # a user's own choice stays
    memflow("check", EXAMPLES / "lighthouse.yaml")
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
