"""The MP4 writer: a fragmented H.264 file that grows on disk and plays at every moment.

`Mp4Writer` pipes raw RGB frames into ffmpeg (the binary shipped with imageio-ffmpeg) from a feeder thread.
The MP4 has one fragment per frame, so whatever has been written so far plays at any moment, even if the
process is killed. Frames go to the hidden partial file beside the target (`output.partial_path`); only a
successful `close()` moves it onto the target (atomically, same folder), so the target is never left corrupt.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING

import imageio_ffmpeg
import numpy as np

from .output import OutputError, OutputExistsError, check_folder, partial_path

if TYPE_CHECKING:
    import torch

LOG_TAIL_CHARS = 2000
QUEUE_CHUNKS = 2
ABORT_TIMEOUT_S = 60.0
DYING_WAIT_S = 10.0  # how long a writer waits for an ffmpeg whose pipe broke to exit, to name its signal
_STOP = None  # queue sentinel: no more frames


class RenderInterrupted(Exception):
    """The render was stopped (Ctrl-C); `partial` is the playable file of the finished chunks, if any."""

    def __init__(self, partial: Path | None, frames: int):
        super().__init__(f"interrupted after {frames} frames")
        self.partial, self.frames = partial, frames


def _ffmpeg_command(output: Path, width: int, height: int, fps: int, keyframe_interval: int) -> list[str]:
    """rawvideo rgb24 on stdin -> H.264 yuv420p with a keyframe every `keyframe_interval`, fragmented per frame."""
    source = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0"]
    codec = ["-an", "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p"]
    # no B-frames, no look-ahead, one fragment per frame: what was written is on disk at once (but the last
    # frame, whose duration the muxer learns from the next one)
    codec += ["-tune", "zerolatency"]
    gop = ["-g", str(keyframe_interval), "-keyint_min", str(keyframe_interval), "-sc_threshold", "0"]
    container = ["-movflags", "+frag_every_frame+empty_moov+default_base_moof", "-flush_packets", "1"]
    container += ["-max_interleave_delta", "0", "-f", "mp4"]
    return [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostats", "-loglevel", "warning", "-y",
            *source, *codec, *gop, *container, str(output)]  # fmt: skip


def _as_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """A uint8 [N, H, W, 3] tensor or array -> a contiguous numpy array on the CPU."""
    if hasattr(frames, "detach"):  # a torch tensor (torch is imported only where tensors exist)
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray):
        raise TypeError(f"frames must be a torch tensor or a numpy array, got {type(frames).__name__}")
    return np.ascontiguousarray(frames)


def _check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % 2:
            raise OutputError(f"video {name} must be a positive even number (H.264 4:2:0), got {value}")


def _check_target(target: Path, overwrite: bool) -> None:
    check_folder(target)
    if target.is_dir():
        raise OutputError(f"cannot write {target}: it is a folder", hint="name an .mp4 file")
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} already exists; use --overwrite to replace it")


_TELLING_WORDS = ("No space left", "Permission denied", "Read-only", "File too large", "Error", "error")


def _signal_name(number: int) -> str:
    try:
        name = signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
    return f"{name}, the file size limit" if name == "SIGXFSZ" else name


class _PipeFeeder:
    """Writes queued byte chunks to a pipe from a background thread, so a slow ffmpeg never stalls the caller.

    The queue is bounded: the caller blocks only when `QUEUE_CHUNKS` chunks are already waiting. After a
    write error the thread keeps draining the queue, so the caller can never block on a dead pipe; the
    error is kept in `error` for the caller to raise.
    """

    def __init__(self, pipe: IO[bytes]):
        self.pipe = pipe
        self.error: BaseException | None = None
        self._stop_sent = False
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._thread = threading.Thread(target=self._run, name="mp4-writer-feed", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not _STOP:
            if self.error is None:
                try:
                    self.pipe.write(chunk)
                    self.pipe.flush()
                except (OSError, ValueError) as error:  # BrokenPipeError when ffmpeg died
                    self.error = error
        self._close_pipe()

    def _close_pipe(self) -> None:
        try:
            self.pipe.close()
        except OSError as error:  # flushing into a dead ffmpeg
            self.error = self.error or error

    def put(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def finish(self, timeout: float | None = None) -> bool:
        """Send end-of-stream and wait until everything queued has reached the pipe; False on timeout."""
        try:
            if not self._stop_sent:
                self._queue.put(_STOP, timeout=timeout)
                self._stop_sent = True
        except queue.Full:
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()


class Mp4Writer:
    """Appends uint8 RGB frames to a fragmented MP4 that is playable at every moment.

    Use as a context manager: a clean exit calls `close()` (the partial file becomes the target), an
    exception (KeyboardInterrupt included) calls `abort()` (the partial file stays, playable) and re-raises.
    """

    def __init__(
        self,
        target: Path,
        width: int,
        height: int,
        fps: int = 16,
        *,
        overwrite: bool = False,
        keyframe_interval: int = 12,
    ):
        _check_size(width, height)
        _check_target(target, overwrite)
        if keyframe_interval < 1:
            raise OutputError(f"keyframe_interval must be at least 1, got {keyframe_interval}")
        self.target = target
        self.partial = partial_path(target)
        self.width, self.height, self.fps = width, height, fps
        self._frames_written = 0
        self._finished = False
        self._log = tempfile.TemporaryFile()
        command = _ffmpeg_command(self.partial, width, height, fps, keyframe_interval)
        try:
            # A session of its own: Ctrl-C reaches only us, and abort() then finishes ffmpeg cleanly.
            self._process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log, start_new_session=True
            )
        except BaseException:
            self._log.close()
            raise
        assert self._process.stdin is not None
        self._feeder = _PipeFeeder(self._process.stdin)

    @property
    def pid(self) -> int:
        """Process id of the ffmpeg encoder."""
        return self._process.pid

    @property
    def frames_written(self) -> int:
        """Frames accepted by `write` so far."""
        return self._frames_written

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        """Append uint8 frames [N, H, W, 3]. Raises OutputError if ffmpeg has stopped."""
        if self._finished:
            raise OutputError(f"{self.target}: the writer is already closed")
        array = self._validated(_as_frames(frames))
        self._raise_if_failed()
        if len(array):
            self._feeder.put(array.tobytes())
            self._frames_written += len(array)

    def _validated(self, array: np.ndarray) -> np.ndarray:
        expected = (self.height, self.width, 3)
        if array.ndim != 4 or array.shape[1:] != expected:
            raise ValueError(f"frames must be [N, {self.height}, {self.width}, 3], got {list(array.shape)}")
        if array.dtype != np.uint8:
            raise ValueError(f"frames must be uint8, got {array.dtype}")
        return array

    def _raise_if_failed(self) -> None:
        if self._feeder.error is not None or self._process.poll() is not None:
            raise OutputError(self._failure_message())

    def _failure_message(self) -> str:
        """One line: which file, why ffmpeg stopped (its most telling log line), what is kept."""
        code = self._process.poll()
        if code is None and self._feeder.error is not None:  # the pipe broke: ffmpeg is dying, let it say how
            try:
                code = self._process.wait(timeout=DYING_WAIT_S)
            except subprocess.TimeoutExpired:
                code = None
        if code is None:
            status = "it is still running"
        elif code < 0:
            status = f"it was killed by {_signal_name(-code)}"
        else:
            status = f"it exited with code {code}"
        kept = "; the file keeps the frames written so far" if self._frames_written else ""
        return f"ffmpeg failed writing {self.partial}: {self._log_reason() or status}{kept}"

    def _log_reason(self) -> str:
        """ffmpeg's most telling log line (a full disk: 'No space left on device'), or ''."""
        self._log.seek(0)
        lines = [line.strip() for line in self._log.read().decode(errors="replace").splitlines() if line.strip()]
        telling = [line for line in lines if any(word in line for word in _TELLING_WORDS)]
        return (telling or lines or [""])[-1][-LOG_TAIL_CHARS:]

    def _finish_ffmpeg(self, timeout: float | None) -> int:
        """End the frame stream and wait for ffmpeg to write its last fragment; returns its exit code."""
        self._finished = True
        try:
            if self._feeder.finish(timeout):
                return self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        self._process.kill()  # hung: a dead pipe unblocks the feeder
        self._feeder.finish()
        return self._process.wait()

    def close(self) -> Path:
        """Finish the video and move it onto the target; returns the target."""
        if self._finished:
            raise OutputError(f"{self.target}: the writer is already closed")
        code = self._finish_ffmpeg(timeout=None)
        try:
            if self._frames_written == 0:
                self.partial.unlink(missing_ok=True)
                raise OutputError(f"no frames were written; {self.target} was not created")
            if code != 0 or self._feeder.error is not None:
                raise OutputError(self._failure_message())
            os.replace(self.partial, self.target)
            return self.target
        finally:
            self._log.close()

    def abort(self) -> Path | None:
        """Finish ffmpeg cleanly and keep the partial file; returns its path, or None if no frame was written."""
        if self._finished:
            return self.partial if self.partial.exists() else None
        self._finish_ffmpeg(timeout=ABORT_TIMEOUT_S)
        self._log.close()
        if self._frames_written == 0:
            self.partial.unlink(missing_ok=True)
            return None
        return self.partial if self.partial.exists() else None

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
