"""Snapshots at segment boundaries: what lets a render continue from a prompt switch, frame for frame.

The generator is causal and seeded, so everything after a prompt switch at chunk c is a function of a
small set of state taken just before the switch. Found by reading the chunk loop and checked by
`tests/test_snapshots.py` (a stream started from the state equals the tail of a stream from chunk 0,
bit for bit, for latents and decoded frames):

- The latent history: the last `window` latent frames [B, W, C, h, w]. The switch's KV re-cache
  re-encodes them under the new prompt. 12 frames at 832x480 in bf16: 2.4 MB.
- The KV cache's sink and memory bank, and the staged prototype, with the cache's positions (`local_end`,
  `global_end`, frames `recorded`). The sink was encoded under the prompts before the switch (the re-cache
  protects it once the switch is past the window) and the bank holds prototypes staged by earlier chunks'
  cache passes; neither can be recomputed without replaying the video, so they are stored:
  (sink 3 + bank 3 + staged 1) frames x 2 (k, v) x 30 layers x 12 heads x 1560 tokens x 128 x 2 bytes, about
  1.0 GB at full size. The local window after the sink is *not* stored: the re-cache rewrites every valid
  token of it before any pass reads it (stored as zeros, the equality test proves it changes nothing).
- The noise generator's state (16 bytes of seed and offset on CUDA, 5 KB on the CPU): the next chunk's
  draws continue the sequence.
- Not stored, because the switch rebuilds them or they are functions of the chunk index: the text cache
  (reset by the switch, recomputed from the new prompt), the rope positions (absolute frame index), the
  bank's view and recording schedule (chunk index and `recorded`), SMA's candidate list.
- The latents of every chunk before the boundary [B, c*F, C, h, w] (0.2 MB a latent frame at 832x480 in
  bf16: 24 MB for 30 s of video). A render from the snapshot yields them as the chunks before the boundary.
- The frames before the boundary must be rebuilt exactly too, twice over. The decoder is causal: each of
  the Wan VAE decoder's 32 causal convs keeps its last two input frames, and that state depends on every
  frame before it, so no short tail of latents rebuilds it. And the MP4 encoder carries state: libx264's
  rate control in CRF mode blends the complexity of every earlier frame into each frame's quantiser, so
  the frames after the boundary encode to the same bits only when the encoder has seen the same frames
  before them (copying the old file's packets would not do). So the render encodes every frame again, and
  the finished MP4 is the same file a fresh render writes. Where they fit in `KEPT_FRAMES_BYTES` (the demo
  model's: 0.2 MB a chunk of frames, 3.3 MB of decoder state), the snapshot keeps the decoded frames before
  the boundary (uint8) and the decoder's causal state after them: the render writes those frames as they
  are and decodes only the chunks it generates. Otherwise (the full-size model: its decoder state alone is
  1.9 GB at 832x480 in bf16) the kept latents are decoded again, which rebuilds both states; that costs the
  decode time of the kept part (no generation): a fraction of a render on a GPU, but most of one for the
  demo model on a CPU, whose transformer is tiny and whose decoding is 95% of a render.

So a full-size snapshot is about 1 GB plus its latents; the demo model's grows with its boundary (its frames
and decoder state: 39 MB at 110 s), and the frames and states of one render's snapshots stay within
`KEPT_FRAMES_BYTES` together (the later boundaries of a long video keep latents only). A video keeps at most
`SNAPSHOT_BUDGET_BYTES` of them (the latest boundaries first: a crash resumes from the last one, and edits tend
to be late); the sidecar lists them with their sizes.

Each snapshot is one safetensors file, hidden beside the video (`.out.snap-c0042.safetensors`; while
rendering, `.out.partial.snap-c0042.safetensors`), written atomically, with its metadata (chunk,
segment, frames before it, and the digests of what it depends on) as JSON inside.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .output import written_atomically

if TYPE_CHECKING:  # torch is imported where tensors are read or written: `check --against` reads only metadata
    import torch

    from .generator import BoundaryState
    from .script import Timeline

SNAPSHOT_BUDGET_BYTES = 16 * 2**30  # per video: about 15 full-size boundaries
# The latents of the chunks before the next snapshot, which the engine keeps (on the device) while a render
# keeps snapshots: 0.57 MiB a chunk at 832x480 in bf16, so 512 MiB is the first 896 chunks (11.2 minutes) of
# a video. No snapshot is taken after that point, and the latents are let go.
KEPT_LATENTS_BYTES = 512 * 2**20
# The frames of those chunks and the decoder's causal state after them, kept (on the CPU) while the snapshots of
# one render hold no more than this of them in all (each holds every frame before it, so the early boundaries of
# a long video fill it): about two minutes of the demo model's video with a switch every 10 s (0.2 MiB a chunk,
# 3.3 MiB of state); never the full-size model's, whose decoder state alone is 1.9 GB. A snapshot with them lets
# a render skip decoding its kept part.
KEPT_FRAMES_BYTES = 256 * 2**20
SNAPSHOT_SUFFIX = ".safetensors"
_FORMAT = 1
_MAX_HEADER_BYTES = 2**24  # a snapshot's header names a few dozen tensors: kilobytes
_METADATA_KEYS = ("chunk", "segment", "video_frames", "request", "prefix", "memory")  # as `_flatten` writes them
_NAME = re.compile(r"^\.(?P<stem>.+?)(?P<partial>\.partial)?\.snap-c(?P<chunk>\d+)\.safetensors$")


class SnapshotError(ValueError):
    """A snapshot file cannot be used: unreadable, of another format, or not fitting this model."""


@dataclass(frozen=True)
class ResumePoint:
    """The state at a segment boundary: the generator's, and the latents of every chunk before it."""

    boundary: BoundaryState
    latents: torch.Tensor  # [B, chunk * F, C, h, w]
    # where they fit in `KEPT_FRAMES_BYTES`: the decoded frames of those chunks, uint8 [N, H, W, 3] on the CPU,
    # and the decoder's causal state after them (`StreamingDecoder.causal_state`); else None and ()
    frames: torch.Tensor | None = None
    decoder: tuple[torch.Tensor, ...] = ()

    @property
    def chunk(self) -> int:
        return self.boundary.chunk


