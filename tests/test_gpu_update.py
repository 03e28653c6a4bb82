"""`render --update` on the GPU: after an edit, the video equals a fresh render of the edited story, with
full-size random weights (whose snapshots keep latents only: the kept part is decoded again), eager and
compiled, and with the demo model (whose snapshots keep the frames and the decoder's state). Skipped without
a GPU."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from memflow_cli.snapshots import snapshot_path

from .cli_helpers import decoded, memflow, video_frames
from .test_update import EDITED, PROMPTS, write

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("compile_option", ["--no-compile", "--compile"])
def test_update_after_an_edit_equals_a_fresh_render_at_full_size(tmp_path, compile_option):
    options = ("--model", "random", "--device", "cuda", compile_option, "-q")
    target, fresh = tmp_path / "fox.mp4", tmp_path / "fresh.mp4"
    first = write(tmp_path / "fox.yaml", PROMPTS[:3], chunks=2)
    assert memflow("render", first, "-o", target, "--snapshots", *options).exit_code == 0
    assert "frames" not in _tensors(snapshot_path(target, 4))  # the decoder state is over the bound
    script = write(tmp_path / "fox.yaml", (*PROMPTS[:2], EDITED), chunks=2)
    result = memflow("render", script, "-o", target, "--update", *options)
    assert result.exit_code == 0, result.stderr
    assert f"keeping the first {video_frames(4)} frames of the earlier video" in result.stderr
    sidecar = json.loads(target.with_suffix(".json").read_text())
    assert (sidecar["reused_frames"], sidecar["rendered_from_segment"]) == (video_frames(4), 2)
    assert memflow("render", script, "-o", fresh, *options).exit_code == 0
    assert decoded(target) == decoded(fresh)


def test_update_from_a_snapshot_with_frames_equals_a_fresh_render_on_cuda(tmp_path):
    options = ("--model", "demo", "--device", "cuda", "-q")
    target, fresh = tmp_path / "fox.mp4", tmp_path / "fresh.mp4"
    assert memflow("render", write(tmp_path / "fox.yaml", PROMPTS[:3], chunks=2), "-o", target, "--snapshots",
                   *options).exit_code == 0  # fmt: skip
    assert {"frames", "decoder.000"} <= _tensors(snapshot_path(target, 4))
    script = write(tmp_path / "fox.yaml", (*PROMPTS[:2], EDITED), chunks=2)
    result = memflow("render", script, "-o", target, "--update", "--snapshots", *options)
    assert result.exit_code == 0, result.stderr
    assert f"keeping the first {video_frames(4)} frames of the earlier video" in result.stderr
    assert memflow("render", script, "-o", fresh, *options).exit_code == 0
    assert target.read_bytes() == fresh.read_bytes()


def _tensors(path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())
