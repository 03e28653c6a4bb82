"""Parity of our TAEHV decoder with the reference (madebyollin/taehv), on the fixtures of MEMFLOW_TAE_PARITY_DIR.

Every case of the folder's manifest.json is checked, in float32 on the CPU, against the bars of its README:
the whole decode (and the pre-clamp frames where a case has them) and the streamed decode (chunks of 3 latent
frames, memory carried) within 1e-4 of the reference's video, with its per-chunk frame counts; a full-size
case within one float16 step of its stored frames and 1e-5 of every frame's channel means. Full-size cases
are decoded streamed, and whole in one call where they are one chunk (a longer whole decode at 480x832 needs
more memory than a shared test machine has; the small cases cover whole decodes of several chunks).

A video of one chunk is decoded whole by the stream's first call: the decoder on the whole video with a fresh
memory, the first frames trimmed once, which is `decode_video`. Such a case is decoded once, by the stream, and
both tests check those frames (a full-size decode takes about 20 CPU-s); `decode_video` itself is checked on the
cases of several chunks.

Without the fixtures the tests skip, unless MEMFLOW_TAE_PARITY_DIR is set or CI=true: then they fail.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memflow_cli.tae import StreamingTaeDecoder, TaehvDecoder, decode_video, load_taehv
from memflow_cli.tae.model import TaeMemory

ROOT = Path(__file__).resolve().parent.parent
TAE_DIR = Path(os.environ.get("MEMFLOW_TAE_PARITY_DIR", ROOT.parent / "shared" / "parity" / "tae"))
REQUIRED = "MEMFLOW_TAE_PARITY_DIR" in os.environ or os.environ.get("CI", "").lower() in ("1", "true")

FLOAT32_BAR = 1e-4  # README: about 30x the reference's distance to itself
FLOAT16_STEP_BAR = 5e-4  # full-size frames are stored in float16
CHANNEL_MEAN_BAR = 1e-5
CHUNK_LATENTS = 3  # the generator's chunk
FULL_SIZE_PIXELS = 200_000  # a case at or above this many pixels per frame is a "full-size" one (slow on a CPU)


def _manifest() -> dict:
    path = TAE_DIR / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {"cases": {}}


def _case_params() -> list:
    cases = _manifest()["cases"]
    if not cases:
        return [pytest.param(None, id="no-fixtures")]
    params = []
    for name, case in sorted(cases.items()):
        height, width = case["video_hw"]
        slow = [pytest.mark.slow] if height * width >= FULL_SIZE_PIXELS else []
        params.append(pytest.param(name, id=name, marks=slow))
    return params


CASES = _case_params()


def _require(name: str | None) -> dict:
    if name is None:
        message = f"no TAEHV parity fixtures in {TAE_DIR} (set MEMFLOW_TAE_PARITY_DIR)"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    return _manifest()["cases"][name]


@functools.lru_cache(maxsize=2)
def _decoder(weights: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> TaehvDecoder:
    return load_taehv(TAE_DIR / weights, torch.device(device), dtype)


@functools.lru_cache(maxsize=1)
def _tensors(file: str) -> dict[str, torch.Tensor]:
    return load_file(TAE_DIR / file)


def _streamed(decoder: TaehvDecoder, latents: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Chunks of 3 latent frames through the streaming decoder: float frames [1, F, 3, H, W] and frames per chunk."""
    stream = StreamingTaeDecoder(decoder)
    stream.reset()
    chunks = [stream.decode_float(piece) for piece in latents.split(CHUNK_LATENTS, dim=1)]
    return torch.cat(chunks)[None].float(), [chunk.shape[0] for chunk in chunks]


@functools.lru_cache(maxsize=2)
def _streamed_case(name: str) -> tuple[torch.Tensor, list[int]]:
    """A case's streamed decode on the CPU in float32, made once for the tests that check it."""
    case = _manifest()["cases"][name]
    return _streamed(_decoder(case["weights"]), _tensors(case["file"])["latents"])


def _check_video(case: dict, tensors: dict[str, torch.Tensor], video: torch.Tensor, what: str) -> None:
    assert video.shape[1] == case["video_frames"] == 4 * case["latent_frames"] - 3, what
    if "video" in tensors:
        error = (video - tensors["video"]).abs().max().item()
        assert error <= FLOAT32_BAR, f"{what}: max |ours - video| = {error:.3g}"
        return
    index = tensors["frame_index"]
    error = (video[:, index] - tensors["video_frames_f16"].float()).abs().max().item()
    assert error <= FLOAT16_STEP_BAR, f"{what}: max |ours - stored float16 frames| = {error:.3g}"
    means = video[0].double().mean(dim=(2, 3))  # [F, 3]
    error = (means - tensors["video_frame_channel_mean"]).abs().max().item()
    assert error <= CHANNEL_MEAN_BAR, f"{what}: max |frame channel mean - reference| = {error:.3g}"


