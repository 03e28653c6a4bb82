"""bf16 on the GPU: how far render's VAE decode and text embeddings are from the float32 expectation.

On the codec fixtures (`MEMFLOW_CODEC_DIR`), each figure is the relative L2 distance to the fixture's float32
expectation (the official code in float32 on the CPU). Each CUDA fast path (compiled decoder steps with
biases folded into the next step, or torch's RMS norm + SiLU without a compiler; channels-last convs and
CUDA graphs for both) is compared with the official-style bf16 path (the plain decoder, every norm in bf16
as the official code) on the same GPU, and may be at most FAST_PATH_MARGIN times as far. The text encoder
has no separate fast path: render runs it in bf16 with eager attention, the official arithmetic; SDPA's
figure is printed beside it for scale. Run with `-s` to see the figures.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file

from memflow_cli.decode import StreamingDecoder
from memflow_cli.demo import build_demo_tokenizer
from memflow_cli.settings import VideoGeometry
from memflow_cli.speed.decoder import DecoderKernelSet, channels_last_convs
from memflow_cli.text_encoder import TextEncoder
from memflow_cli.vae_stream import PLAIN_KERNELS, DecoderKernels
from memflow_cli.weights import load_vae, load_wan_t5

from . import codec
from .codec import FAST_PATH_MARGIN

MANIFEST = codec.manifest()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not MANIFEST, reason=f"no codec fixtures at {codec.CODEC_DIR}"),
]


# the CUDA fast paths: Inductor's fused steps (--compile) and torch's RMS norm + SiLU (no compiler), each with
# its causal convs as 3-D convs or as 2-D convs over stacked frames
FAST_KERNELS = {
    kernel_set.value: kernel_set.kernels for kernel_set in DecoderKernelSet if kernel_set is not DecoderKernelSet.PLAIN
}


def _decode_bf16(case: str, kernels: DecoderKernels | None) -> torch.Tensor:
    """Decode a case's latents in bf16 on the GPU chunk by chunk as render does: [N, 3, H, W] float32 on the CPU.

    `kernels`: a fast path's (channels-last convs, CUDA graphs); None: the official-style plain decoder.
    """
    vae_fixture = MANIFEST["vae"]
    d = codec.CODEC_DIR
    config = codec.diffusers_config(d / vae_fixture["config"])
    vae = load_vae(d / vae_fixture["weights"], "cuda", torch.bfloat16, config=config)
    if kernels is not None:
        channels_last_convs(vae)  # what the engine does on CUDA
    decoder = StreamingDecoder(vae, kernels=kernels or PLAIN_KERNELS, graphs=kernels is not None)
    latents = load_file(d / vae_fixture["cases"][case]["file"])["latents"].to("cuda", torch.bfloat16)
    chunks = latents.split(VideoGeometry().frames_per_chunk, dim=1)
    return torch.cat([decoder.decode_float(chunk).cpu() for chunk in chunks])


@pytest.mark.parametrize("fast_path", sorted(FAST_KERNELS))
@pytest.mark.parametrize("case", sorted(MANIFEST.get("vae", {}).get("cases", {})))
def test_fast_bf16_decode_is_as_close_to_float32_as_the_official_style_decode(case: str, fast_path: str) -> None:
    expected = load_file(codec.CODEC_DIR / MANIFEST["vae"]["cases"][case]["file"])["pixels_float32"][0]
    official_style = codec.relative_l2(_decode_bf16(case, None), expected)
    fast = codec.relative_l2(_decode_bf16(case, FAST_KERNELS[fast_path]()), expected)
    print(
        f"\nVAE {case} on {torch.cuda.get_device_name()}: bf16 relative L2 to the float32 expectation: "
        f"official-style {official_style:.3e}, {fast_path} {fast:.3e} ({fast / official_style:.3f}x)"
    )
    assert official_style < 5e-2  # bf16 rounding, not a wrong algorithm (that lands near 1)
    assert fast <= FAST_PATH_MARGIN * official_style


@pytest.mark.parametrize("case", sorted(MANIFEST.get("text_encoder", {}).get("cases", {})))
def test_bf16_text_embeddings_on_the_gpu(case: str) -> None:
    text_fixture = MANIFEST["text_encoder"]
    tensors = load_file(codec.CODEC_DIR / text_fixture["cases"][case]["file"])
    ids, mask = tensors["input_ids"], tensors["attention_mask"]
    expected = tensors["prompt_embeds_float32"]

    def worst_error(attention: str | None) -> float:
        """Render's text encoder in bf16 on the GPU (eager attention), or with `attention` set after it."""
        encoder = load_wan_t5(codec.CODEC_DIR / text_fixture["weights"], "cuda", torch.bfloat16)
        text_encoder = TextEncoder(build_demo_tokenizer(), encoder, max_length=text_fixture["text_len"])
        if attention is not None:
            text_encoder.encoder.set_attn_implementation(attention)
        errors = []
        for i, length in enumerate(mask.sum(dim=1).tolist()):
            embeds = text_encoder.encode_tokens(ids[i : i + 1], mask[i : i + 1])[0].float().cpu()
            assert (embeds[length:] == 0).all()
            errors.append(codec.relative_l2(embeds[:length], expected[i, :length]))
        return max(errors)

    render_path = worst_error(None)
    # transformers 5 would run UMT5 through SDPA by default: its figure, for scale (transformers 4 has no SDPA here)
    sdpa = f"{worst_error('sdpa'):.3e}" if int(transformers.__version__.split(".")[0]) >= 5 else "n/a"
    print(
        f"\ntext {case} on {torch.cuda.get_device_name()}: bf16 worst relative L2 per prompt to the float32 "
        f"expectation: render (eager attention, the official arithmetic) {render_path:.3e}, SDPA {sdpa}"
    )
    assert render_path < 3e-2  # bf16 rounding (about 1e-2 on the CPU), not a wrong algorithm
