"""The VAE decode and the text encoder against the official Wan code, on the fixtures in MEMFLOW_CODEC_DIR.

The weights are the fixture's files in the official formats (`Wan2.1_VAE.pth`, the umT5 `.pth`), loaded by
the project's own loaders. The VAE decodes the generator's latents chunk by chunk through the streaming
decoder that `render` uses, into the uint8 frames that `render` writes; the text encoder embeds the stored
token ids as `render` does. Every case is compared in float32 and in bfloat16 against the bar of the
fixture's README; the bfloat16 expectations are bit-level products of the CPU's kernels, so those cases
run only where the CPU matches the fixture's `bfloat16_environment` (elsewhere they are skipped, with the
reason, never loosened).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from safetensors.torch import load_file

from memflow_cli.decode import StreamingDecoder, frames_from_decoded
from memflow_cli.demo import build_demo_tokenizer
from memflow_cli.settings import VideoGeometry
from memflow_cli.speed import EAGER
from memflow_cli.text_encoder import TextEncoder
from memflow_cli.vae_stream import DecoderKernels
from memflow_cli.weights import load_vae, load_wan_t5

from . import codec

MANIFEST = codec.manifest()
VAE_CASES = sorted(MANIFEST.get("vae", {}).get("cases", {}))
TEXT_CASES = sorted(MANIFEST.get("text_encoder", {}).get("cases", {}))
BF16_MISMATCH = codec.bfloat16_mismatch(MANIFEST["bfloat16_environment"]) if MANIFEST else None

pytestmark = pytest.mark.skipif(
    not MANIFEST and not codec.REQUIRED, reason=f"no codec fixtures at {codec.CODEC_DIR}"
)


def dtype_param(name: str):
    """A dtype parameter; bfloat16 is skipped, with the reason, on a CPU whose bf16 kernels differ."""
    marks = [pytest.mark.skip(reason=BF16_MISMATCH)] if name == "bfloat16" and BF16_MISMATCH else []
    return pytest.param(name, id=name, marks=marks)


DTYPE_PARAMS = [dtype_param(name) for name in codec.DTYPES]


def test_fixtures_present():
    """In CI, or when MEMFLOW_CODEC_DIR names a folder, missing fixtures are a failure, not a skip."""
    assert VAE_CASES and TEXT_CASES, f"no codec cases found in {codec.CODEC_DIR}/manifest.json"


@pytest.fixture(scope="module", autouse=True)
def render_threads() -> Iterator[None]:
    """At most two threads, as on the CI machine: busy cores make many threads spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


def _decode_case(case: str, dtype: str, kernels: DecoderKernels) -> tuple[torch.Tensor, torch.Tensor]:
    """A VAE case's latents decoded chunk by chunk as `render` does: pixels [N, 3, H, W] and uint8 frames."""
    vae_fixture = MANIFEST["vae"]
    d = codec.CODEC_DIR
    config = codec.diffusers_config(d / vae_fixture["config"])
    vae = load_vae(d / vae_fixture["weights"], dtype=codec.DTYPES[dtype], config=config)
    latents = load_file(d / vae_fixture["cases"][case]["file"])["latents"].to(codec.DTYPES[dtype])  # [1, T, 16, h, w]

    decoder = StreamingDecoder(vae, kernels=kernels)
    pixels, frames = [], []
    for chunk in latents.split(VideoGeometry().frames_per_chunk, dim=1):  # as the generator hands them over
        decoded = decoder.decode_float(chunk)  # [N, 3, H, W]; `decode` = this, then `frames_from_decoded`
        pixels.append(decoded)
        frames.append(frames_from_decoded(decoded))
    return torch.cat(pixels), torch.cat(frames)


