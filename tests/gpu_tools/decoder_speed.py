"""The Wan2.1 VAE decoder alone on the GPU: ms per steady 12-frame chunk (832x480) for each way it can run.

Full-size random weights (memflow's `WanVAE` of the Wan2.1 config, bf16, channels-last convs as the engine
lays them out); each configuration is timed by `bench.decode_ms_per_chunk` (warm-up excluded, device
synchronised, median), with its peak memory, and its frames are checked against the plain decoder in float32
(same weights, same latents, TF32 off): relative L2 over the first two chunks of a video. A configuration is
within the bar where that error is at most `FAST_PATH_MARGIN` times the plain bf16 decoder's, the bar
`tests/test_gpu_codec.py` holds the render paths to on the codec fixtures. One JSON line per configuration,
then one naming the fastest configuration within the bar; the profile's top kernels with `--profile NAME`.
By default every kernel set with and without CUDA graphs, one latent frame per call (the decoder's default),
in about a minute on an H100, most of it compiling the compiled sets; the `+chunk` configurations (a whole
chunk per call) run when named.

    python tests/gpu_tools/decoder_speed.py                       # every configuration of one frame per call
    python tests/gpu_tools/decoder_speed.py eager-cuda-2d eager-cuda-2d+graphs   # some of them
    python tests/gpu_tools/decoder_speed.py --profile eager-cuda-2d+graphs

The fastest set within the bar may become the eager CUDA path's decoder: `speed.decoder.EAGER_CUDA_DECODER`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import torch

from memflow_cli.bench import decode_ms_per_chunk
from memflow_cli.decode import StreamingDecoder
from memflow_cli.settings import VideoGeometry
from memflow_cli.speed.compile import VAE_GRAPHS, allow_recompiles
from memflow_cli.speed.decoder import EAGER_CUDA_DECODER, DecoderKernelSet, channels_last_convs
from memflow_cli.speed.process import process_settings
from memflow_cli.vae_stream import PLAIN_KERNELS
from memflow_cli.wan_vae import WanVAE, WanVAEConfig
from memflow_cli.weights import WAN21_VAE_CONFIG
from tests.codec import FAST_PATH_MARGIN

ERROR_CHUNKS = 2  # a video's first chunk (its first latent frame alone) and a steady one
REPEATS = 5  # timed chunks per configuration (median)


@dataclass(frozen=True)
class Config:
    """One way the decoder runs: its kernel set, CUDA graphs or not, one latent frame per call or a whole chunk."""

    kernels: DecoderKernelSet
    graphs: bool
    per_chunk: bool

    @property
    def name(self) -> str:
        return f"{self.kernels.value}{'+graphs' if self.graphs else ''}{'+chunk' if self.per_chunk else ''}"

    def decoder(self, vae: WanVAE) -> StreamingDecoder:
        per_call = None if self.per_chunk else 1
        return StreamingDecoder(vae, frames_per_call=per_call, kernels=self.kernels.kernels(), graphs=self.graphs)


CONFIGS = {
    config.name: config
    for config in (
        Config(kernels, graphs, per_chunk)
        for kernels in DecoderKernelSet
        for graphs in (False, True)
        for per_chunk in (False, True)
    )
}
DEFAULT_CONFIGS = [name for name, config in CONFIGS.items() if not config.per_chunk]
OFFICIAL_STYLE = Config(DecoderKernelSet.PLAIN, graphs=False, per_chunk=False)  # every norm in bf16, as the official


def video_chunks(geometry: VideoGeometry, seed: int = 1) -> list[torch.Tensor]:
    """`ERROR_CHUNKS` chunks of random latents [1, F, C, h, w] on the GPU."""
    shape = (1, geometry.frames_per_chunk, geometry.latent_channels, geometry.latent_height, geometry.latent_width)
    generator = torch.Generator().manual_seed(seed)
    # rounded to bf16, as the generator yields them: the float32 reference decodes the same values
    return [torch.randn(shape, generator=generator).bfloat16().float().cuda() for _ in range(ERROR_CHUNKS)]


def decode_video(decoder: StreamingDecoder, chunks: list[torch.Tensor]) -> torch.Tensor:
    """The chunks decoded as one video from its start: float32 frames [N, 3, H, W] on the GPU."""
    decoder.reset()
    frames = torch.cat([decoder.decode_float(chunk) for chunk in chunks])
    decoder.reset()
    return frames


def float32_frames(vae: WanVAE, chunks: list[torch.Tensor]) -> torch.Tensor:
    """The plain decoder in float32, TF32 off: the reference every configuration's error is measured against."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return decode_video(StreamingDecoder(vae, dtype=torch.float32, kernels=PLAIN_KERNELS), chunks)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def relative_l2(ours: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((ours.double() - expected).norm() / expected.norm()).item()


