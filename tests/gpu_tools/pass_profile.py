"""Where one steady chunk's GPU time goes, by kernel: full-size random weights on one GPU, one fast path.

Loads `--model random` on the path named (eager, graphed, compiled, or the fused Triton glue with or
without CUDA graphs: triton-graphed, triton), warms it up (the compiled path compiles here; its
per-function compile times are printed; the triton paths compile their kernels in the load, whose time
`glue_warm_up_s` says), times a few generate-only chunks, then profiles two more and prints the top CUDA
kernels. Not part of the test suite.

    python tests/gpu_tools/pass_profile.py eager|graphed|compiled|triton-graphed|triton [--chunks 6] [--rows 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from memflow_cli.bench import Phase, _timed_run
from memflow_cli.engine import load_engine
from memflow_cli.plan import option_settings
from memflow_cli.speed.compile_cache import CompileChoice

PATHS = {
    "eager": CompileChoice.fixed(False),
    "graphed": CompileChoice.fixed(None),
    "compiled": CompileChoice.fixed(True),
    "triton-graphed": CompileChoice.triton(),
    "triton": CompileChoice.triton(graphs=False),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path", choices=PATHS)
    parser.add_argument("--chunks", type=int, default=6)
    parser.add_argument("--rows", type=int, default=40)
    args = parser.parse_args()
    started = time.perf_counter()
    engine = load_engine("random", "cuda", compile=PATHS[args.path], embed_cache=False)
    loaded = time.perf_counter()
    settings = option_settings({}, engine.geometry)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _timed_run(engine, settings, 3, 0, 0, Phase.GENERATE, folder)
        warmed = time.perf_counter()
        if args.path == "compiled":
            print(torch._dynamo.utils.compile_times(repr="str"))
        timed = _timed_run(engine, settings, args.chunks, 0, 0, Phase.GENERATE, folder)
        steady = timed.chunk_ms[1:]
        print(json.dumps({
            "path": engine.fast.name, "device": torch.cuda.get_device_name(), "load_s": round(loaded - started, 2),
            "glue_warm_up_s": getattr(engine.fast.kernels.glue, "warm_up_s", None),
            "warmup_s": round(warmed - loaded, 2), "chunk_ms": [round(ms, 1) for ms in timed.chunk_ms],
            "steady_chunk_ms": round(statistics.median(steady), 1) if steady else None,
        }))  # fmt: skip
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _timed_run(engine, settings, 2, 0, 0, Phase.GENERATE, folder)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90))
    engine.close()


if __name__ == "__main__":
    main()
