"""Fragmented MP4 writer and sidecar, with the real ffmpeg of imageio-ffmpeg, on tiny videos."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from memflow_cli.mp4 import Mp4Writer
from memflow_cli.output import (
    OutputBusyError,
    OutputError,
    OutputExistsError,
    lock_path,
    partial_path,
    read_sidecar,
    reserved_output,
    sidecar_path,
    write_sidecar,
    write_video_sidecar,
)

from .video import VideoInfo, probe_video

WIDTH, HEIGHT, FPS, KEYFRAMES = 64, 48, 16, 12


def pattern(start: int, count: int) -> np.ndarray:
    """Frames [count, H, W, 3]: smooth gradients that vary with the frame index."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    frames = [np.stack([x * 4, y * 5, np.full_like(x, (8 * t) % 256)], axis=-1) for t in range(start, start + count)]
    return np.stack(frames).astype(np.uint8)


def read_frames(path: Path) -> np.ndarray:
    """Every decodable frame of a video [N, H, W, 3] uint8."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader]
    return np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8)


def write_pattern(writer: Mp4Writer, total: int, chunk: int = KEYFRAMES) -> None:
    for start in range(0, total, chunk):
        writer.write(pattern(start, min(chunk, total - start)))


def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def decodable_frames(path: Path) -> int:
    try:
        return len(read_frames(path))
    except (OSError, RuntimeError, StopIteration):  # not even a header yet
        return 0


def assert_close_to_pattern(decoded: np.ndarray, start: int = 0) -> None:
    expected = pattern(start, len(decoded)).astype(np.float32)
    assert np.abs(decoded.astype(np.float32) - expected).mean() < 4.0  # lossy H.264, CRF 18


def new_writer(target: Path, **kwargs: bool) -> Mp4Writer:
    return Mp4Writer(target, WIDTH, HEIGHT, FPS, keyframe_interval=KEYFRAMES, **kwargs)


def test_writes_a_video(tmp_path: Path) -> None:
    target = tmp_path / "out.mp4"
    with new_writer(target) as writer:
        write_pattern(writer, 30)
        assert writer.frames_written == 30
    assert target.is_file()
    assert not partial_path(target).exists()
    assert probe_video(target) == VideoInfo(frames=30, width=WIDTH, height=HEIGHT, fps=16.0)
    decoded = read_frames(target)
    assert len(decoded) == 30
    assert_close_to_pattern(decoded[:1])


def test_accepts_torch_frames_and_returns_target(tmp_path: Path) -> None:
    writer = new_writer(tmp_path / "t.mp4")
    writer.write(torch.from_numpy(pattern(0, 5)))
    assert writer.close() == tmp_path / "t.mp4"
    assert probe_video(tmp_path / "t.mp4").frames == 5


def test_existing_target_is_not_clobbered(tmp_path: Path) -> None:
    target = tmp_path / "out.mp4"
    target.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="use --overwrite") as error:
        new_writer(target)
    assert str(target) in str(error.value)
    assert isinstance(error.value, OutputError)
    assert target.read_bytes() == b"precious"


def test_overwrite_replaces_only_on_close(tmp_path: Path) -> None:
    target = tmp_path / "out.mp4"
    target.write_bytes(b"old")
    with new_writer(target, overwrite=True) as writer:
        write_pattern(writer, 12)
        assert target.read_bytes() == b"old"
    assert probe_video(target).frames == 12


def test_exception_keeps_target_and_leaves_playable_partial(tmp_path: Path) -> None:
    target = tmp_path / "out.mp4"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), new_writer(target, overwrite=True) as writer:
        write_pattern(writer, 24)
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    partial = partial_path(target)
    assert partial == tmp_path / ".out.partial.mp4"
    decoded = read_frames(partial)
    assert len(decoded) == 24
    assert_close_to_pattern(decoded[:1])
    assert_close_to_pattern(decoded[-1:], start=23)


def test_abort_before_any_frame_removes_partial(tmp_path: Path) -> None:
    writer = new_writer(tmp_path / "out.mp4")
    assert writer.abort() is None
    assert not partial_path(tmp_path / "out.mp4").exists()
    assert not (tmp_path / "out.mp4").exists()


def test_partial_plays_while_the_writer_is_open(tmp_path: Path) -> None:
    target = tmp_path / "out.mp4"
    with new_writer(target) as writer:
        write_pattern(writer, 3 * KEYFRAMES)
        partial = partial_path(target)
        # one fragment per frame: every frame written is on disk but the last (the muxer needs its duration)
        wait_for(lambda: decodable_frames(partial) >= 3 * KEYFRAMES - 1)
        decoded = read_frames(partial)
        assert len(decoded) == 3 * KEYFRAMES - 1
        assert_close_to_pattern(decoded)
        assert not target.exists()
    assert probe_video(target).frames == 3 * KEYFRAMES


def test_killed_encoder_leaves_finished_fragments_playable(tmp_path: Path) -> None:
    target = tmp_path / "out.mp4"
    partial = partial_path(target)
    with pytest.raises(OutputError, match="ffmpeg failed"), new_writer(target) as writer:
        write_pattern(writer, 3 * KEYFRAMES)
        wait_for(lambda: decodable_frames(partial) >= KEYFRAMES)
        os.kill(writer.pid, signal.SIGKILL)
        for start in range(100):  # the death surfaces on a following write
            writer.write(pattern(start, 1))
            time.sleep(0.05)
    assert not target.exists()
    decoded = read_frames(partial)
    assert len(decoded) >= KEYFRAMES
    assert_close_to_pattern(decoded[:KEYFRAMES])


def test_write_does_not_wait_for_a_stalled_encoder(tmp_path: Path) -> None:
    target = tmp_path / "out.mp4"
    writer = new_writer(target)
    os.kill(writer.pid, signal.SIGSTOP)
    try:
        # One chunk blocks in the pipe, two wait in the queue: three writes return at once.
        feeder = threading.Thread(target=write_pattern, args=(writer, 3 * KEYFRAMES))
        feeder.start()
        feeder.join(timeout=5.0)
        assert not feeder.is_alive()
    finally:
        os.kill(writer.pid, signal.SIGCONT)
    feeder.join()
    writer.close()
    assert probe_video(target).frames == 3 * KEYFRAMES


def test_probe_rejects_a_non_video(tmp_path: Path) -> None:
    path = tmp_path / "junk.mp4"
    path.write_bytes(b"not a video")
    with pytest.raises(OutputError, match="cannot read"):
        probe_video(path)
    with pytest.raises(OutputError, match="no such"):
        probe_video(tmp_path / "missing.mp4")


def test_rejects_bad_frames(tmp_path: Path) -> None:
    with new_writer(tmp_path / "out.mp4") as writer:
        with pytest.raises(ValueError, match=r"\[N, 48, 64, 3\]"):
            writer.write(np.zeros((2, 64, 48, 3), np.uint8))
        with pytest.raises(ValueError, match="uint8"):
            writer.write(np.zeros((2, 48, 64, 3), np.float32))
        writer.write(pattern(0, 1))


def test_odd_size_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="even"):
        Mp4Writer(tmp_path / "out.mp4", 63, 48)
    assert not any(tmp_path.iterdir())


def test_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="does not exist"):
        Mp4Writer(tmp_path / "nope" / "out.mp4", WIDTH, HEIGHT)


def test_sidecar_round_trip(tmp_path: Path) -> None:
    path = sidecar_path(tmp_path / "out.mp4")
    assert path == tmp_path / "out.json"
    data = {"prompts": ["a café at dusk", "rain"], "seed": 7, "fps": 16, "nested": {"frames": [1, 2]}}
    write_sidecar(path, data)
    write_sidecar(path, data)  # replacing an existing sidecar
    assert read_sidecar(path) == data
    assert path.read_text(encoding="utf-8").startswith('{\n  "prompts"')
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary left behind


# ---------------------------------------------------------------------------------------------------------------------
# Reserving the files of one render


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_a_reservation_locks_the_output_and_removes_its_lock_file(tmp_path: Path) -> None:
    target = tmp_path / "out.mp4"
    with reserved_output(target):
        assert lock_path(target) == tmp_path / ".out.mp4.lock"
        assert lock_path(target).read_text().strip() == str(os.getpid())
        with pytest.raises(OutputBusyError, match=rf"process {os.getpid()}\) is writing .*out.mp4") as busy:
            with reserved_output(target):
                pass
        assert busy.value.hint
        with reserved_output(tmp_path / "other.mp4"):  # another output is another lock
            pass
    assert names(tmp_path) == []
    with reserved_output(target):  # free again
        pass


HOLD_A_RESERVATION = """
import sys, time
from pathlib import Path
from memflow_cli.output import reserved_output
with reserved_output(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_lock_of_a_killed_process_does_not_block(tmp_path: Path) -> None:
    target = tmp_path / "out.mp4"
    command = [sys.executable, "-c", HOLD_A_RESERVATION, str(target)]
    holder = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(OutputBusyError, match=f"process {holder.pid}"):
            with reserved_output(target):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert lock_path(target).exists()  # left behind by kill -9, but nobody holds it
    with reserved_output(target):
        pass
    assert names(tmp_path) == []


def test_a_partial_from_a_stopped_render_is_kept_unless_overwriting(tmp_path: Path) -> None:
    target = tmp_path / "out.mp4"
    partial = partial_path(target)
    partial.write_bytes(b"frames of a killed render")
    with pytest.raises(OutputExistsError, match="earlier render") as error:
        with reserved_output(target):
            pass
    assert str(partial) in str(error.value) and "--overwrite" in (error.value.hint or "")
    assert partial.read_bytes() == b"frames of a killed render"
    with reserved_output(target, overwrite=True):
        assert not partial.exists()


def test_a_sidecar_memflow_did_not_write_is_never_replaced(tmp_path: Path) -> None:
    target = tmp_path / "notes.mp4"
    notes = sidecar_path(target)
    notes.write_text('{"my": "notes"}\n')
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="not written by memflow"):
            with reserved_output(target, overwrite=overwrite):
                pass
    assert notes.read_text() == '{"my": "notes"}\n'
    write_sidecar(notes, {"memflow_version": "0.1.0", "seed": 1})  # memflow's own, its video gone: replaceable
    with reserved_output(target):
        pass


