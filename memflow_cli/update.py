"""Re-render only from a change: where a render may start from a snapshot, and the snapshots a render keeps.

A render of a story with several prompts asked to keep snapshots (`--snapshots`: about 1 GB each at full
size) saves one at every segment boundary (`snapshots.py`).
A later render of the same output (`render --update` after an edit, `--skip-existing` after a crash) may
start from one of them when two things hold:

- the identity of the render is the same: seed, every generation setting, the model files, the device
  kind, the dtype, the compile path, FP8, the memory policy and the memflow version (`render_identity`);
  the sidecar of the old video records it, and each snapshot carries its digest;
- the story before the snapshot's boundary is the same: every earlier segment's prompt and first chunk
  (`snapshots.prefix_digest`).

The latest snapshot that satisfies both and can be read is the start (`find_start`: one that cannot be read
is passed over, in one line, for the next earlier one); anything else is one line saying why the render starts
from frame 0 (none where nothing of an earlier render of the output is there). `SnapshotKeeper` writes a
render's snapshots under the partial's names while it runs, and when the video is finished makes them the
video's (with those of the old video that are still valid), within `SNAPSHOT_BUDGET_BYTES`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .output import memflow_sidecar, sidecar_path
from .snapshots import (
    SNAPSHOT_BUDGET_BYTES,
    ResumePoint,
    Snapshot,
    SnapshotError,
    SnapshotFile,
    SnapshotRecord,
    digest,
    is_partial_snapshot,
    load_snapshot,
    on_cpu,
    prefix_digest,
    read_metadata,
    save_snapshot,
    snapshot_files,
    snapshot_path,
)

if TYPE_CHECKING:
    import torch

    from .engine import Engine
    from .script import Timeline
    from .settings import GenerationSettings, VideoGeometry

_WHAT = {
    "memflow": "memflow version", "seed": "seed", "settings": "settings", "model": "model files",
    "device": "device kind", "decode_device": "decode device kind", "dtype": "dtype", "compile": "compile path",
    "fp8": "FP8 choice", "interactive": "memory policy (one prompt or several)",
}  # fmt: skip


def render_identity(engine: Engine, settings: GenerationSettings, seed: int, interactive: bool) -> dict[str, Any]:
    """Everything besides the story that a render's frames depend on, as its sidecar records it."""
    decode_device = engine.decode_device or engine.device
    identity = {
        "memflow": __version__,
        "seed": seed,
        "settings": settings.as_dict(),
        "model": _model_identity(engine.identity),
        "device": engine.device.type,
        "decode_device": decode_device.type,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "compile": engine.fast.name,  # compiled, graphed and eager kernels round differently
        "fp8": engine.fp8,
        "interactive": interactive,
    }
    return json.loads(json.dumps(identity))  # as the sidecar gives it back (tuples become lists)


def _model_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """The model's identity without where its files are nor when they were written (a copy is the same model)."""
    if "files" not in identity:
        return {key: value for key, value in identity.items() if key != "note"}
    files = [{key: entry.get(key) for key in ("role", "name", "size", "fingerprint")} for entry in identity["files"]]
    return {"layout": identity.get("layout"), "files": files}


def identity_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """What differs between two render identities, in a few words (None: nothing)."""
    for key, what in _WHAT.items():
        if old.get(key) == new.get(key):
            continue
        if key == "settings":
            names = _changed_settings(old.get(key) or {}, new[key])
            return f"other settings ({', '.join(names)})" if names else "other settings"
        if key in ("seed", "device", "decode_device", "dtype", "compile", "fp8", "memflow"):
            return f"another {what} ({old.get(key)} -> {new.get(key)})"
        return f"another {what}"
    return None


def _changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(name for group in new for name in new[group] if (old.get(group) or {}).get(name) != new[group][name])


# ---------------------------------------------------------------------------------------------------------------------
# Where a render starts


