"""`memflow render --update` and the resume of a killed render, through the real command on the demo model.

An edited story re-renders only from its first changed segment, and the video is the one a fresh render
of the edited story makes (decoded frames compared; the files are even byte for byte the same). Whatever
prevents reuse is one line, and the render starts from frame 0. A render killed with SIGKILL in segment 3
continues from segment 3's start with `--skip-existing` and ends as an uninterrupted render.

The Wan VAE's snapshots keep its frames and causal state, and a render from one decodes only the new chunks: an
update and a resume of one story run on it. The other tests, whose subject is which frames are kept and why, render
on the demo's TAEHV decoder (`TAE`, whose resume decodes the kept latents again), a fraction of the CPU time.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from memflow_cli.output import partial_path, sidecar_path
from memflow_cli.snapshots import snapshot_files, snapshot_path

from .cli_helpers import DEMO, TAE, decoded, memflow, video_frames, wait_until

PROMPTS = (
    "a red fox trots across a snowy field",
    "the fox stops at the edge of a pine forest",
    "snow begins to fall between the trees",
    "the fox curls up under a fallen log",
    "night comes and the forest is quiet",
)
EDITED = "an owl watches from a branch"


def write(path: Path, prompts: tuple[str, ...], seed: int = 0, chunks: int = 1, **settings: int) -> Path:
    """A story with one prompt per `chunks` chunks of 0.75 s."""
    lines = ["title: fox", f"seed: {seed}", f"duration: {0.75 * chunks * len(prompts)}s", "segments:"]
    for index, prompt in enumerate(prompts):
        lines += [f"  - start: {0.75 * chunks * index}s", f"    prompt: {prompt}"]
    if settings:
        lines += ["settings:", *(f"  {name}: {value}" for name, value in settings.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def render(script: Path, target: Path, *options: str):
    result = memflow("render", script, *DEMO, "-o", target, "-q", *options)
    assert result.exit_code == 0, result.stderr
    return result


def sidecar(target: Path) -> dict:
    return json.loads(sidecar_path(target).read_text(encoding="utf-8"))


def edited(prompts: tuple[str, ...], segment: int) -> tuple[str, ...]:
    return (*prompts[:segment], EDITED, *prompts[segment + 1 :])


@pytest.mark.parametrize(
    ("segments", "changed", "decoder"), [(3, 2, ()), (5, 3, TAE)], ids=["3-segments", "5-segments"]
)
def test_update_after_an_edit_renders_from_the_changed_segment_and_equals_a_fresh_render(
    tmp_path, segments, changed, decoder
):
    """Three segments on the Wan VAE (the kept frames and causal state); five on the TAEHV decoder."""
    target, fresh = tmp_path / "fox.mp4", tmp_path / "fresh.mp4"
    render(write(tmp_path / "fox.yaml", PROMPTS[:segments]), target, "--snapshots", *decoder)
    assert sorted(snapshot_files(target)) == [*range(1, segments), segments]  # each switch, and the end

    script = write(tmp_path / "fox.yaml", edited(PROMPTS[:segments], changed))
    kept = video_frames(changed)
    check = memflow("check", script, "--against", target)
    assert check.exit_code == 0, check.stderr
    assert f"segments 1-{changed} kept ({kept} frames of fox.mp4)" in check.stdout
    rerendered = f"segment {segments}" if changed + 1 == segments else f"segments {changed + 1}-{segments}"
    assert f"{rerendered} would render from {0.75 * changed:.2f} s" in check.stdout

    result = render(script, target, "--update", "--snapshots", *decoder)
    assert f"keeping the first {kept} frames of the earlier video" in result.stderr
    assert f"rendering from segment {changed + 1}" in result.stderr
    record = sidecar(target)
    assert (record["reused_frames"], record["rendered_from_segment"]) == (kept, changed)
    assert record["timeline"]["segments"][changed]["prompt"] == EDITED

    render(script, fresh, *decoder)  # without snapshots: the same video
    assert decoded(target) == decoded(fresh)
    assert target.read_bytes() == fresh.read_bytes()  # the same encoder fed the same frames
    assert not snapshot_files(fresh) and "snapshots" not in sidecar(fresh)
    files = record["snapshots"]["files"]
    assert [f["chunk"] for f in files] == [*range(1, segments), segments]
    assert all(f["bytes"] == (tmp_path / f["file"]).stat().st_size for f in files)
    assert not snapshot_files(target, partial=True) and not partial_path(target).exists()


def test_appending_a_segment_keeps_every_frame_before_it(tmp_path):
    target, fresh = tmp_path / "fox.mp4", tmp_path / "fresh.mp4"
    render(write(tmp_path / "fox.yaml", PROMPTS[:3]), target, "--snapshots", *TAE)
    longer = write(tmp_path / "fox.yaml", PROMPTS[:4])
    result = render(longer, target, "--update", *TAE)
    assert f"keeping the first {video_frames(3)} frames" in result.stderr
    assert sidecar(target)["rendered_from_segment"] == 3
    render(longer, fresh, *TAE)
    assert decoded(target) == decoded(fresh)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"prompts": (EDITED, *PROMPTS[1:2])}, "segment 1 changed, and every frame depends on it"),
        ({"seed": 7}, "another seed (0 -> 7)"),
        ({"window": 9}, "other settings (window)"),
    ],
    ids=["first-segment", "seed", "setting"],
)
def test_a_change_that_prevents_reuse_is_one_line_and_a_full_render(tmp_path, change, reason):
    target = tmp_path / "fox.mp4"
    render(write(tmp_path / "fox.yaml", PROMPTS[:2]), target, "--snapshots", *TAE)
    prompts = change.pop("prompts", PROMPTS[:2])
    script = write(tmp_path / "fox.yaml", prompts, **change)
    check = memflow("check", script, "--against", target)
    assert f"{reason.split(',')[0]}" in check.stdout and "every segment would render" in check.stdout
    result = render(script, target, "--update", *TAE)
    lines = [line for line in result.stderr.splitlines() if "rendering from the start" in line]
    assert len(lines) == 1 and reason in lines[0], result.stderr
    record = sidecar(target)
    assert (record["reused_frames"], record["rendered_from_segment"]) == (0, 0)


def test_without_snapshots_a_render_keeps_none_and_update_renders_from_the_start_saying_why(tmp_path):
    target, fresh = tmp_path / "fox.mp4", tmp_path / "fresh.mp4"
    render(write(tmp_path / "fox.yaml", PROMPTS[:3]), target, *TAE)
    assert not snapshot_files(target) and not snapshot_files(target, partial=True)
    assert [p.name for p in tmp_path.iterdir() if "snap" in p.name] == []
    assert "snapshots" not in sidecar(target)

    script = write(tmp_path / "fox.yaml", edited(PROMPTS[:3], 2))
    check = memflow("check", script, "--against", target)
    assert "kept snapshots (render with --snapshots): every segment would render" in check.stdout
    result = render(script, target, "--update", *TAE)
    lines = [line for line in result.stderr.splitlines() if "rendering from the start" in line]
    assert lines == ["fox: the earlier render of fox.mp4 kept no snapshots (they are kept with --snapshots): "
                     "rendering from the start"], result.stderr  # fmt: skip
    assert (sidecar(target)["reused_frames"], sidecar(target)["rendered_from_segment"]) == (0, 0)
    render(script, fresh, *TAE)
    assert decoded(target) == decoded(fresh)


def test_a_stopped_render_without_snapshots_resumes_from_the_start_saying_why(tmp_path):
    target = tmp_path / "fox.mp4"
    partial_path(target).write_bytes(b"the frames of a render that died")  # and, without --snapshots, nothing else
    result = render(write(tmp_path / "fox.yaml", PROMPTS[:2]), target, "--skip-existing", *TAE)
    lines = [line for line in result.stderr.splitlines() if "rendering from the start" in line]
    assert lines == ["fox: the stopped render of fox.mp4 kept no snapshots (they are kept with --snapshots): "
                     "rendering from the start"], result.stderr  # fmt: skip
    assert not partial_path(target).exists() and sidecar(target)["reused_frames"] == 0


def test_a_stopped_render_whose_snapshots_do_not_fit_the_story_says_so(tmp_path):
    """What a render with --snapshots leaves when it stops after its last boundary: its partial video and its
    snapshots under the partial's names (made here from a finished render's, the same files)."""
    target = tmp_path / "fox.mp4"
    render(write(tmp_path / "fox.yaml", PROMPTS[:2]), target, "--snapshots", *TAE)
    target.replace(partial_path(target))
    sidecar_path(target).unlink()
    for chunk, path in snapshot_files(target).items():
        path.replace(snapshot_path(target, chunk, partial=True))
    result = render(write(tmp_path / "fox.yaml", (EDITED, PROMPTS[1])), target, "--skip-existing", *TAE)
    lines = [line for line in result.stderr.splitlines() if "rendering from the start" in line]
    assert lines == ["fox: the stopped render of fox.mp4 kept no snapshot that fits this story and request: "
                     "rendering from the start"], result.stderr  # fmt: skip
    assert sidecar(target)["reused_frames"] == 0 and not snapshot_files(target, partial=True)


@pytest.mark.parametrize(
    ("prompts", "option"), [(1, "--skip-existing"), (2, "--skip-existing"), (2, "--update")],
    ids=["one-prompt-resume", "resume", "update"],
)  # fmt: skip
def test_a_new_output_has_nothing_to_resume_and_says_nothing_of_it(tmp_path, prompts, option):
    """No earlier video, partial video or snapshot of the output: the normal case of a batch, no line."""
    target = tmp_path / "fox.mp4"
    result = render(write(tmp_path / "fox.yaml", PROMPTS[:prompts]), target, option, "--snapshots", *TAE)
    assert "rendering from the start" not in result.stderr and "keeping" not in result.stderr, result.stderr
    assert sidecar(target)["reused_frames"] == 0


def test_overwrite_with_one_prompt_removes_the_old_videos_snapshots(tmp_path):
    target = tmp_path / "fox.mp4"
    render(write(tmp_path / "fox.yaml", PROMPTS[:2]), target, "--snapshots", *TAE)
    assert snapshot_files(target)
    result = render(write(tmp_path / "fox.yaml", PROMPTS[:1]), target, "--update", *TAE)
    assert "one prompt" in result.stderr
    assert not snapshot_files(target) and "snapshots" not in sidecar(target)


@pytest.mark.parametrize(("batch", "decoder"), [(False, ()), (True, TAE)], ids=["one-story", "batch"])
def test_a_render_killed_in_segment_3_resumes_there_and_equals_an_uninterrupted_one(tmp_path, batch, decoder):
    """One story on the default Wan VAE; a batch (`--out-dir`) on the TAEHV decoder, whose resume decodes the
    kept latents again."""
    script = write(tmp_path / "fox.yaml", PROMPTS[:4], chunks=2)  # segment 3: chunks 4 and 5
    target, whole = tmp_path / "out" / "fox.mp4", tmp_path / "whole.mp4"
    target.parent.mkdir()
    output = ("--out-dir", str(target.parent), *decoder) if batch else ("-o", str(target), *decoder)
    command = [sys.executable, "-m", "memflow_cli.cli", "render", str(script), *DEMO, *output, "-q", "--snapshots"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        fourth = snapshot_path(target, 4, partial=True)  # chunk 4 is written, chunk 5 on its way
        wait_until(fourth.exists, process, "no snapshot of segment 3", poll_s=0.02)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    finally:
        process.kill()
    assert not target.exists() and partial_path(target).exists()
    assert sorted(snapshot_files(target, partial=True)) == [2, 4]

    result = memflow("render", script, *DEMO, *output, "-q", "--skip-existing", "--snapshots")
    assert result.exit_code == 0, result.stderr
    assert f"keeping the first {video_frames(4)} frames of a stopped render" in result.stderr
    assert "rendering from segment 3" in result.stderr
    record = sidecar(target)
    assert (record["reused_frames"], record["rendered_from_segment"]) == (video_frames(4), 2)
    assert sorted(snapshot_files(target)) == [2, 4, 6, 8] and not snapshot_files(target, partial=True)
    render(script, whole, *decoder)
    assert decoded(target) == decoded(whole)


def test_a_live_sessions_replay_script_updates_from_its_edited_prompt(tmp_path):
    opening = tmp_path / "harbour.yaml"
    opening.write_text(
        "title: harbour\nseed: 7\nsegments:\n  - start: 0s\n    prompt: a harbour at dawn\n"
        "  - start: 1.5s\n    prompt: a storm rolls in over the harbour\n",
        encoding="utf-8",
    )
    target, fresh = tmp_path / "live.mp4", tmp_path / "fresh.mp4"
    session = memflow("live", opening, "-o", target, "--duration", "3s", "--snapshots", *DEMO, *TAE)  # in-process
    assert session.exit_code == 0, session.stderr
    assert sorted(snapshot_files(target)) == [2, 4]  # the switch at 1.5 s, and the end

    replay = target.with_suffix(".yaml")
    replay.write_text(replay.read_text().replace("a storm rolls in over the harbour", EDITED), encoding="utf-8")
    options = ("--no-compile", "-q", *TAE)
    result = memflow("render", replay, *DEMO, "-o", target, "--update", *options)
    assert result.exit_code == 0, result.stderr
    assert f"keeping the first {video_frames(2)} frames of the earlier video" in result.stderr
    assert memflow("render", replay, *DEMO, "-o", fresh, *options).exit_code == 0
    assert decoded(target) == decoded(fresh)


DAMAGE = {
    "cut-short": lambda data: data[:-100],  # the header is whole, the tensors are not (a full disk)
    "random-bytes": lambda data: bytes(range(256)) * (len(data) // 256),  # no header at all
}


def unreadable_lines(stderr: str, snapshot: Path) -> list[str]:
    return [line for line in stderr.splitlines() if str(snapshot) in line]


def test_a_snapshot_cut_short_is_one_line_and_a_full_render(tmp_path):
    target = tmp_path / "fox.mp4"
    script = write(tmp_path / "fox.yaml", PROMPTS[:2])
    render(script, target, "--snapshots", *TAE)
    snapshot = snapshot_path(target, 1)
    snapshot.write_bytes(DAMAGE["cut-short"](snapshot.read_bytes()))
    result = render(write(tmp_path / "fox.yaml", (*PROMPTS[:1], EDITED)), target, "--update", *TAE)
    (unreadable,) = unreadable_lines(result.stderr, snapshot)
    assert unreadable.startswith(f"fox: {snapshot} cannot be read: ") and "rendering" not in unreadable
    lines = [line for line in result.stderr.splitlines() if "rendering from the start" in line]
    assert lines == ["fox: no readable snapshot of fox.mp4 before the first change (segment 2): rendering from the "
                     "start"], result.stderr  # fmt: skip
    assert sidecar(target)["reused_frames"] == 0


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_an_unreadable_snapshot_is_one_line_and_the_one_before_it_is_used(tmp_path, damage):
    """However a snapshot is damaged, the update goes on from the latest readable one before it."""
    target = tmp_path / "fox.mp4"
    render(write(tmp_path / "fox.yaml", PROMPTS[:3]), target, "--snapshots", *TAE)
    snapshot = snapshot_path(target, 2)
    snapshot.write_bytes(DAMAGE[damage](snapshot.read_bytes()))
    result = render(write(tmp_path / "fox.yaml", edited(PROMPTS[:3], 2)), target, "--update", "--snapshots", *TAE)
    (unreadable,) = unreadable_lines(result.stderr, snapshot)
    assert unreadable.startswith(f"fox: {snapshot} ") and unreadable.endswith(": looking for an earlier snapshot")
    assert f"keeping the first {video_frames(1)} frames of the earlier video (segment 1)" in result.stderr
    record = sidecar(target)
    assert (record["reused_frames"], record["rendered_from_segment"]) == (video_frames(1), 1)
    assert [f["chunk"] for f in record["snapshots"]["files"]] == [1, 2, 3]  # the damaged one written again
    assert sorted(snapshot_files(target)) == [1, 2, 3]


def test_an_update_stopped_and_run_again_keeps_the_snapshots_before_its_start(tmp_path):
    """Ctrl-C in an update from segment 3's snapshot, then the update again: it goes on from the stopped render's
    snapshot of segment 3, and the earlier video's snapshot of segment 2 (still valid) stays with the new video."""
    script, target = tmp_path / "fox.yaml", tmp_path / "fox.mp4"
    story = "title: fox\nduration: 9s\nsegments:\n" + "".join(
        f"  - start: {start}s\n    prompt: {prompt}\n" for start, prompt in zip((0, 1.5, 3), PROMPTS, strict=False)
    )  # segments 1 and 2: two chunks each; segment 3: chunks 4-11
    script.write_text(story, encoding="utf-8")
    render(script, target, "--snapshots", *TAE)
    assert sorted(snapshot_files(target)) == [2, 4, 12]

    script.write_text(story.replace(PROMPTS[2], EDITED), encoding="utf-8")
    command = [sys.executable, "-m", "memflow_cli.cli", "render", str(script), *DEMO, "-o", str(target), *TAE, "-q",
               "--update", "--snapshots"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first_chunk = snapshot_path(target, 4, partial=True)  # segment 3's first chunk is written
        wait_until(first_chunk.exists, process, "the update kept no snapshot", poll_s=0.02)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130 and "playable partial video" in stderr, stderr
    assert sorted(snapshot_files(target, partial=True)) == [4] and sorted(snapshot_files(target)) == [2, 4, 12]

    result = render(script, target, "--update", "--snapshots", *TAE)
    assert f"keeping the first {video_frames(4)} frames of a stopped render (segments 1-2)" in result.stderr
    record = sidecar(target)
    assert [f["chunk"] for f in record["snapshots"]["files"]] == [2, 4, 12]
    assert sorted(snapshot_files(target)) == [2, 4, 12] and not snapshot_files(target, partial=True)
    assert snapshot_path(target, 2).stat().st_mtime_ns < snapshot_path(target, 4).stat().st_mtime_ns  # the video's