def test_an_existing_video_needs_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "out.mp4"
    target.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="exists") as error:
        with reserved_output(target):
            pass
    assert error.value.path == target
    with reserved_output(target, overwrite=True):
        assert target.read_bytes() == b"precious"  # replaced only when the new video is complete


@pytest.mark.parametrize(
    "where, message",
    [
        ("missing/out.mp4", "does not exist"),
        ("a-file/out.mp4", "is a file, not a folder"),
        ("folder.mp4", "it is a folder"),
        (".out.partial.mp4", "memflow's partial files"),
        ("x" * 240 + ".mp4", "the file name is 244 bytes long"),
    ],
)
def test_a_reservation_checks_the_place_first(tmp_path: Path, where: str, message: str) -> None:
    (tmp_path / "a-file").write_text("")
    (tmp_path / "folder.mp4").mkdir()
    with pytest.raises(OutputError, match=message):
        with reserved_output(tmp_path / where):
            pass
    assert names(tmp_path) == ["a-file", "folder.mp4"]


def test_a_reservation_in_a_folder_that_cannot_be_written(tmp_path: Path) -> None:
    folder = Path("/sys")  # read-only even for root, unlike a chmod-ed folder
    if not folder.is_dir() or os.access(folder, os.W_OK) and _can_create_in(folder):
        pytest.skip("no read-only folder to try here")
    with pytest.raises(OutputError, match=f"cannot write in {folder}"):
        with reserved_output(folder / "out.mp4"):
            pass