@pytest.mark.parametrize("name", CASES)
def test_whole_decode_matches_reference(name):
    case = _require(name)
    tensors = _tensors(case["file"])
    latents = tensors["latents"]
    if case["video_hw"][0] * case["video_hw"][1] >= FULL_SIZE_PIXELS and case["latent_frames"] > CHUNK_LATENTS:
        pytest.skip("a whole full-size decode of several chunks does not fit a shared CPU machine; streamed below")
    decoder = _decoder(case["weights"])
    if case["latent_frames"] <= CHUNK_LATENTS:  # one chunk: the stream's one call decodes the whole video
        video, chunk_frames = _streamed_case(name)
        assert chunk_frames == [case["video_frames"]]
    else:
        with torch.inference_mode():
            video = decode_video(decoder, latents)
    _check_video(case, tensors, video, "whole decode")
    if "decoder_raw" in tensors:  # decoded once more only where the case stores it (a full-size decode is slow)
        with torch.inference_mode():
            raw = decoder(latents, TaeMemory())
        assert raw.shape[1] == 4 * case["latent_frames"]
        error = (raw - tensors["decoder_raw"]).abs().max().item()
        assert error <= FLOAT32_BAR, f"pre-clamp frames: max |ours - decoder_raw| = {error:.3g}"


@pytest.mark.parametrize("name", CASES)
def test_streamed_decode_matches_reference(name):
    case = _require(name)
    tensors = _tensors(case["file"])
    video, chunk_frames = _streamed_case(name)
    assert chunk_frames == tensors["chunk_frames"].tolist()
    _check_video(case, tensors, video, "streamed decode")
    if "video_streaming" in tensors:
        error = (video - tensors["video_streaming"]).abs().max().item()
        assert error <= FLOAT32_BAR, f"max |ours - the reference's streamed video| = {error:.3g}"


@pytest.mark.parametrize("name", CASES)
def test_memory_across_chunks_matters(name):
    """Decoding each chunk as a new video misses the reference by far more than the bar: the test can fail."""
    case = _require(name)
    if case["latent_frames"] <= CHUNK_LATENTS or "video" not in (tensors := _tensors(case["file"])):
        pytest.skip("one chunk, or no whole video stored")
    decoder, latents = _decoder(case["weights"]), tensors["latents"]
    with torch.inference_mode():
        second = decode_video(decoder, latents[:, CHUNK_LATENTS : 2 * CHUNK_LATENTS])  # forgets chunk 1
    reference = tensors["video"][:, 4 * CHUNK_LATENTS : 4 * CHUNK_LATENTS + second.shape[1]]
    assert (second - reference).abs().max().item() > 100 * FLOAT32_BAR


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("name", CASES)
def test_bf16_on_gpu_within_guidance(name):
    """bf16 on the GPU, as the engine runs it: the README's guidance (mean <= 0.005, max <= 0.05), error printed."""
    case = _require(name)
    tensors = _tensors(case["file"])
    video, _ = _streamed(_decoder(case["weights"], "cuda", torch.bfloat16), tensors["latents"])
    video = video.cpu()
    if "video" in tensors:
        reference, ours = tensors["video"], video
    else:
        reference, ours = tensors["video_frames_f16"].float(), video[:, tensors["frame_index"]]
    difference = (ours - reference).abs()
    print(f"\n{name}: bf16 streamed vs reference float32: max {difference.max():.4f}, mean {difference.mean():.5f}")
    assert difference.mean().item() <= 0.005 and difference.max().item() <= 0.05


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("name", CASES)
def test_float32_on_gpu_meets_the_bars(name):
    """The phase convolutions and the memory blocks' one buffer in cuDNN's float32 (TF32 off): the CPU's bars."""
    case = _require(name)
    tensors = _tensors(case["file"])
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        video, chunk_frames = _streamed(_decoder(case["weights"], "cuda", torch.float32), tensors["latents"])
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert chunk_frames == tensors["chunk_frames"].tolist()
    _check_video(case, tensors, video.cpu(), "streamed decode on the GPU in float32")
