"""The TAEHV preview decoder alone on the GPU, before and after its stages became phase convolutions.

Full-size random weights in the released `taew2_1` layout, bf16, channels-last, cuDNN's heuristics as every
run uses them. Paths: `plain` (the reference's layer order, kept in tests/tae_reference.py), `phase` (the
module the engine builds: on CUDA each memory block's conv + bias (+ residual) + ReLU is one cuDNN fused
call where cuDNN offers it, `fused_memory_blocks` says), `phase-unfused` (the same without the fused
calls) and an experiment, `plain+transposed` (`plain` with each stage's upsampling and 3x3 conv as one
stride-2 transposed conv, 4x4 kernel). For each path one JSON line:
`decode_ms_per_chunk` and `decode_to_cpu_ms_per_chunk` (832x480, 3 latent frames -> 12 frames,
`bench.decode_ms_per_chunk`: warm-up excluded, synchronised, median of 20) and the peak memory; then one
line per path of its float32 distance to the plain path (TF32 off; bar 1e-4) and its bf16 error against
the plain path's float32 frames, over a streamed video of 3 chunks. A path that fails prints its error
instead. About 40 s on an H100.

    PYTHONPATH=. python tests/gpu_tools/tae_speed.py
    PYTHONPATH=. python tests/gpu_tools/tae_speed.py --profile phase   # the top CUDA kernels of one path
    PYTHONPATH=. python tests/gpu_tools/tae_speed.py --device cpu --size 64x96   # a smoke run without a GPU
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

from memflow_cli.bench import decode_ms_per_chunk
from memflow_cli.settings import VideoGeometry
from memflow_cli.speed.process import process_settings
from memflow_cli.tae import TAEW2_1, StreamingTaeDecoder, random_released_state
from memflow_cli.tae.weights import prepared, taehv_from_released
from tests.tae_reference import PlainStreamingTae, PlainTaehv, past_of, plain_taehv

PATHS = ("plain", "phase-unfused", "phase", "plain+transposed")
REPEATS = 20
ERROR_CHUNKS = 3
# transposed-conv tap k (output row 2i + k - 1 for input row i) holds these rows r of the 3x3 kernel
TRANSPOSED_TAPS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def transposed_kernel(conv: torch.Tensor) -> torch.Tensor:
    """A 3x3 conv [C', C, 3, 3] after nearest x2 upsampling as a stride-2 transposed conv's kernel [C, C', 4, 4]."""
    taps = TRANSPOSED_TAPS.to(torch.float64)
    return torch.einsum("kr,lc,oirc->iokl", taps, taps, conv.double())


class TransposedStreamingTae(PlainStreamingTae):
    """The plain path with each stage's upsampling + 3x3 conv as one stride-2 transposed conv (no upsampled
    copy, its output already at the frames' places), after the time-grow layer as before."""

    def __init__(self, decoder: PlainTaehv):
        super().__init__(decoder)
        self.kernels = [transposed_kernel(stage.conv.weight).to(self.dtype) for stage in decoder.stages]

    @torch.inference_mode()
    def decode_float(self, latents: torch.Tensor) -> torch.Tensor:
        trim = 0 if self._memory else self.decoder.config.trimmed_frames
        decoder, clamp = self.decoder, self.decoder.config.latent_clamp
        x = latents.to(device=self.device, dtype=self.dtype).flatten(0, 1).contiguous(memory_format=torch.channels_last)
        x = decoder.stem(clamp * torch.tanh(x / clamp)).relu_()
        block = 0
        for stage, kernel in zip(decoder.stages, self.kernels, strict=True):
            for memory_block in stage.blocks:
                x = memory_block(x, past_of(self._memory, block, x, 1))
                block += 1
            x = torch.nn.functional.conv_transpose2d(stage.grow(x), kernel, stride=2, padding=1)
        return decoder.head(x.relu_()).clamp(0.0, 1.0)[trim:]


def streaming(
    path: str, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> StreamingTaeDecoder | PlainStreamingTae:
    if path == "plain":
        return PlainStreamingTae(plain_taehv(state).to(device=device, dtype=dtype))
    if path == "plain+transposed":
        return TransposedStreamingTae(plain_taehv(state).to(device=device, dtype=dtype))
    if path == "phase-unfused":  # built without the fused memory blocks, whatever cuDNN offers
        decoder = taehv_from_released(state).to(device=device, dtype=dtype, memory_format=torch.channels_last)
        return StreamingTaeDecoder(decoder)
    return StreamingTaeDecoder(prepared(taehv_from_released(state), device, dtype))


def timing(path: str, state: dict[str, torch.Tensor], geometry: VideoGeometry, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    decoder = streaming(path, state, device, dtype)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ms = decode_ms_per_chunk(decoder, geometry, REPEATS if cuda else 1)
    to_cpu_ms = decode_ms_per_chunk(decoder, geometry, REPEATS if cuda else 1, to_cpu=True)
    return {
        "path": path, "decode_ms_per_chunk": round(ms, 2), "decode_to_cpu_ms_per_chunk": round(to_cpu_ms, 2),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "dtype": str(dtype).removeprefix("torch."), "device": torch.cuda.get_device_name() if cuda else "cpu",
        "resolution": f"{geometry.width}x{geometry.height}", "video_frames_per_chunk": geometry.video_frames_per_chunk,
        "fused_memory_blocks": getattr(decoder.decoder, "fused_cuda", False),
    }  # fmt: skip


def streamed_video(decoder: StreamingTaeDecoder | PlainStreamingTae, latents: torch.Tensor) -> torch.Tensor:
    decoder.reset()
    return torch.cat([decoder.decode_float(chunk).float() for chunk in latents.split(3, dim=1)])


def attempt(measure: Callable[[], dict], path: str) -> dict:
    """The measurement, or one line with the error (the experimental path may fail with another cuDNN)."""
    try:
        return measure()
    except RuntimeError as err:
        return {"path": path, "error": str(err).splitlines()[0][:300]}


def errors(state: dict[str, torch.Tensor], geometry: VideoGeometry, device: torch.device) -> list[dict[str, object]]:
    """Per path, over a streamed video: its float32 frames (TF32 off) against the plain path's (the reference
    order; bar 1e-4 on the CPU) and its bf16 frames against the plain path's float32 frames."""
    shape = (1, 3 * ERROR_CHUNKS, geometry.latent_channels, geometry.latent_height, geometry.latent_width)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    exact = streamed_video(streaming("plain", state, device, torch.float32), latents)
    lines = []
    for path in PATHS:

        def measure(path: str = path) -> dict:
            float32 = streamed_video(streaming(path, state, device, torch.float32), latents)
            bf16 = (streamed_video(streaming(path, state, device, torch.bfloat16), latents) - exact).abs()
            return {"path": path, "float32_vs_plain_max": (float32 - exact).abs().max().item(),
                    "bf16_vs_float32_max": round(bf16.max().item(), 5),
                    "bf16_vs_float32_mean": round(bf16.mean().item(), 6), "frames": exact.shape[0]}  # fmt: skip

        lines.append(attempt(measure, path))
    return lines


def profile(path: str, state: dict[str, torch.Tensor], geometry: VideoGeometry) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    decoder = streaming(path, state, torch.device("cuda"), torch.bfloat16)
    decode_ms_per_chunk(decoder, geometry, repeats=1)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decode_ms_per_chunk(decoder, geometry, repeats=3, to_cpu=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=PATHS, help="print the top CUDA kernels of one path")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a smoke run (float32 timings)")
    parser.add_argument("--size", default="480x832", help="video HxW (default 480x832)")
    args = parser.parse_args()
    device = torch.device(args.device)
    process_settings(device, compile=False)  # cuDNN heuristics (no autotuning), as every run
    state = random_released_state(TAEW2_1, seed=0)
    height, width = (int(side) for side in args.size.split("x"))
    geometry = VideoGeometry(height=height, width=width)  # 3 latent frames per chunk -> 12 video frames
    if args.profile:
        profile(args.profile, state, geometry)
        return
    for path in PATHS:
        print(json.dumps(attempt(lambda path=path: timing(path, state, geometry, device), path)), flush=True)
    for line in errors(state, geometry, device):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
