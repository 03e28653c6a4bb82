"""Runs one memflow command with what it computed recorded: each latent chunk and a hash of each chunk's frames.

For determinism checks across processes (`compare_runs.py` says where two runs part). Optionally forces
cuDNN's autotuning on or off after memflow's own process settings. Not part of the test suite.

    python tests/gpu_tools/recorded_run.py --record run1.pt [--cudnn-benchmark on|off] -- render story.yaml ...
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--cudnn-benchmark", choices=["on", "off", "default"], default="default")
    parser.add_argument("memflow_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    memflow_args = args.memflow_args[1:] if args.memflow_args[:1] == ["--"] else args.memflow_args

    import memflow_cli.generator as generator
    import memflow_cli.mp4 as output
    import memflow_cli.speed as speed

    if args.cudnn_benchmark != "default":
        settings = speed.process_settings

        def forced(device, *, compile):
            settings(device, compile=compile)
            torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"

        speed.process_settings = forced

    latents: list[torch.Tensor] = []
    frame_hashes: list[str] = []
    stream = generator.MemFlowGenerator.stream

    def recorded_stream(self, *a, **k):
        for x in stream(self, *a, **k):
            latents.append(x.detach().clone())  # on the generating stream: no sync, no change of timing
            yield x

    write = output.Mp4Writer.write

    def recorded_write(self, frames):
        array = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        frame_hashes.append(hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16])
        return write(self, frames)

    generator.MemFlowGenerator.stream = recorded_stream
    output.Mp4Writer.write = recorded_write

    def save() -> None:
        torch.save({"latents": [x.float().cpu() for x in latents], "frames": frame_hashes,
                    "cudnn_benchmark": torch.backends.cudnn.benchmark}, args.record)  # fmt: skip

    atexit.register(save)
    from memflow_cli.cli import main as memflow

    sys.argv = ["memflow", *memflow_args]
    memflow()


if __name__ == "__main__":
    main()
