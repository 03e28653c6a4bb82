"""Where two recorded runs (`recorded_run.py`) part: the first latent chunk and the first frames that differ.

    python tests/gpu_tools/compare_runs.py run1.pt run2.pt   # prints one JSON line
"""

from __future__ import annotations

import json
import sys

import torch


def main() -> None:
    a, b = (torch.load(path) for path in sys.argv[1:3])
    latents = [
        None if x.shape != y.shape else float((x - y).abs().max())
        for x, y in zip(a["latents"], b["latents"], strict=False)
    ]
    first_latent = next((i for i, d in enumerate(latents) if d != 0.0), None)
    first_frames = next((i for i, (x, y) in enumerate(zip(a["frames"], b["frames"], strict=False)) if x != y), None)
    print(json.dumps({
        "runs": sys.argv[1:3], "chunks": [len(a["latents"]), len(b["latents"])],
        "cudnn_benchmark": [a["cudnn_benchmark"], b["cudnn_benchmark"]],
        "first_latent_chunk_differing": first_latent, "latent_max_diff": latents,
        "first_frames_chunk_differing": first_frames,
        "frames_differing": sum(x != y for x, y in zip(a["frames"], b["frames"], strict=False)),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