@dataclass(frozen=True)
class StartPoint:
    """Where a render starts: a snapshot (None: frame 0) and, in one line, what is kept or why nothing is ('':
    nothing to say, there was no earlier render of the output)."""

    snapshot: Snapshot | None
    path: Path | None
    reason: str
    segment: int = 0  # the segment the render generates from
    unreadable: tuple[str, ...] = ()  # one line per snapshot passed over: it could not be read

    @property
    def chunk(self) -> int:
        return self.snapshot.chunk if self.snapshot else 0

    @property
    def reused_frames(self) -> int:
        return self.snapshot.video_frames if self.snapshot else 0


def find_start(
    target: Path, timeline: Timeline, identity: dict[str, Any], device: torch.device | str = "cpu", *,
    stopped: bool = False,
) -> StartPoint:  # fmt: skip
    """The latest readable snapshot of `target` (its finished video's, or a stopped render's) valid for this
    render; one that cannot be read is passed over for the next earlier one. `stopped`: the partial video of a
    stopped render of `target` was there (the render that claimed the output has replaced it since)."""
    unreadable: list[str] = []
    for path in _usable(target, timeline, digest(identity), unreadable):
        try:
            snapshot = load_snapshot(path, device)
        except SnapshotError as error:  # cut short (a full disk), damaged: an earlier one may do
            unreadable.append(_passed_over(error))
            continue
        segment = timeline.prompt_index_for_chunk(snapshot.chunk)
        how = "a stopped render" if is_partial_snapshot(path) else "the earlier video"
        reason = (
            f"keeping the first {snapshot.video_frames} frames of {how} ({_segments(1, segment)}); "
            f"rendering from segment {segment + 1} at {timeline.segments[segment].snapped_start_s:.2f} s"
        )
        return StartPoint(snapshot, path, reason, segment, tuple(unreadable))
    reason = _why_from_start(target, timeline, identity, stopped, readable=not unreadable)
    return StartPoint(None, None, reason, unreadable=tuple(unreadable))


def _passed_over(error: SnapshotError) -> str:
    """The line of a snapshot that cannot be read (its error names the file)."""
    return f"{error}: looking for an earlier snapshot"


def _usable(
    target: Path, timeline: Timeline, request: str | None, unreadable: list[str] | None = None
) -> Iterator[Path]:
    """The snapshot files valid for `timeline` and the `request` digest (None: any request), latest first; a
    stopped render's before the finished video's at the same boundary. One whose header cannot be read is
    passed over (a line for it in `unreadable`)."""
    candidates = [(chunk, True, path) for chunk, path in snapshot_files(target, partial=True).items()]
    if target.is_file():
        candidates += [(chunk, False, path) for chunk, path in snapshot_files(target).items()]
    for chunk, _, path in sorted(candidates, key=lambda c: (c[0], c[1]), reverse=True):
        if chunk not in timeline.switch_chunks:  # a snapshot resumes only where the new story switches prompt
            continue
        try:
            metadata = read_metadata(path)
        except SnapshotError as error:
            if unreadable is not None:
                unreadable.append(_passed_over(error))
            continue
        if request in (None, metadata["request"]) and metadata["prefix"] == prefix_digest(timeline, chunk):
            yield path


def _why_from_start(target: Path, timeline: Timeline, identity: dict[str, Any], stopped: bool, readable: bool) -> str:
    """One line: why this render starts from frame 0; '' where nothing of an earlier render of `target` is there
    (the normal case of a new output). `readable`: no snapshot was passed over as unreadable."""
    partials = snapshot_files(target, partial=True)
    if not (target.is_file() or stopped or partials):
        return ""  # a new output: nothing to continue, nothing to say
    snapshot = "snapshot" if readable else "readable snapshot"
    if len(timeline.segments) < 2:
        why = "the story has one prompt, so no boundary to start from"
    elif target.is_file():
        why = _why_not_from_the_video(target, timeline, identity, snapshot)
    elif partials:
        why = f"the stopped render of {target.name} kept no {snapshot} that fits this story and request"
    else:
        why = f"the stopped render of {target.name} kept no snapshots (they are kept with --snapshots)"
    return f"{why}: rendering from the start"


