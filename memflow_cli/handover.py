"""Hand latent chunks from the generating device to the decoding device (`--decode-device`), as they are made.

Between two GPUs the copy is queued without waiting for it: PyTorch runs a copy between devices on the
source's current stream and makes the destination's current stream wait for it, so the decoder (whose
`Overlap.map` work waits on the destination's stream) never reads a chunk before it has arrived, and
the generator's next chunk cannot overwrite the source before the copy has read it (same stream). A latent
chunk is small (3 frames of 16x60x104 at 832x480: 0.6 MB in bf16). To or from the CPU the copy waits:
the CPU side reads the chunk at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def handed_over(chunks: Iterator[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """Each chunk on `device` (itself where it is already there), in order, as the generator yields it."""
    for chunk in chunks:
        if chunk.device == device:
            yield chunk
        else:
            yield chunk.to(device, non_blocking=chunk.device.type == device.type == "cuda")
