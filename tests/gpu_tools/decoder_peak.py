"""The Wan VAE decoder's peak activation memory for one steady decoder call (one latent frame -> four frames),
with its full-size stages in pieces of `late_frames` frames (`DecoderKernels.late_frames`). Not part of the suite.

Full-size Wan2.1 decoder, random weights. On CUDA: `torch.cuda.max_memory_allocated` over the call, above what
was allocated before it (bf16, the eager CUDA kernels with the given late_frames). On the CPU: torch's profiler's
memory records, the running sum of what each top-level op leaves allocated, whose maximum is the call's peak at
op granularity (float32, the plain kernels). The decoder runs beside generation, so this peak adds to the
generator's in a render.

    python tests/gpu_tools/decoder_peak.py                    # CUDA if there is one: 60x104 latents (832x480)
    python tests/gpu_tools/decoder_peak.py --device cpu --latent 30x52
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

from memflow_cli.decode import StreamingDecoder
from memflow_cli.speed.decoder import EAGER_CUDA_KERNELS, channels_last_convs
from memflow_cli.vae_stream import PLAIN_KERNELS
from memflow_cli.wan_vae import WanVAE, WanVAEConfig
from memflow_cli.weights import WAN21_VAE_CONFIG


def peak_bytes(decoder: StreamingDecoder, z: torch.Tensor) -> int:
    """The most memory the decoder call on z held at once beyond what was allocated before it."""
    if z.is_cuda:
        torch.cuda.synchronize(z.device)
        torch.cuda.reset_peak_memory_stats(z.device)
        before = torch.cuda.memory_allocated(z.device)
        decoder.decode_z(z)
        torch.cuda.synchronize(z.device)
        return torch.cuda.max_memory_allocated(z.device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        decoder.decode_z(z)
    ops = sorted((e for e in prof.events() if e.cpu_parent is None), key=lambda e: e.time_range.start)
    live = peak = 0
    for op in ops:
        live += op.cpu_memory_usage  # what the op allocated minus what it freed
        peak = max(peak, live)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--latent", default="60x104", help="latent height x width (832x480 video: 60x104)")
    parser.add_argument("--late-frames", default="none,2,1", help="comma-separated; none: the whole call at once")
    args = parser.parse_args()
    device = torch.device(args.device)
    h, w = (int(side) for side in args.latent.split("x"))
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig.from_diffusers(WAN21_VAE_CONFIG)).eval().requires_grad_(False).to(device, dtype)
    channels_last_convs(vae)
    latents = torch.randn(1, 2, vae.config.z_dim, h, w, device=device, dtype=dtype)
    for choice in args.late_frames.split(","):
        late = None if choice == "none" else int(choice)
        kernels = replace(EAGER_CUDA_KERNELS if cuda else PLAIN_KERNELS, late_frames=late)
        decoder = StreamingDecoder(vae, kernels=kernels)
        decoder.decode_float(latents[:, :1])  # a video's first call: one latent frame alone
        z = decoder.denormalise(latents[:, 1:])
        decoder.decode_z(z)  # the histories and filters made
        decoder.reset()
        decoder.decode_float(latents[:, :1])
        peak = peak_bytes(decoder, z)
        print(json.dumps({"device": str(device), "dtype": str(dtype).removeprefix("torch."), "latent": [h, w],
                          "late_frames": late, "peak_mib": round(peak / 2**20)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