@dataclass(frozen=True)
class Snapshot:
    """A resume point saved with what it depends on: a render may start from it when both digests match."""

    point: ResumePoint
    video_frames: int  # frames of the video before the boundary
    request: str  # digest of the seed, settings, model, device kind, dtype and compile path (`request_digest`)
    prefix: str  # digest of the story before the boundary (`prefix_digest`)

    @property
    def chunk(self) -> int:
        return self.point.chunk


@dataclass(frozen=True)
class SnapshotFile:
    """One snapshot of a finished video, as its sidecar lists it."""

    file: str
    chunk: int
    video_frames: int  # frames of the video before it
    bytes: int


@dataclass(frozen=True)
class SnapshotRecord:
    """What a video's sidecar says of the frames it reused and of the snapshots it keeps (`record.video_record`)."""

    reused_frames: int = 0  # frames before the snapshot the render started from (not generated again)
    rendered_from_segment: int = 0  # counted from 0
    identity: dict[str, Any] | None = None  # the render's identity (`update.render_identity`); None: no snapshots
    budget_bytes: int = SNAPSHOT_BUDGET_BYTES
    files: tuple[SnapshotFile, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "reused_frames": self.reused_frames, "rendered_from_segment": self.rendered_from_segment,
        }  # fmt: skip
        if self.identity is not None:
            files = [{"file": f.file, "chunk": f.chunk, "video_frames": f.video_frames, "bytes": f.bytes}
                     for f in self.files]  # fmt: skip
            record["snapshots"] = {"identity": self.identity, "budget_bytes": self.budget_bytes, "files": files}
        return record


# -- what a snapshot depends on -----------------------------------------------------------------------------------


def digest(value: Any) -> str:
    """A short stable hash of a JSON-able value."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def prefix_digest(timeline: Timeline, chunk: int) -> str:
    """What the video before `chunk` depends on in the story: each earlier segment's prompt and first chunk."""
    return segments_digest([(s.prompt, s.start_chunk) for s in timeline.segments], chunk)


def segments_digest(segments: Iterable[tuple[str, int]], chunk: int) -> str:
    """`prefix_digest` of segments given as (prompt, first chunk), in order (a live session's, as they come)."""
    return digest([[prompt, start] for prompt, start in segments if start < chunk] + [chunk])


def on_cpu(point: ResumePoint) -> ResumePoint:
    """A copy of `point` on the CPU (waits for the device)."""
    boundary, memory = point.boundary, point.boundary.memory
    memory = replace(
        memory, sink=memory.sink.cpu(), bank=memory.bank.cpu(), staged=memory.staged.cpu()
    )  # fmt: skip
    boundary = replace(boundary, history=boundary.history.cpu(), memory=memory, noise=boundary.noise.cpu())
    return replace(point, boundary=boundary, latents=point.latents.cpu())  # frames and decoder state: on the CPU


# -- files ----------------------------------------------------------------------------------------------------


def snapshot_path(target: Path, chunk: int, *, partial: bool = False) -> Path:
    """`out.mp4` -> `.out.snap-c0042.safetensors` (`.out.partial.snap-c0042...` while its render runs)."""
    middle = ".partial" if partial else ""
    return target.with_name(f".{target.stem}{middle}.snap-c{chunk:04d}{SNAPSHOT_SUFFIX}")


def is_partial_snapshot(path: Path) -> bool:
    """Whether a snapshot file is a running (or stopped) render's, not a finished video's."""
    match = _NAME.match(path.name)
    return bool(match and match["partial"])