def _can_create_in(folder: Path) -> bool:
    try:
        (folder / ".memflow-probe").touch()
    except OSError:
        return False
    (folder / ".memflow-probe").unlink()
    return True


def test_a_partial_name_no_title_can_produce(tmp_path: Path) -> None:
    # `x.partial.mp4` is what a story titled "x.partial" writes; the partial of x.mp4 is hidden
    assert partial_path(tmp_path / "x.mp4").name == ".x.partial.mp4"
    assert partial_path(tmp_path / "x.mp4") != tmp_path / "x.partial.mp4"


def test_a_full_disk_is_one_line_naming_the_partial(tmp_path: Path) -> None:
    """ffmpeg under a file-size limit (what a full disk looks like to a writer): one line, the partial kept."""
    target = tmp_path / "out.mp4"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # inherited by the ffmpeg started now
    try:
        writer = new_writer(target)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    noise = np.random.default_rng(0).integers(0, 256, (KEYFRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
    with pytest.raises(OutputError) as error, writer:
        for _ in range(1000):  # noise does not compress: 20 kB are a few frames
            writer.write(noise)
            time.sleep(0.01)
    message = str(error.value)
    assert "\n" not in message
    assert f"ffmpeg failed writing {partial_path(target)}" in message
    assert "SIGXFSZ" in message and "the file keeps the frames written so far" in message
    assert partial_path(target).exists() and not target.exists()


def test_a_sidecar_that_cannot_be_written_says_the_video_is_complete(tmp_path: Path, monkeypatch) -> None:
    video = tmp_path / "out.mp4"
    video.write_bytes(b"a finished video")

    def full_disk(*_args) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OutputError, match=f"the video {video} is complete, but its metadata .* No space") as error:
        write_video_sidecar(video, {"memflow_version": "0"})
    assert error.value.hint and "\n" not in str(error.value)
    assert video.read_bytes() == b"a finished video" and names(tmp_path) == ["out.mp4"]


@pytest.mark.parametrize("found", ["a user's JSON", "a folder", "an earlier memflow sidecar"])
def test_a_file_made_at_the_sidecars_place_during_a_render_is_not_replaced(tmp_path: Path, found: str) -> None:
    """The sidecar is checked again when the video is finished: a render can take hours."""
    video = tmp_path / "out.mp4"
    video.write_bytes(b"a finished video")
    sidecar = sidecar_path(video)
    if found == "a folder":
        sidecar.mkdir()
    else:
        sidecar.write_text('{"memflow_version": "0"}' if found.startswith("an earlier") else '{"my": "notes"}')
    if found.startswith("an earlier"):
        write_video_sidecar(video, {"memflow_version": "1"})
        assert json.loads(sidecar.read_text()) == {"memflow_version": "1"}
        return
    with pytest.raises(OutputError, match=f"{sidecar} appeared while it was rendered and was not written by memflow"):
        write_video_sidecar(video, {"memflow_version": "1"})
    assert sidecar.is_dir() or sidecar.read_text() == '{"my": "notes"}'
    assert video.read_bytes() == b"a finished video"
