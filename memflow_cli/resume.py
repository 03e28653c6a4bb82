"""Where a stream resumes from a snapshot's point, and the points a stream hands out for snapshots.

`ResumePoints` pairs the generator's state at each segment boundary with what a later render needs to start
there: the latents of every chunk before it and, where they fit, those chunks' frames and the decoder's causal
state after them (`snapshots.py` says why each is needed). `restore_decoder` and `kept_chunks` are the other
side: a stream from a point with frames writes them as they are and its decoder goes on from the saved state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from .decode import StreamingDecoder
from .snapshots import ResumePoint

if TYPE_CHECKING:
    from .generator import BoundaryState
    from .settings import VideoGeometry
    from .tae import StreamingTaeDecoder


def restore_decoder(
    decoder: StreamingDecoder | StreamingTaeDecoder, resume: ResumePoint, geometry: VideoGeometry
) -> bool:
    """Whether `resume` keeps the frames of its chunks and a causal state this decoder goes on from (then it does)."""
    if resume.frames is None or not isinstance(decoder, StreamingDecoder):  # TAEHV keeps no state to restore
        return False
    frames = (geometry.video_frames(resume.chunk * geometry.frames_per_chunk), geometry.height, geometry.width, 3)
    if tuple(resume.frames.shape) != frames or resume.frames.dtype != torch.uint8:
        return False
    if not all(history_fits(history, geometry) for history in resume.decoder):
        return False
    try:
        decoder.restore(resume.decoder)
    except ValueError:  # another decoder's state: the kept latents are decoded again
        decoder.reset()
        return False
    return True


def history_fits(history: torch.Tensor, geometry: VideoGeometry) -> bool:
    """A causal conv's history of one video at one of the decoder's scales: the latent frame's size times 1, 2, 4
    or 8 (a history of another size would be replaced by zeros at the first call, not go on from the state)."""
    if history.dim() != 5 or history.shape[0] != 1:
        return False
    h, w = history.shape[-2:]
    return any((h, w) == (geometry.latent_height * 2**k, geometry.latent_width * 2**k) for k in range(4))


def kept_chunks(
    latents: torch.Tensor, frames: torch.Tensor, geometry: VideoGeometry
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Latents [1, c * F, C, h, w] and their frames [N, H, W, 3] -> (latents, frames) of each of the c chunks."""
    for chunk, x in enumerate(latents.split(geometry.frames_per_chunk, dim=1)):
        first, end = (geometry.video_frames(c * geometry.frames_per_chunk) for c in (chunk, chunk + 1))
        yield x, frames[first:end]


class ResumePoints:
    """Pairs the generator's state at each boundary with the latents of every chunk before it, and where they
    fit in `frames_bytes` with those chunks' frames and the decoder's causal state after them.

    A point holds every frame before it, so the points of one video would hold its frames many times over
    (their sum grows with the square of the video's length): `frames_bytes` bounds the frames and states of
    all the points handed out together, not each one's.

    The latents are kept (on the device: 0.57 MiB a chunk at 832x480 in bf16) for the first `last_chunk`
    chunks only; the boundaries after them are not asked for, and the latents are let go at that point. The
    frames and the decoder state (on the CPU) are let go at the first chunk they do not fit: the points after
    it have none, and a render from them decodes their kept latents again.
    """

    def __init__(self, take: Callable[[ResumePoint], None] | None, last_chunk: int, frames_bytes: int):
        self.take, self.last_chunk, self.frames_bytes = take, last_chunk, frames_bytes
        self.boundaries: dict[int, BoundaryState] = {}  # filled before the chunk they precede is made
        self.chunks = 0  # chunks made (or kept) so far
        self.made: list[torch.Tensor] = []  # their latents
        self.frames: list[torch.Tensor] | None = [] if take is not None else None  # their frames; None: not kept
        self.frames_held = 0  # their bytes
        self.decoder: tuple[torch.Tensor, ...] = ()  # the decoder's causal state after them, with the frames
        self.handed_out = 0  # bytes of frames and decoder state in the points handed out so far

    def boundary(self, state: BoundaryState) -> None:
        self.boundaries[state.chunk] = state

    def resumed(self, latents: torch.Tensor, point: ResumePoint) -> None:
        """The stream starts from `point` (its `latents` on the device), its frames and decoder state included:
        its chunks count as made."""
        if self.take is None:
            return
        self.chunks, self.made, self.frames, self.frames_held, self.decoder = point.chunk, [latents], [], 0, ()
        self._keep_frames(point.frames, point.decoder)
        self._within_bound()

    def decoder_state(self, decoder: StreamingDecoder | StreamingTaeDecoder) -> tuple[torch.Tensor, ...]:
        """The decoder's causal state now, copied, where the frames are still kept and it fits beside them."""
        if self.frames is None or not isinstance(decoder, StreamingDecoder):
            return ()
        return decoder.causal_state() if self._fits(decoder.causal_state_bytes) else ()

    def reached(
        self, latents: torch.Tensor, frames: torch.Tensor | None = None, decoder: tuple[torch.Tensor, ...] = ()
    ) -> None:
        """The next chunk is done: hand out the point before it if it starts a segment, then keep its latents
        (and its frames with the decoder state after it, `decoder_state`)."""
        if self.take is None:
            return
        self.ended()
        self.chunks += 1
        self.made.append(latents)
        self._keep_frames(frames, decoder)
        self._within_bound()

    def _fits(self, more: int) -> bool:
        """Whether the next point could carry the frames held and `more` bytes beside what was handed out: a
        point holds every frame before it, so once the next one cannot, no later one can."""
        return self.handed_out + self.frames_held + more <= self.frames_bytes

    def _keep_frames(self, frames: torch.Tensor | None, decoder: tuple[torch.Tensor, ...]) -> None:
        if self.frames is None or frames is None or not decoder or not self._fits(
            frames.nbytes + sum(t.nbytes for t in decoder)
        ):
            self.frames, self.decoder = None, ()
        else:
            self.frames.append(frames)
            self.frames_held += frames.nbytes
            self.decoder = decoder

    def _within_bound(self) -> None:
        if self.chunks > self.last_chunk:  # past the bound: no more snapshots, nothing more kept
            self.take, self.frames = None, None
            self.made.clear()

    def ended(self) -> None:
        """Hand out the point after every chunk made so far, if the generator stopped (or switches) there."""
        boundary = self.boundaries.pop(self.chunks, None)
        if self.take is None or boundary is None:
            return
        frames = torch.cat(self.frames) if self.frames else None  # within the bound: `_keep_frames` saw to it
        decoder = self.decoder if frames is not None else ()
        if frames is not None:
            self.handed_out += frames.nbytes + sum(t.nbytes for t in decoder)
        self.take(ResumePoint(boundary, torch.cat(self.made, dim=1), frames, decoder))