def measure(vae: WanVAE, config: Config, geometry: VideoGeometry, chunks, expected) -> dict[str, object]:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    decoder = config.decoder(vae)
    ms = decode_ms_per_chunk(decoder, geometry, repeats=REPEATS)
    error = relative_l2(decode_video(decoder, chunks), expected)
    return {
        "config": config.name, "decode_ms_per_chunk": round(ms, 2), "bf16_rel_l2_to_float32": error,
        "device": torch.cuda.get_device_name(),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
        "video_frames_per_chunk": geometry.video_frames_per_chunk, "resolution": f"{geometry.width}x{geometry.height}",
        "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip


def verdict(results: list[dict[str, object]], official_style_error: float) -> dict[str, object]:
    """The fastest configuration within the bar, and the bar."""
    bar = FAST_PATH_MARGIN * official_style_error
    within = [result for result in results if result["bf16_rel_l2_to_float32"] <= bar]
    fastest = min(within, key=lambda result: result["decode_ms_per_chunk"], default={})
    return {
        "fastest_within_bar": fastest.get("config"), "decode_ms_per_chunk": fastest.get("decode_ms_per_chunk"),
        "bar_rel_l2": bar, "official_style_rel_l2": official_style_error,
        "over_bar": [result["config"] for result in results if result["bf16_rel_l2_to_float32"] > bar],
        "eager_cuda_decoder_now": EAGER_CUDA_DECODER.value,
    }  # fmt: skip


def profile(vae: WanVAE, config: Config, geometry: VideoGeometry) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    decoder = config.decoder(vae)
    decode_ms_per_chunk(decoder, geometry, repeats=1)  # warm-up and capture
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decode_ms_per_chunk(decoder, geometry, repeats=3)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    choices = ", ".join(CONFIGS)
    parser.add_argument("configs", nargs="*", metavar="CONFIG", help=f"any of {choices} (default: no +chunk)")
    parser.add_argument("--profile", choices=CONFIGS, help="print the top CUDA kernels of one configuration")
    args = parser.parse_args()
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configuration {', '.join(unknown)}; choose among {', '.join(CONFIGS)}")
    device = torch.device("cuda")
    process_settings(device, compile=True)  # cuDNN heuristics (no autotuning), as every run; compile caches
    allow_recompiles(4 * VAE_GRAPHS)  # both compiled sets share their steps' graphs in this one process
    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig.from_diffusers(WAN21_VAE_CONFIG)).to(device).eval()  # float32: the reference first
    geometry = VideoGeometry()  # 832x480, 3 latent frames per chunk -> 12 video frames
    chunks = video_chunks(geometry)
    expected = float32_frames(vae, chunks)
    vae.to(torch.bfloat16)
    channels_last_convs(vae)  # what the engine does on CUDA
    if args.profile:
        profile(vae, CONFIGS[args.profile], geometry)
        if not args.configs:
            return
    names = [OFFICIAL_STYLE.name] + [name for name in args.configs or DEFAULT_CONFIGS if name != OFFICIAL_STYLE.name]
    results = []
    for name in names:
        results.append(measure(vae, CONFIGS[name], geometry, chunks, expected))
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps(verdict(results, results[0]["bf16_rel_l2_to_float32"])), flush=True)


if __name__ == "__main__":
    main()