def _why_not_from_the_video(target: Path, timeline: Timeline, identity: dict[str, Any], snapshot: str) -> str:
    """Why the finished video `target` gives this render no snapshot to start from (`snapshot`: the word for one)."""
    sidecar = memflow_sidecar(sidecar_path(target))
    if sidecar is None:
        return f"{target.name} has no memflow sidecar ({sidecar_path(target).name}), so nothing of it is kept"
    record = sidecar.get("snapshots")
    if not isinstance(record, dict) or not record.get("files"):
        return f"the earlier render of {target.name} kept no snapshots (they are kept with --snapshots)"
    difference = identity_difference(record.get("identity") or {}, identity)
    if difference:
        return f"{target.name} was rendered with {difference}"
    changed = first_changed_segment(sidecar, timeline)
    if changed == 0:
        return "segment 1 changed, and every frame depends on it"
    if changed is None:
        return f"no {snapshot} of {target.name} fits this story"
    return f"no {snapshot} of {target.name} before the first change (segment {changed + 1})"


def preview_update(target: Path, timeline: Timeline, seed: int, settings: dict[str, Any]) -> str:
    """One line: what `render --update` of this story to `target` would keep and re-render (`check --against`).

    Only what the story says is compared (its segments, seed and memory and sampler settings); the model, the
    device kind and the compile path are assumed to be the video's.
    """
    everything = "every segment would render"
    if len(timeline.segments) < 2:
        return f"the story has one prompt: {everything}"
    sidecar = memflow_sidecar(sidecar_path(target)) if target.is_file() else None
    record = sidecar.get("snapshots") if sidecar else None
    if not isinstance(record, dict) or not record.get("files"):
        return f"{target} is not a memflow video that kept snapshots (render with --snapshots): {everything}"
    old = record.get("identity") or {}
    story_part = {"seed": seed, "settings": {group: settings[group] for group in ("memory", "sampler")}}
    old_part = {
        "seed": old.get("seed"),
        "settings": {g: (old.get("settings") or {}).get(g) for g in ("memory", "sampler")},
    }
    difference = identity_difference(old_part, json.loads(json.dumps(story_part)))
    if difference:
        return f"{target.name} was rendered with {difference}: {everything}"
    path = next(_usable(target, timeline, None), None)
    if path is None:
        changed = first_changed_segment(sidecar, timeline)
        where = "segment 1 changed" if changed == 0 else "no snapshot before the first change"
        return f"{where}: {everything}"
    metadata = read_metadata(path)
    segment, last = timeline.prompt_index_for_chunk(metadata["chunk"]), len(timeline.segments)
    kept = f"{_segments(1, segment)} kept ({metadata['video_frames']} frames of {target.name})"
    start = timeline.segments[segment].snapped_start_s
    assumed = "same model, device kind and compile path assumed"
    return f"{kept}; {_segments(segment + 1, last)} would render from {start:.2f} s ({assumed})"


def _segments(first: int, last: int) -> str:
    """'segment 3' or 'segments 3-5' (counted from 1)."""
    return f"segment {first}" if first == last else f"segments {first}-{last}"


def first_changed_segment(sidecar: dict[str, Any], timeline: Timeline) -> int | None:
    """Index of the first segment whose prompt or start differs from the video's sidecar (None: none differs)."""
    old = (sidecar.get("timeline") or {}).get("segments") or []
    for index, segment in enumerate(timeline.segments):
        if index >= len(old):
            return index
        was = old[index]
        if was.get("prompt") != segment.prompt or was.get("start_chunk") != segment.start_chunk:
            return index
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The snapshots a render keeps


