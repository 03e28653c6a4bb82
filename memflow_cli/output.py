"""The outputs of a render: their paths (the video, its hidden partial file, its lock, its JSON sidecar), the
reservation that makes them a unit, and the sidecar's reading and writing. The MP4 writer is `mp4.py`.

A render's frames go to the hidden `.<stem>.partial.mp4` beside the target (a name no story title can
produce: titles never start with a dot), which becomes the target only once the video is complete.

`reserved_output` claims a target before any work starts: it checks the folder and the names, takes
a per-output lock (`.<name>.lock`, released by the OS if the process dies), refuses a sidecar path
held by a file memflow did not write, and keeps a partial file left by an earlier render unless
overwriting was asked for.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .companions import spelling_problem
from .loading import read_regular_file

PARTIAL_SUFFIX = ".partial.mp4"
LOCK_SUFFIX = ".lock"
MAX_SIDECAR_BYTES = 128 * 2**20  # a sidecar holds a story's prompts (a JSONL file is at most 16 MiB) twice, escaped
SIDECAR_MARKER = "memflow_version"  # every sidecar memflow writes has it; a JSON file without it is not ours
DEFAULT_NAME_MAX_BYTES = 255
_SIDECAR_TMP_EXTRA_BYTES = len(".") + len(".XXXXXXXX.tmp")  # mkstemp's name around the sidecar's


class OutputError(RuntimeError):
    """The video could not be written; the message says why, `hint` what to do."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class OutputExistsError(OutputError):
    """A file of the render exists (`path`: the target, its partial or its sidecar) and may not be replaced."""

    def __init__(self, message: str, hint: str | None = None, path: Path | None = None):
        super().__init__(message, hint)
        self.path = path


class OutputBusyError(OutputError):
    """Another process is rendering to the same output right now."""


def partial_path(target: Path) -> Path:
    """Where frames go until the video is complete: `out.mp4` -> `.out.partial.mp4`, same folder (hidden)."""
    return target.with_name(f".{target.stem}{PARTIAL_SUFFIX}")


def lock_path(target: Path) -> Path:
    """The lock file of a render to `target`, named by the name in lower case (`Out.MP4`, `out.mp4`: one output,
    one lock): `.out.mp4.lock`, same folder."""
    return target.with_name(f".{target.name.lower()}{LOCK_SUFFIX}")


def sidecar_path(target: Path) -> Path:
    """The metadata file of a video: `out.mp4` -> `out.json`."""
    return target.with_suffix(".json")


def is_partial_name(name: str) -> bool:
    """Whether a file name is one memflow gives its partial videos."""
    return name.startswith(".") and name.endswith(PARTIAL_SUFFIX)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_video_sidecar(video: Path, data: dict[str, Any]) -> Path:
    """Write the sidecar of a finished `video`; a failure is an OutputError that says the video is complete."""
    path = sidecar_path(video)
    if _foreign_sidecar(path):  # made while the video was rendered
        raise OutputError(
            f"the video {video} is complete, but {path} appeared while it was rendered and was not written by "
            f"memflow, so the video's metadata was not written over it",
            hint="move that file away; the video itself is fine",
        )
    try:
        write_sidecar(path, data)
    except OSError as error:
        raise OutputError(
            f"the video {video} is complete, but its metadata {path} could not be written: {_reason(error)}",
            hint="free some space or fix the folder's permissions; the video itself is fine",
        ) from None
    return path


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


@contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` to write; once the block ends without error it replaces `path`, readable
    as the user's other files are (mkstemp makes it private), else it is removed: `path` is whole or untouched."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_sidecar(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as indented JSON, atomically (`written_atomically`)."""
    with written_atomically(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_sidecar(path: Path) -> Any:
    """The JSON at `path`: a regular file of at most MAX_SIDECAR_BYTES (a FIFO, a device or a huge file beside an
    output is never read: ValueError), OSError where it cannot be read."""
    try:
        return json.loads(read_regular_file(path, MAX_SIDECAR_BYTES).decode("utf-8"))
    except RecursionError:  # lists nested thousands deep: no sidecar of memflow's
        raise ValueError(f"{path} nests too deep to be a sidecar") from None


def _foreign_sidecar(path: Path) -> bool:
    """Whether something memflow did not write is at a sidecar's place (a folder, a file not memflow's)."""
    return path.is_dir() or (path.exists() and memflow_sidecar(path) is None)


def memflow_sidecar(path: Path) -> dict[str, Any] | None:
    """The sidecar at `path` if memflow wrote it (a JSON object with its marker key), else None."""
    try:
        data = read_sidecar(path)
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return data if isinstance(data, dict) and SIDECAR_MARKER in data else None


def check_folder(target: Path) -> None:
    """The folder of `target` exists (and is a folder)."""
    folder = target.parent
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"cannot write {target}: {folder} is a file, not a folder", hint="choose another folder")
    if not folder.is_dir():
        raise OutputError(f"cannot write {target}: folder {folder} does not exist", hint="create it first")


def _check_name_lengths(target: Path) -> None:
    """Every file of the render (video, sidecar, partial, lock, the sidecar's temporary) must fit a file name."""
    try:
        name_max = os.pathconf(target.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = DEFAULT_NAME_MAX_BYTES
    names = (target.name, partial_path(target).name, lock_path(target).name, sidecar_path(target).name)
    longest = max(len(os.fsencode(name)) for name in names) + _SIDECAR_TMP_EXTRA_BYTES
    if longest > name_max:
        allowed = name_max - (longest - len(os.fsencode(target.name)))
        raise OutputError(
            f"cannot write {target}: the file name is {len(os.fsencode(target.name))} bytes long, and with the "
            f"names of its temporary files at most {allowed} fit in {target.parent}",
            hint="use a shorter file name or story title",
        )


class OutputLock:
    """An exclusive lock on one output, held through an open lock file (flock).

    The OS drops the lock when the process ends, however it ends, so a killed render never blocks the
    next one; the lock file is removed on release. Whoever locks a file that its holder has just removed
    sees that the path now names another file (or none) and tries again.
    """

    def __init__(self, target: Path):
        self.target = target
        self.path = lock_path(target)
        self._fd: int | None = None

    def acquire(self) -> None:
        while self._fd is None:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                who = f"another memflow render (process {holder})" if holder else "another memflow render"
                raise OutputBusyError(
                    f"{who} is writing {self.target} right now; nothing was rendered",
                    hint="wait for it to finish, or choose another output",
                ) from None
            if not _same_file(fd, self.path):
                os.close(fd)
            elif os.fstat(fd).st_nlink > 1:  # another name of this file (a backup's hard link, or planted): memflow
                self.path.unlink()  # lets its own name go and makes a fresh lock file; the file is never written
                os.close(fd)
            else:
                self._fd = fd
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def _open(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.EISDIR):  # a link: the file it names is not memflow's to write
                raise self._not_a_lock_file("a link" if error.errno == errno.ELOOP else "a folder") from None
            raise OutputError(
                f"cannot write in {self.target.parent}: {_reason(error)}",
                hint="choose a folder you can write to" if error.errno != errno.ENAMETOOLONG else "shorten the name",
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device: no file memflow made
            os.close(fd)
            raise self._not_a_lock_file("not a plain file")
        return fd

    def _not_a_lock_file(self, what: str) -> OutputExistsError:
        return OutputExistsError(
            f"{self.path} is where memflow locks {self.target.name}, but it is {what}; nothing was rendered",
            hint="remove it (memflow makes that file itself), or choose another output name",
            path=self.path,
        )

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked: nobody can lock this file after us
        os.close(self._fd)
        self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def check_existing(target: Path, *, overwrite: bool, resume: bool = False) -> None:
    """What a render to `target` would replace: refuse what was not asked for (call with the output locked).

    With `resume`, a partial video is not refused: its render is dead (the lock is ours), so the story is to
    be rendered again from the beginning.
    """
    if target.is_dir():
        raise OutputError(f"cannot write {target}: it is a folder", hint="name an .mp4 file")
    sidecar = sidecar_path(target)
    if _foreign_sidecar(sidecar):
        raise OutputExistsError(
            f"{sidecar} exists and was not written by memflow; the video's metadata would replace it, so nothing "
            f"was rendered",
            hint="move that file away, or choose another output name",
            path=sidecar,
        )
    partial = partial_path(target)
    if partial.is_dir():
        raise OutputExistsError(f"{partial} is where {target.name}'s partial video goes, but it is a folder; "
                                "nothing was rendered", "move it away, or choose another output name", partial)
    if partial.exists() and not (overwrite or resume):
        raise OutputExistsError(
            f"{partial} holds the frames of an earlier render of {target.name} that was stopped; nothing was rendered",
            hint="watch or move it, or use --overwrite to render again from the start",
            path=partial,
        )
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} exists; nothing was rendered", "use --overwrite to replace it", target)


def check_reservable(target: Path) -> None:
    """The folder of `target` exists and every file name of the render fits: checked before any lock is taken."""
    check_folder(target)
    check_output_name(target)
    if problem := spelling_problem(target, partial_path(target)):  # one look at the folder, as each is claimed
        raise OutputError(*problem)


def check_output_name(target: Path) -> None:
    """Every file name of a render to `target` fits, and is none of memflow's own: also before its folder exists."""
    if is_partial_name(target.name):
        raise OutputError(
            f"{target}: names starting with '.' and ending in '{PARTIAL_SUFFIX}' are memflow's partial files",
            hint="choose another output name",
        )
    _check_name_lengths(target)


@contextmanager
def reserved_output(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Claim `target`, its sidecar and its partial file for one render, before any work starts.

    Raises OutputError (OutputBusyError while another process renders to `target`, OutputExistsError for
    what would be replaced without being asked) with a message and a hint. Holds the lock until the block
    ends. With `overwrite`, a partial file left by an earlier, dead render is removed here.
    """
    check_reservable(target)
    lock = OutputLock(target)
    lock.acquire()
    try:
        check_existing(target, overwrite=overwrite)
        partial_path(target).unlink(missing_ok=True)
        yield target
    finally:
        lock.release()