def snapshot_files(target: Path, *, partial: bool = False) -> dict[int, Path]:
    """The snapshot files beside `target` (of its finished video, or of its partial), by chunk."""
    found: dict[int, Path] = {}
    if not target.parent.is_dir():
        return found
    for path in target.parent.iterdir():
        match = _NAME.match(path.name)
        if match and match["stem"] == target.stem and bool(match["partial"]) == partial:
            found[int(match["chunk"])] = path
    return dict(sorted(found.items()))


def save_snapshot(path: Path, snapshot: Snapshot) -> int:
    """Write `snapshot` to `path` atomically (a temporary file in the same folder, then a rename); its size."""
    from safetensors.torch import save_file

    tensors, metadata = _flatten(snapshot)
    with written_atomically(path) as temporary:
        save_file(tensors, temporary, metadata={"memflow_snapshot": json.dumps(metadata)})
    return path.stat().st_size


def read_metadata(path: Path) -> dict[str, Any]:
    """The JSON metadata of a snapshot file, from its safetensors header alone (no tensor is read)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO there is not waited on
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            os.close(descriptor)
            raise ValueError("not a regular file")
        with os.fdopen(descriptor, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > _MAX_HEADER_BYTES:
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(f.read(length))
        text = header.get("__metadata__", {}).get("memflow_snapshot")
        metadata = json.loads(text) if text is not None else None
    except RecursionError:
        raise SnapshotError(f"{path} is not a readable snapshot: its metadata nests too deep") from None
    except (OSError, ValueError, struct.error, AttributeError) as error:
        raise SnapshotError(f"{path} is not a readable snapshot: {error}") from None
    if not isinstance(metadata, dict):
        raise SnapshotError(f"{path} is not a memflow snapshot (no metadata)")
    if metadata.get("format") != _FORMAT:
        raise SnapshotError(f"{path} is a snapshot of another format ({metadata.get('format')})")
    missing = [key for key in _METADATA_KEYS if key not in metadata]
    if missing or not isinstance(metadata["memory"], dict):
        raise SnapshotError(f"{path} is not a whole memflow snapshot (no {', '.join(missing or ['memory'])})")
    return metadata


_ON_CPU = ("noise", "frames", "decoder.")  # the tensors of a snapshot used on the CPU, wherever the model runs


def load_snapshot(path: Path, device: torch.device | str = "cpu") -> Snapshot:
    """Read a snapshot written by `save_snapshot`, the generator's tensors on `device` (the noise state, frames and
    decoder state stay on the CPU, where they are used); SnapshotError if it cannot be."""
    from safetensors import SafetensorError, safe_open

    metadata = read_metadata(path)
    try:
        tensors: dict[str, torch.Tensor] = {}
        for on_cpu in (True, False):  # each tensor read straight to where it is used: no staging copy of 1 GB
            with safe_open(str(path), framework="pt", device="cpu" if on_cpu else str(device)) as f:
                names = [name for name in f.keys() if name.startswith(_ON_CPU) == on_cpu]  # noqa: SIM118
                tensors.update({name: f.get_tensor(name) for name in names})
        return _unflatten(tensors, metadata)
    except (SafetensorError, OSError, KeyError) as error:
        raise SnapshotError(f"{path} cannot be read: {error}") from None


def _flatten(snapshot: Snapshot) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    boundary, memory = snapshot.point.boundary, snapshot.point.boundary.memory
    tensors = {
        "history": boundary.history, "memory.sink": memory.sink, "memory.bank": memory.bank,
        "memory.staged": memory.staged, "noise": boundary.noise, "latents": snapshot.point.latents,
    }  # fmt: skip
    if snapshot.point.frames is not None:
        tensors["frames"] = snapshot.point.frames
        tensors.update({f"decoder.{index:03d}": history for index, history in enumerate(snapshot.point.decoder)})
    metadata = {
        "format": _FORMAT, "chunk": boundary.chunk, "segment": boundary.segment,
        "video_frames": snapshot.video_frames, "request": snapshot.request, "prefix": snapshot.prefix,
        "memory": {"local_end": memory.local_end, "global_end": memory.global_end, "recorded": memory.recorded},
    }  # fmt: skip
    return {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}, metadata


def _unflatten(tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Snapshot:
    from .generator import BoundaryState
    from .model.cache import MemoryState

    positions = metadata["memory"]
    memory = MemoryState(
        sink=tensors["memory.sink"], bank=tensors["memory.bank"], staged=tensors["memory.staged"],
        local_end=positions["local_end"], global_end=positions["global_end"], recorded=positions["recorded"],
    )  # fmt: skip
    noise = tensors["noise"]  # a generator's state is always a CPU tensor
    boundary = BoundaryState(metadata["chunk"], metadata["segment"], tensors["history"], memory, noise)
    decoder = tuple(tensors[name] for name in sorted(tensors) if name.startswith("decoder."))
    point = ResumePoint(boundary, tensors["latents"], tensors.get("frames"), decoder)
    return Snapshot(point, metadata["video_frames"], metadata["request"], metadata["prefix"])