class SnapshotKeeper:
    """Writes a render's snapshots beside its partial video and, once the video is done, makes them the video's.

    Snapshots of the earlier video before `start` that still hold (the same request, the same story before
    them) are kept, whether the render started from that video or from a stopped render of it (an `--update`
    stopped and run again); the others are removed when the new video replaces the old one, not before: a
    render that stops leaves the old video and its snapshots as they were, and its own partial snapshots to
    resume from.
    """

    def __init__(self, target: Path, identity: dict[str, Any], prefix: Callable[[int], str], geometry: VideoGeometry,
                 start: StartPoint, budget_bytes: int = SNAPSHOT_BUDGET_BYTES):  # fmt: skip
        """`prefix(chunk)`: the digest of the story before `chunk` (`snapshots.prefix_digest`)."""
        self.target, self.prefix, self.geometry = target, prefix, geometry
        self.start, self.budget = start, budget_bytes
        self.request = digest(identity)
        self.identity = identity
        self.from_video = start.path is not None and not is_partial_snapshot(start.path)
        for chunk, path in snapshot_files(target, partial=True).items():
            if start.path is None or self.from_video or chunk > start.chunk:
                path.unlink(missing_ok=True)  # a stopped render's that this one does not continue
        # files are written beside generation, one at a time (a full-size snapshot is a gigabyte); a process
        # that ends waits for the one being written
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memflow-snapshots")
        self._written: list[Future[None]] = []

    def save(self, point: ResumePoint) -> None:
        """Keep the state at a boundary (in the partial's name until the video is finished).

        The tensors are copied to the CPU here (the generator goes on changing its own); the file is written
        on a worker thread.
        """
        frames = self.geometry.video_frames(point.chunk * self.geometry.frames_per_chunk)
        snapshot = Snapshot(on_cpu(point), frames, self.request, self.prefix(point.chunk))
        self._written.append(self._writer.submit(self._write, snapshot))

    def _write(self, snapshot: Snapshot) -> None:
        save_snapshot(snapshot_path(self.target, snapshot.chunk, partial=True), snapshot)
        _within_budget(snapshot_files(self.target, partial=True), self.budget)

    def finish(self) -> SnapshotRecord:
        """The video is finished: its snapshots get the video's names; returns the sidecar's record of them."""
        self._writer.shutdown(wait=True)
        for written in self._written:
            written.result()  # a snapshot that could not be written fails here, before the old ones go
        for chunk, path in snapshot_files(self.target).items():
            if not (chunk < self.start.chunk and self._fits(chunk, path)):
                path.unlink(missing_ok=True)
        for chunk, path in snapshot_files(self.target, partial=True).items():
            path.replace(snapshot_path(self.target, chunk))
        kept = _within_budget(snapshot_files(self.target), self.budget)
        files = tuple(
            SnapshotFile(path.name, chunk, self.geometry.video_frames(chunk * self.geometry.frames_per_chunk),
                         path.stat().st_size)
            for chunk, path in kept.items()
        )  # fmt: skip
        return SnapshotRecord(self.start.reused_frames, self.start.segment, self.identity, self.budget, files)

    def _fits(self, chunk: int, path: Path) -> bool:
        """Whether the earlier video's snapshot at `chunk` holds for the new video: the same request and the same
        story before it (whether this render started from that video or from a stopped render of it)."""
        try:
            metadata = read_metadata(path)
        except SnapshotError:
            return False
        return metadata["request"] == self.request and metadata["prefix"] == self.prefix(chunk)


def _within_budget(files: dict[int, Path], budget: int) -> dict[int, Path]:
    """Remove the earliest snapshots until the rest fit in `budget` bytes (the latest is always kept)."""
    sizes = {chunk: path.stat().st_size for chunk, path in files.items() if path.exists()}
    kept = dict(files)
    for chunk in sorted(sizes)[:-1]:
        if sum(sizes[c] for c in kept) <= budget:
            break
        kept.pop(chunk).unlink(missing_ok=True)
    return kept


def remove_snapshots(target: Path) -> None:
    """Every snapshot of `target`, its finished video's and a stopped render's (`--overwrite`)."""
    for partial in (False, True):
        for path in snapshot_files(target, partial=partial).values():
            path.unlink(missing_ok=True)
