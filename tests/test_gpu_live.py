"""`memflow live` on a GPU: decoding trails generation there (the overlap), and the replay still matches."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import yaml

from memflow_cli.output import partial_path

from .live import MEMFLOW, environment, piped, replay_options, run_memflow, same_frames, wait_for_bytes
from .test_live import OPENING

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU_DEMO = ("--model", "demo", "--device", "cuda")


def start(*args, stdin):
    import subprocess

    return subprocess.Popen([*MEMFLOW, "live", *map(str, args), *GPU_DEMO], stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


@pytest.mark.parametrize("stop", ["duration", "ctrl-c"])
def test_a_gpu_session_replays_frame_for_frame(tmp_path, stop):
    script, target = tmp_path / "harbour.yaml", tmp_path / "live.mp4"
    script.write_text(OPENING)
    read, write = piped(["the harbour master waves from the pier", "gulls circle the masts"])
    try:
        limit = ("--duration", "6s") if stop == "duration" else ()
        process = start(script, "-o", target, *limit, stdin=read)
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
    options = replay_options(target.with_suffix(".yaml"))
    assert "--no-compile" in options  # live runs eager unless asked; its replay names that path
    rendered = run_memflow("render", target.with_suffix(".yaml"), "-o", replay, *options, "-q", timeout=600)
    assert rendered.returncode == 0, rendered.stderr
    assert same_frames(target, replay)