def _expected(case: str, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = load_file(codec.CODEC_DIR / MANIFEST["vae"]["cases"][case]["file"])
    return tensors[f"pixels_{dtype}"][0], tensors[f"frames_{dtype}"]  # [N, 3, H, W], [N, H, W, 3] uint8


def _assert_within_bar(case: str, dtype: str, ours_pixels: torch.Tensor, ours_frames: torch.Tensor) -> None:
    expected_pixels, expected_frames = _expected(case, dtype)
    assert ours_pixels.shape == expected_pixels.shape and ours_frames.shape == expected_frames.shape
    assert ours_frames.dtype == torch.uint8
    error = codec.relative_l2(ours_pixels, expected_pixels)
    equal = (ours_frames == expected_frames).double().mean().item()
    limits = codec.bar(MANIFEST, dtype)
    print(f"vae {case} {dtype}: relative L2 {error:.3e}, uint8 equal {equal:.4%}")
    assert error <= limits["rel_l2_max"], f"relative L2 {error:.3e} > {limits['rel_l2_max']}"
    assert equal >= limits["uint8_equal_min"], f"{equal:.4%} of uint8 values equal < {limits['uint8_equal_min']:.1%}"


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", VAE_CASES)
def test_vae_decode_matches_official_frames(case: str, dtype: str) -> None:
    _assert_within_bar(case, dtype, *_decode_case(case, dtype, EAGER.decoder_kernels))  # what `render` runs on the CPU


@pytest.mark.parametrize("case", VAE_CASES)
def test_vae_decode_with_2d_convs_matches_official_frames_in_float32(case: str) -> None:
    """The CUDA options `convs_2d` (causal convs over stacked frames) and `upsample_subpixel`, run on the CPU: the
    official float32 frames within the bar, and the plain decoder's within float32 rounding."""
    kernels = DecoderKernels(convs_2d=True, upsample_subpixel=True, channel_tile=20)  # 16 channels computed as 20
    pixels, frames = _decode_case(case, "float32", kernels)
    _assert_within_bar(case, "float32", pixels, frames)
    plain, _ = _decode_case(case, "float32", EAGER.decoder_kernels)
    assert codec.relative_l2(pixels, plain) < 2e-6
    torch.testing.assert_close(pixels, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", TEXT_CASES)
def test_text_encoder_matches_official_embeddings(case: str, dtype: str) -> None:
    text_fixture = MANIFEST["text_encoder"]
    d = codec.CODEC_DIR
    encoder = load_wan_t5(d / text_fixture["weights"], dtype=codec.DTYPES[dtype])
    # render's text encoder object; the ids are given, so the tokenizer only has to pad with 0
    text_encoder = TextEncoder(build_demo_tokenizer(), encoder, max_length=text_fixture["text_len"])
    tensors = load_file(d / text_fixture["cases"][case]["file"])
    ids, mask = tensors["input_ids"], tensors["attention_mask"]
    expected = tensors[f"prompt_embeds_{dtype}"]
    limits = codec.bar(MANIFEST, dtype)

    errors = []
    for i, length in enumerate(mask.sum(dim=1).tolist()):  # each prompt alone, as the fixture encoded it
        embeds = text_encoder.encode_tokens(ids[i : i + 1], mask[i : i + 1])[0]
        assert embeds.dtype == codec.DTYPES[dtype]
        assert (embeds[length:] == 0).all(), f"prompt {i}: rows past its length {length} are not exactly 0"
        errors.append(codec.relative_l2(embeds[:length], expected[i, :length]))
    print(f"text {case} {dtype}: relative L2 per prompt {[f'{e:.2e}' for e in errors]}")
    assert max(errors) <= limits["rel_l2_max"], f"relative L2 per prompt {errors} > {limits['rel_l2_max']}"


def test_bfloat16_environment_check_names_the_difference(monkeypatch) -> None:
    """The skip reason says what differs; a matching description gives none."""
    environment = dict(MANIFEST["bfloat16_environment"]) if MANIFEST else {}
    if not environment:
        pytest.skip("no manifest")
    monkeypatch.setattr(codec, "cpu_flags", lambda: set(environment["cpu_flags"]))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: environment["cpu_capability"])
    monkeypatch.setattr(torch, "__version__", environment["torch"])
    monkeypatch.setattr(codec.platform, "machine", lambda: environment["machine"])
    assert codec.bfloat16_mismatch(environment) is None
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert "AVX2" in codec.bfloat16_mismatch(environment)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: environment["cpu_capability"])
    monkeypatch.setattr(codec, "cpu_flags", lambda: set(environment["cpu_flags"]) | {"amx_bf16", "amx_tile"})
    assert "amx_bf16" in codec.bfloat16_mismatch(environment)
    monkeypatch.setattr(codec, "cpu_flags", lambda: set(environment["cpu_flags"]) - {"avx512_bf16"})
    assert "avx512_bf16" in codec.bfloat16_mismatch(environment)
    monkeypatch.setattr(torch, "__version__", "2.12.1+cpu")
    assert "2.12.1" in codec.bfloat16_mismatch(environment)
