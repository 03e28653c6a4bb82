"""`memflow live` on a GPU: decoding trails generation there (the overlap), and the replay still matches."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import yaml

from memflow_cli.output import partial_path

from .live import piped, render_replay, run_memflow, same_frames, start_live, wait_for_bytes
from .test_live import opening

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU_DEMO = ("--model", "demo", "--device", "cuda")


@pytest.mark.parametrize("stop", ["duration", "ctrl-c"])
def test_a_gpu_session_replays_frame_for_frame(tmp_path, stop):
    script, target = opening(tmp_path), tmp_path / "live.mp4"
    read, write = piped(["the harbour master waves from the pier", "gulls circle the masts"])
    try:
        limit = ("--duration", "6s") if stop == "duration" else ()
        process = start_live(script, "-o", target, *limit, stdin=read, model=GPU_DEMO)
        os.close(read)
        if stop == "ctrl-c":
            wait_for_bytes(partial_path(target), 60_000, process)
            process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=600)
    finally:
        os.close(write)
    assert process.returncode == 0, stderr
    story = yaml.safe_load(target.with_suffix(".yaml").read_text())
    assert [s["start"] for s in story["segments"]][:3] == [0.0, 0.75, 1.5]
    sidecar = json.loads(target.with_suffix(".json").read_text())
    print(json.dumps(sidecar["live"]["latency"]), sidecar["live"]["stalls"])
    replay = tmp_path / "replay.mp4"
    options = render_replay(target, replay, timeout=600)
    assert "--compile" not in options and "--no-compile" not in options  # asked for neither: the default path
    assert json.loads(replay.with_suffix(".json").read_text())["compile"] == sidecar["compile"] == "triton-graphed"
    assert same_frames(target, replay)


# Full size: the 1.3B transformer and the Wan VAE at 832x480, random weights (nothing to download). A few
# chunks are enough: what differs between two processes (an algorithm chosen by timing it) differs at once.
FULL_SIZE = ("--model", "random", "--device", "cuda")
SHORT_STORY = """\
title: harbour
seed: 11
duration: 4.5s
segments:
  - {start: 0s, prompt: "A fishing harbour at dawn, boats rocking on calm water"}
  - {start: 1.5s, prompt: "The harbour master walks along the pier"}
  - {start: 3s, prompt: "Gulls circle the masts as the sun comes up"}
"""


def test_a_full_size_story_renders_to_the_same_video_in_two_processes(tmp_path):
    script = tmp_path / "harbour.yaml"
    script.write_text(SHORT_STORY)
    videos = [tmp_path / "first.mp4", tmp_path / "second.mp4"]
    for video in videos:
        rendered = run_memflow("render", script, "-o", video, *FULL_SIZE, "--no-compile", "-q", timeout=600)
        assert rendered.returncode == 0, rendered.stderr
    assert same_frames(*videos)


def test_a_full_size_session_replays_frame_for_frame(tmp_path):
    target = tmp_path / "live.mp4"
    read, write = piped(["the harbour master waves from the pier", "gulls circle the masts"])
    try:
        process = start_live("--prompt", "A fishing harbour at dawn", "-o", target, "--duration", "6s", stdin=read,
                             model=FULL_SIZE)  # fmt: skip
        os.close(read)
        _, stderr = process.communicate(timeout=600)
    finally:
        os.close(write)
    assert process.returncode == 0, stderr
    story = yaml.safe_load(target.with_suffix(".yaml").read_text())
    assert len(story["segments"]) == 3
    replay = tmp_path / "replay.mp4"
    render_replay(target, replay, timeout=600)
    assert same_frames(target, replay)
