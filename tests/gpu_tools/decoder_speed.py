"""The Wan2.1 VAE decoder alone on the GPU: ms per steady 12-frame chunk (832x480) for each way it can run.

Full-size random weights (diffusers' default `AutoencoderKLWan`, bf16, channels-last convs as the engine
lays them out); each configuration is timed by `bench.decode_ms_per_chunk` (warm-up excluded, device
synchronised, median), with its peak memory. One JSON line per configuration, then the profile's top kernels
with `--profile NAME`.

    python tests/gpu_tools/decoder_speed.py                       # every configuration
    python tests/gpu_tools/decoder_speed.py eager-cuda+graphs     # some of them
    python tests/gpu_tools/decoder_speed.py --profile eager-cuda+graphs
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from diffusers import AutoencoderKLWan

from memflow_cli.bench import decode_ms_per_chunk
from memflow_cli.decode import StreamingDecoder
from memflow_cli.settings import VideoGeometry
from memflow_cli.speed.decoder import EAGER_CUDA_KERNELS, channels_last_convs, fused_decoder_kernels
from memflow_cli.speed.process import process_settings
from memflow_cli.vae_stream import PLAIN_KERNELS, DecoderKernels

KERNELS: dict[str, Callable[[], DecoderKernels]] = {
    "plain": lambda: PLAIN_KERNELS,  # before this change: the default (eager) CUDA path's steps
    "eager-cuda": lambda: EAGER_CUDA_KERNELS,  # torch's RMS norm + SiLU, 128-channel tiles, no compiler
    "compiled": fused_decoder_kernels,  # Inductor's fused steps (the --compile path)
}
CONFIGS = {
    f"{kernels}{'+graphs' if graphs else ''}{'+chunk' if per_chunk else ''}": (kernels, graphs, per_chunk)
    for kernels in KERNELS
    for graphs in (False, True)
    for per_chunk in (False, True)
}


def decoder_for(vae: AutoencoderKLWan, name: str) -> StreamingDecoder:
    kernels, graphs, per_chunk = CONFIGS[name]
    return StreamingDecoder(vae, frames_per_call=None if per_chunk else 1, kernels=KERNELS[kernels](), graphs=graphs)


def measure(vae: AutoencoderKLWan, name: str, geometry: VideoGeometry) -> dict[str, object]:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    ms = decode_ms_per_chunk(decoder_for(vae, name), geometry)
    return {
        "config": name, "decode_ms_per_chunk": round(ms, 2), "device": torch.cuda.get_device_name(),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
        "video_frames_per_chunk": geometry.video_frames_per_chunk, "resolution": f"{geometry.width}x{geometry.height}",
    }  # fmt: skip


def profile(vae: AutoencoderKLWan, name: str, geometry: VideoGeometry) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    decoder = decoder_for(vae, name)
    decode_ms_per_chunk(decoder, geometry, repeats=1)  # warm-up and capture
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decode_ms_per_chunk(decoder, geometry, repeats=3)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", metavar="CONFIG", help=f"any of {', '.join(CONFIGS)} (default: all)")
    parser.add_argument("--profile", choices=CONFIGS, help="print the top CUDA kernels of one configuration")
    args = parser.parse_args()
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configuration {', '.join(unknown)}; choose among {', '.join(CONFIGS)}")
    device = torch.device("cuda")
    process_settings(device, compile=True)  # cuDNN heuristics (no autotuning), as every run; compile caches
    torch.manual_seed(0)
    vae = AutoencoderKLWan().to(device, torch.bfloat16).eval()
    channels_last_convs(vae)
    geometry = VideoGeometry()  # 832x480, 3 latent frames per chunk -> 12 video frames
    if args.profile:
        profile(vae, args.profile, geometry)
        if not args.configs:
            return
    for name in args.configs or CONFIGS:
        print(json.dumps(measure(vae, name, geometry)), flush=True)


if __name__ == "__main__":
    main()
