"""`memflow live` as a user runs it on the demo model: prompts piped in, the replay script, the ways it ends.

The piped session and Ctrl-C run the default Wan VAE; SIGTERM, kill -9 and a second Ctrl-C decode with the demo's
TAEHV decoder (`TAE`: a process that imports neither diffusers nor transformers), their subject being the process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from memflow_cli.live.prompts import MAX_PROMPT_CHARS
from memflow_cli.output import lock_path, partial_path
from memflow_cli.script import load_scripts

from .cli_helpers import TAE, memflow
from .live import DEMO, piped, replay_options, same_frames, start_live, wait_for_bytes
from .video import probe_video

OPENING = """\
title: harbour
seed: 7
segments:
  - start: 0s
    prompt: a harbour at dawn, fishing boats rocking gently
  - start: 3s
    prompt: a storm rolls in over the harbour
"""


def opening(tmp_path: Path) -> Path:
    script = tmp_path / "harbour.yaml"
    script.write_text(OPENING)
    return script


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    stdout, stderr = process.communicate(timeout=timeout)
    return stdout, stderr


def test_piped_prompts_and_the_scripts_own_segments_land_on_the_chunk_grid_and_replay_frame_for_frame(tmp_path):
    script, target = opening(tmp_path), tmp_path / "live.mp4"
    lines = ["the harbour master waves from the pier", "", "x" * (MAX_PROMPT_CHARS + 1), "gulls circle the masts"]
    read, write = piped(lines)  # written before the session starts: seen at its first chunk boundaries
    try:
        process = start_live(script, "-o", target, "--duration", "4s", stdin=read)
        os.close(read)
        stdout, stderr = finish(process)
    finally:
        os.close(write)
    assert process.returncode == 0, stderr
    replay = tmp_path / "live.yaml"
    assert stdout.splitlines() == [str(target), str(replay)]
    # blank and too long lines: one line each on stderr, and the session went on
    assert "ignored an empty prompt line" in stderr
    assert f"refused a prompt of {MAX_PROMPT_CHARS + 1} characters" in stderr

    story = yaml.safe_load(replay.read_text())
    assert replay.read_text().startswith("# memflow live session")
    # one switch a chunk (0.75 s), typed prompts in order, the script's own segment at its time (3 s = chunk 4)
    assert [(s["start"], s["prompt"]) for s in story["segments"]] == [
        (0.0, "a harbour at dawn, fishing boats rocking gently"),
        (0.75, "the harbour master waves from the pier"),
        (1.5, "gulls circle the masts"),
        (3.0, "a storm rolls in over the harbour"),
    ]
    assert story["duration"] == 4.5 and story["seed"] == 7 and story["settings"]["interactive"] is True
    assert probe_video(target).frames == 6 * 12 - 3  # --duration 4s snaps up to 6 chunks

    sidecar = json.loads(target.with_suffix(".json").read_text())
    assert sidecar["timeline"]["chunks"] == 6 and sidecar["live"]["ended_by"] == "duration"
    latencies = sidecar["live"]["prompt_latencies"]
    assert [(lat["start_chunk"], lat["source"]) for lat in latencies] == [(1, "stdin"), (2, "stdin")]
    assert all(0 < lat["to_written_s"] <= lat["to_screen_s"] for lat in latencies)
    assert sidecar["live"]["latency"]["prompts"] == 2
    typed = [s for s in sidecar["live"]["segments"] if s["source"] == "stdin"]  # piped while the model loaded:
    assert len(typed) == 2 and all(s["received_s"] <= s["accepted_s"] for s in typed)  # taken once the loop runs
    margin = sidecar["live"]["margin"]  # 6 chunks: the times the 2nd..6th took to make
    assert margin["chunks"] == 5 and margin["chunk_duration_s"] == 0.75
    assert 0 < margin["chunk_s_median"] <= margin["chunk_s_max"]
    assert margin["ratio_median"] == round(margin["chunk_s_median"] / 0.75, 3)
    assert "prompt to screen" in stderr.splitlines()[-1]

    # the command OUT.yaml's header names, as a user copies it: the options of the path the session ran
    options = replay_options(replay)
    assert options == ["--model", "demo", "--device", "cpu", "--no-compile"]
    rendered = memflow("render", replay, "-o", tmp_path / "replay.mp4", *options, "-q")  # in-process: same command
    assert rendered.exit_code == 0, rendered.stderr
    assert same_frames(target, tmp_path / "replay.mp4")
    # the sidecar records the request as render does: the live video is a finished render of its replay script
    again = memflow("render", replay, "-o", target, "--model", "demo", "--device", "cpu", "--skip-existing")
    assert again.exit_code == 0 and "skip:" in again.stderr


@pytest.mark.parametrize(
    ("stop", "ended_by", "decoder"), [(signal.SIGINT, "ctrl-c", ()), (signal.SIGTERM, "sigterm", TAE)]
)
def test_ctrl_c_or_sigterm_ends_the_session_with_a_finished_video_that_its_replay_script_remakes(
    tmp_path, stop, ended_by, decoder
):
    target = tmp_path / "live.mp4"
    process = start_live("--prompt", "a lighthouse at dusk", "-o", target, "--seed", "3", *decoder)
    wait_for_bytes(partial_path(target), 40_000, process)  # a few chunks made: an arbitrary chunk to stop at
    process.send_signal(stop)
    _, stderr = finish(process)
    assert process.returncode == 0, stderr
    assert "stopping after the chunk being made" in stderr
    assert not partial_path(target).exists() and not lock_path(target).exists()
    story = yaml.safe_load(target.with_suffix(".yaml").read_text())
    chunks = round(story["duration"] / 0.75)
    assert chunks >= 2 and probe_video(target).frames == chunks * 12 - 3  # the script's length is the video's
    sidecar = json.loads(target.with_suffix(".json").read_text())
    assert sidecar["live"]["ended_by"] == ended_by and sidecar["timeline"]["chunks"] == chunks
    if stop == signal.SIGINT:  # the replay guarantee holds wherever the session was stopped
        replay = tmp_path / "replay.mp4"
        rendered = memflow("render", target.with_suffix(".yaml"), "-o", replay, "--model", "demo", "--device", "cpu",
                           "-q")  # fmt: skip
        assert rendered.exit_code == 0, rendered.stderr
        assert same_frames(target, replay)


def test_kill_9_leaves_a_playable_partial_and_a_lock_the_next_session_knows_is_dead(tmp_path):
    target = tmp_path / "live.mp4"
    process = start_live("--prompt", "a lighthouse at dusk", "-o", target, *TAE)
    wait_for_bytes(partial_path(target), 20_000, process)
    process.kill()
    finish(process)
    assert probe_video(partial_path(target)).frames > 0  # plays up to the last fragment
    assert lock_path(target).exists() and not target.exists() and not target.with_suffix(".yaml").exists()
    again = memflow("live", "--prompt", "a lighthouse at dusk", "-o", target, "--model", "demo", "--duration", "1s")
    assert again.exit_code == 2
    assert "holds the frames of an earlier render" in again.stderr  # not "another memflow render is writing"
    assert "--overwrite" in again.stderr


def test_a_second_ctrl_c_aborts_at_once_and_keeps_the_partial_video(tmp_path):
    target = tmp_path / "live.mp4"
    # 200 steps a chunk (about 1 s on the CPU), never waiting for the clock: both land mid-chunk (once the last
    # chunk is made a second Ctrl-C changes nothing: test_a_second_ctrl_c_once_the_video_is_complete_changes_nothing)
    slow = ",".join(str(t) for t in range(1000, 0, -5))
    process = start_live("--prompt", "a lighthouse at dusk", "-o", target, "--steps", slow, "--ahead", "64", *TAE)
    wait_for_bytes(partial_path(target), 20_000, process)
    process.send_signal(signal.SIGINT)
    assert process.stderr is not None
    while "stopping after the chunk being made" not in process.stderr.readline():  # the first one was handled
        assert process.poll() is None
    process.send_signal(signal.SIGINT)
    _, stderr = finish(process)
    assert process.returncode == 130, stderr
    assert "aborted:" in stderr and "playable partial video" in stderr
    assert partial_path(target).exists() and not target.exists() and not target.with_suffix(".yaml").exists()
    assert probe_video(partial_path(target)).frames > 0


def test_refusals_come_before_anything_is_written(tmp_path):
    script = opening(tmp_path)
    foreign = tmp_path / "notes.yaml"
    foreign.write_text("my own notes\n")
    result = memflow("live", "--prompt", "a lighthouse", "-o", tmp_path / "notes.mp4", "--model", "demo")
    assert result.exit_code == 2 and "notes.yaml exists (not written by memflow)" in result.stderr
    assert foreign.read_text() == "my own notes\n" and not (tmp_path / "notes.mp4").exists()

    result = memflow("live", script, "-o", tmp_path / "harbour.mp4", "--model", "demo", "--overwrite")
    assert result.exit_code == 2 and "is the opening script" in result.stderr
    assert script.read_text() == OPENING

    result = memflow("live", "--prompt", "a lighthouse", "-o", tmp_path / "a.mp4", "--serve", "0.0.0.0:0")
    assert result.exit_code == 2 and "add --public" in result.stderr
    result = memflow("live", "-o", tmp_path / "a.mp4", "--model", "demo")
    assert result.exit_code == 2 and "give an opening script or --prompt" in result.stderr
    with socket.socket() as busy:  # a port in use: refused before the model loads, nothing left behind
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = memflow("live", "--prompt", "a lighthouse", "-o", tmp_path / "a.mp4", "--model", "demo",
                         "--serve", str(port))  # fmt: skip
    assert result.exit_code == 2 and "cannot listen there" in result.stderr
    assert "demo model" not in result.stderr  # its notice comes with the loaded model
    assert sorted(path.name for path in tmp_path.iterdir()) == ["harbour.yaml", "notes.yaml"]


def test_a_session_of_one_chunk_ends_inside_the_preroll_and_is_written_whole(tmp_path):
    target = tmp_path / "live.mp4"
    result = memflow("live", "--prompt", "a lighthouse at dusk", "-o", target, "--duration", "0.75s", *DEMO)
    assert result.exit_code == 0, result.stderr
    assert probe_video(target).frames == 9  # one chunk, made before playback would have started
    story = yaml.safe_load(target.with_suffix(".yaml").read_text())
    assert story["duration"] == 0.75 and [s["start"] for s in story["segments"]] == [0.0]
    sidecar = json.loads(target.with_suffix(".json").read_text())
    assert sidecar["live"]["stalls"] == 0 and sidecar["live"]["ended_by"] == "duration"


def test_a_prompt_and_a_title_that_look_like_numbers_are_written_as_text_and_replay(tmp_path):
    target = tmp_path / "1e5.mp4"
    result = memflow("live", "--prompt", "1e5", "-o", target, "--duration", "1s", *DEMO, *TAE)
    assert result.exit_code == 0, result.stderr
    story = load_scripts(target.with_suffix(".yaml"))[0]  # as `memflow render` reads it
    assert story.title == "1e5" and [segment.prompt for segment in story.segments] == ["1e5"]


def test_a_replay_script_that_cannot_be_written_is_one_error_and_the_video_and_sidecar_are_kept(tmp_path):
    target = tmp_path / "live.mp4"
    process = start_live("--prompt", "a lighthouse at dusk", "-o", target, "--duration", "3s", *TAE)
    wait_for_bytes(partial_path(target), 0, process)
    target.with_suffix(".yaml").mkdir()  # a folder where the replay script goes, made during the session
    stdout, stderr = finish(process)
    assert process.returncode == 1, stderr
    assert stdout.splitlines() == [str(target)] and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot write the replay script" in errors[0] and "Is a directory" in errors[0]
    assert probe_video(target).frames == 4 * 12 - 3  # the video is complete, 4 chunks
    sidecar = json.loads(target.with_suffix(".json").read_text())
    assert sidecar["timeline"]["chunks"] == 4 and sidecar["script"] is None  # it names no script that is not there


def test_a_second_ctrl_c_once_the_video_is_complete_changes_nothing(tmp_path):
    target = tmp_path / "live.mp4"
    process = start_live("--prompt", "a lighthouse at dusk", "-o", target, *TAE)
    wait_for_bytes(partial_path(target), 0, process)
    process.send_signal(signal.SIGINT)
    assert process.stderr is not None
    while "stopping after the chunk being made" not in process.stderr.readline():
        assert process.poll() is None
    while " ended by ctrl-c; " not in process.stderr.readline():  # the summary: the session is over and said
        assert process.poll() is None
    process.send_signal(signal.SIGINT)  # lands in the teardown or Python's shutdown (about a second with torch)
    _, stderr = finish(process)
    assert process.returncode == 0, stderr
    assert "aborted" not in stderr and "Traceback" not in stderr
    assert target.with_suffix(".yaml").exists() and target.with_suffix(".json").exists()
    assert not partial_path(target).exists() and not lock_path(target).exists()


@pytest.mark.parametrize(("stop", "said", "code"), [(signal.SIGINT, "interrupted", 130), (signal.SIGTERM,
                                                    "terminated", 143)])  # fmt: skip
def test_a_signal_while_the_model_loads_is_said_as_render_says_it(tmp_path, stop, said, code):
    target = tmp_path / "live.mp4"
    process = start_live("--prompt", "a lighthouse at dusk", "-o", target)  # the Wan VAE: seconds to load
    assert process.stderr is not None
    while "decoding with" not in process.stderr.readline():  # said once the outputs are claimed, before the load
        assert process.poll() is None
    process.send_signal(stop)
    _, stderr = finish(process)
    assert process.returncode == code, stderr
    assert f"{said}: before the session started; nothing was written" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flood", ["random bytes", "the same prompt"])
def test_stdin_that_never_pauses_neither_holds_the_session_nor_floods_its_messages(tmp_path, flood):
    """`cat /dev/urandom | memflow live` or `yes | memflow live`: each chunk reads a bounded part of stdin (the
    writer waits in the pipe), refused lines beyond a few a chunk are counted in one line, the session ends."""
    source = "/dev/urandom" if flood == "random bytes" else None
    writer = subprocess.Popen(["cat", source] if source else ["yes", "a storm rolls in"], stdout=subprocess.PIPE)
    try:
        target = tmp_path / "flood.mp4"
        session = start_live("--prompt", "a lighthouse", "-o", target, "--duration", "1.5s", *TAE,
                             stdin=writer.stdout.fileno())  # fmt: skip
        stdout, stderr = finish(session, timeout=240)
    finally:
        writer.kill()
        writer.wait()
    assert session.returncode == 0, stderr
    assert probe_video(target).frames == 21 and "Traceback" not in stderr
    assert len(stderr.splitlines()) < 60, stderr[-2000:]
    if flood == "random bytes":
        assert "more stdin lines since the last chunk (not told one by one)" in stderr
    else:
        assert "prompt(s) came after the last chunk started and are not in the video" in stderr
