"""Streaming VAE decode (memflow's decoder modules) against diffusers' whole-video decode, on a tiny random Wan VAE."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders import autoencoder_kl_wan

from memflow_cli.decode import StreamingDecoder, frames_from_decoded
from memflow_cli.vae_stream import (
    DecoderKernels,
    DecoderStream,
    UpsampledConv,
    padded_channels,
    rms_norm_silu_into,
)
from memflow_cli.wan_vae import CausalConv3d, RMSNorm, WanVAE, WanVAEConfig
from memflow_cli.weights import WAN21_VAE_CONFIG

LATENT_FRAMES = 9
CHUNK = 3
LATENT_HW = (4, 6)


def decoded_frame_count(latent_frames: int) -> int:
    """RGB frames that a whole video of `latent_frames` latent frames decodes to: 1, then 4 per later frame."""
    return 0 if latent_frames <= 0 else 1 + 4 * (latent_frames - 1)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny convolutions run fastest on one thread; several threads on a busy CPU spin for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


NARROW = {"base_dim": 8, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1}


def ours_of(reference: AutoencoderKLWan) -> WanVAE:
    """memflow's decoder with the decode-side weights of diffusers' VAE (its own parameter names)."""
    config = WanVAEConfig.from_diffusers(dict(reference.config))
    vae = WanVAE(config).to(reference.dtype).eval()
    decode_side = {k: v for k, v in reference.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    vae.load_state_dict(decode_side, strict=True)
    return vae


@pytest.fixture(scope="module")
def reference() -> AutoencoderKLWan:
    """diffusers' Wan VAE, narrow: the whole-video decode the stream is checked against."""
    torch.manual_seed(0)
    return AutoencoderKLWan(**copy.deepcopy({**WAN21_VAE_CONFIG, **NARROW})).eval()


@pytest.fixture(scope="module")
def vae(reference: AutoencoderKLWan) -> WanVAE:
    return ours_of(reference)


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(1, LATENT_FRAMES, 16, *LATENT_HW, generator=generator)  # [1, F, C, h, w]


def _decode_in_chunks(decoder: StreamingDecoder, latents: torch.Tensor) -> torch.Tensor:
    chunks = [decoder.decode_float(chunk) for chunk in latents.split(CHUNK, dim=1)]
    return torch.cat(chunks)  # [N, 3, H, W]


def _relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return ((ours - expected).norm() / expected.norm()).item()


def test_chunked_decode_matches_whole_video_decode(vae: WanVAE, reference, latents: torch.Tensor) -> None:
    decoder = StreamingDecoder(vae)
    ours = _decode_in_chunks(decoder, latents)

    with torch.no_grad():
        expected = reference.decode(decoder.denormalise(latents)).sample[0].permute(1, 0, 2, 3)

    assert ours.shape == expected.shape == (decoded_frame_count(LATENT_FRAMES), 3, 32, 48)
    assert _relative_error(ours, expected) < 1e-4
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def official_rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """The official Wan VAE's RMS norm: normalised in x's own dtype (diffusers >= 0.38 upcasts bf16 to float32)."""
    return torch.nn.functional.normalize(x, dim=1) * norm.scale * norm.gamma + norm.bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wan21_layout_decodes_diffusers_frames_bit_for_bit(dtype: torch.dtype, monkeypatch) -> None:
    """The real decoder's layout (4 up blocks of 3 residual blocks, two time upsamplers), small widths.

    The reference is diffusers' decode with the official norm in place of its `WanRMS_norm`.
    """
    monkeypatch.setattr(autoencoder_kl_wan.WanRMS_norm, "forward", official_rms_norm)
    torch.manual_seed(0)
    reference = AutoencoderKLWan(**copy.deepcopy({**WAN21_VAE_CONFIG, "base_dim": 8})).eval().to(dtype)
    latents = torch.randn(1, 7, 16, *LATENT_HW, generator=torch.Generator().manual_seed(1)).to(dtype)
    decoder = StreamingDecoder(ours_of(reference))
    ours = _decode_in_chunks(decoder, latents)
    with torch.no_grad():
        expected = reference.decode(decoder.denormalise(latents)).sample[0].permute(1, 0, 2, 3).float().clamp(-1, 1)
    assert ours.shape == (decoded_frame_count(7), 3, 32, 48)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("frames_per_call", [2, None])
def test_decoder_calls_of_any_size_give_the_same_frames(
    vae: WanVAE, latents: torch.Tensor, frames_per_call: int | None
) -> None:
    one_by_one = _decode_in_chunks(StreamingDecoder(vae, frames_per_call=1), latents)
    ours = _decode_in_chunks(StreamingDecoder(vae, frames_per_call=frames_per_call), latents)
    torch.testing.assert_close(ours, one_by_one, rtol=1e-5, atol=1e-5)


def test_frames_per_call_must_be_positive(vae: WanVAE) -> None:
    with pytest.raises(ValueError, match="frames_per_call must be at least 1"):
        StreamingDecoder(vae, frames_per_call=0)


def test_frame_counts_per_chunk(vae: WanVAE, latents: torch.Tensor) -> None:
    decoder = StreamingDecoder(vae)
    counts = [decoder.decode(chunk).shape[0] for chunk in latents.split(CHUNK, dim=1)]
    assert counts == [1 + 4 * (CHUNK - 1), 4 * CHUNK, 4 * CHUNK]
    assert sum(counts) == 1 + 4 * (LATENT_FRAMES - 1)


def test_uint8_frames_layout(vae: WanVAE, latents: torch.Tensor) -> None:
    decoder = StreamingDecoder(vae)
    frames = decoder.decode(latents[:, :2])
    assert frames.dtype == torch.uint8
    assert frames.device.type == "cpu"
    assert frames.shape == (5, 32, 48, 3)


def test_reset_starts_a_new_video(vae: WanVAE, latents: torch.Tensor) -> None:
    decoder = StreamingDecoder(vae)
    first = _decode_in_chunks(decoder, latents)
    decoder.reset()
    second = _decode_in_chunks(decoder, latents)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_cache_survives_another_video_decoded_by_the_same_vae(vae: WanVAE, latents: torch.Tensor) -> None:
    decoder = StreamingDecoder(vae)
    reference = _decode_in_chunks(decoder, latents)
    decoder.reset()
    head = decoder.decode_float(latents[:, :CHUNK])
    StreamingDecoder(vae).decode_float(torch.randn(1, 2, 16, *LATENT_HW))  # its own histories, not ours
    tail = decoder.decode_float(latents[:, CHUNK:])
    torch.testing.assert_close(torch.cat([head, tail]), reference, rtol=0, atol=0)


def test_reset_starts_a_new_video_chunk_by_chunk(vae: WanVAE, latents: torch.Tensor) -> None:
    decoder = StreamingDecoder(vae)
    decoder.decode(latents[:, :1])  # a stale video in progress: reset() starts afresh
    decoder.reset()
    streamed = torch.cat([decoder.decode(chunk) for chunk in latents.split(CHUNK, dim=1)])
    expected = frames_from_decoded(_decode_in_chunks(StreamingDecoder(vae), latents))
    assert torch.equal(streamed, expected)


def test_frames_from_decoded_truncates() -> None:
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    frames = frames_from_decoded(x)  # [1, 1, 6, 3]
    # 0.5*0 + 0.5 = 0.5 -> 127.5 -> 127 (truncated, not rounded); 0.999 -> 254.87 -> 254
    assert frames[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]
    assert frames.dtype == torch.uint8


def test_rejects_channel_major_latents(vae: WanVAE, latents: torch.Tensor) -> None:
    decoder = StreamingDecoder(vae)
    with pytest.raises(ValueError, match="frame-major"):
        decoder.decode(latents.permute(0, 2, 1, 3, 4))


def test_norm_silu_writes_the_official_norm_then_silu_in_bfloat16(vae: WanVAE) -> None:
    norm = copy.deepcopy(vae.decoder.up_blocks[0].resnets[0].norm1).to(torch.bfloat16)
    norm.gamma.data.uniform_(0.5, 1.5)
    x = torch.randn(1, norm.gamma.shape[0], 2, 4, 6, dtype=torch.bfloat16)
    window = torch.zeros(1, norm.gamma.shape[0], 4, 4, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = torch.nn.functional.silu(official_rms_norm(norm, x))
        upcast = torch.nn.functional.normalize(x.float(), dim=1).to(x.dtype) * norm.scale * norm.gamma
        assert not torch.equal(torch.nn.functional.silu(upcast), expected)  # the rounding this test tells apart
        rms_norm_silu_into(window[:, :, 2:], x, None, norm.gamma, norm.bias, norm.scale)
    assert torch.equal(window[:, :, 2:], expected)
    assert not window[:, :, :2].any()  # the history part of the window is left alone


def test_norm_silu_adds_the_bias_its_conv_left_out_first(vae: WanVAE) -> None:
    norm = copy.deepcopy(vae.decoder.up_blocks[0].resnets[0].norm1).to(torch.bfloat16)
    channels = norm.gamma.shape[0]
    x = torch.randn(1, channels, 2, 4, 6, dtype=torch.bfloat16)
    conv_bias = torch.randn(channels, dtype=torch.bfloat16)
    out = torch.empty_like(x)
    with torch.no_grad():
        expected = torch.nn.functional.silu(official_rms_norm(norm, x + conv_bias[:, None, None, None]))
        rms_norm_silu_into(out, x, conv_bias, norm.gamma, norm.bias, norm.scale)
    assert torch.equal(out, expected)


def test_conv_bias_folded_into_the_next_step_decodes_the_same_frames(vae: WanVAE, latents) -> None:
    """The fast path's layout of the arithmetic (bias after the conv), run with the plain kernels in float64."""
    vae64 = copy.deepcopy(vae).double()
    plain = _decode_in_chunks(StreamingDecoder(vae64), latents.double())
    folded = _decode_in_chunks(StreamingDecoder(vae64, kernels=DecoderKernels(bias_after_conv=True)), latents.double())
    assert folded.shape == plain.shape
    torch.testing.assert_close(folded, plain, rtol=1e-12, atol=1e-12)
    # a bias left out anywhere would show far above the tolerance: one conv's, for instance
    without_one = _decode_in_chunks(StreamingDecoder(_without_conv2_bias(vae64)), latents.double())
    assert _relative_error(without_one, plain) > 1e-6


@pytest.mark.parametrize("bias_after_conv", [False, True], ids=["bias-in-conv", "bias-after-conv"])
def test_convs_computed_with_tiled_filters_decode_the_same_frames(
    vae: WanVAE, latents: torch.Tensor, bias_after_conv: bool
) -> None:
    """Zero filters up to the tile (the last stage's 8 channels computed as 10 here) leave the real ones alone."""
    vae64 = copy.deepcopy(vae).double()
    plain = _decode_in_chunks(StreamingDecoder(vae64), latents.double())
    decoder = StreamingDecoder(vae64, kernels=DecoderKernels(bias_after_conv=bias_after_conv, channel_tile=10))
    tiled = _decode_in_chunks(decoder, latents.double())
    caches = decoder._stream.caches.values()
    filters = [cache.filters()[0] for cache in caches if cache.channels != cache.out_channels]
    assert filters and {weight.shape[0] for weight in filters} == {10}
    torch.testing.assert_close(tiled, plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("late_frames", [1, 3])
def test_the_late_stages_in_pieces_of_frames_decode_the_plain_frames(vae, latents, late_frames: int) -> None:
    """The up blocks after the last time upsampling run `late_frames` frames at a time (whole chunks per call: 12
    frames, so 3 leaves a piece of 3 and one of 1 at the first call's end too): the same sums, in float64."""
    vae64 = copy.deepcopy(vae).double()
    plain = _decode_in_chunks(StreamingDecoder(vae64, frames_per_call=None), latents.double())
    decoder = StreamingDecoder(vae64, frames_per_call=None, kernels=DecoderKernels(late_frames=late_frames))
    assert decoder._stream.late_blocks == 2  # the two time upsamplers are up blocks 0 and 1
    pieces = _decode_in_chunks(decoder, latents.double())
    assert pieces.shape == plain.shape
    torch.testing.assert_close(pieces, plain, rtol=1e-12, atol=1e-12)


def test_the_late_stages_in_pieces_with_the_cuda_paths_options_decode_a_batch_as_without(vae, latents) -> None:
    """`late_frames` beside the options the CUDA sets pair it with (2-D convs, convs on the small image, biases after
    the convs, tiled filters), on a batch of two videos whose pieces are not contiguous: the same frames."""
    vae64 = copy.deepcopy(vae).double()
    batch = torch.cat([latents, latents.flip(1)]).double()
    options = DecoderKernels(bias_after_conv=True, channel_tile=10, convs_2d=True, upsample_subpixel=True)
    whole = StreamingDecoder(vae64, frames_per_call=None, kernels=options)
    pieces = StreamingDecoder(vae64, frames_per_call=None, kernels=replace(options, late_frames=2))
    for chunk in batch.split(CHUNK, dim=1):
        z = chunk.permute(0, 2, 1, 3, 4)  # [B, C, F, h, w]: VAE latents (their scale does not matter here)
        assert z.shape[0] == 2
        torch.testing.assert_close(pieces.decode_z(z), whole.decode_z(z), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("frames_per_call", [1, None], ids=["per-frame", "per-chunk"])
@pytest.mark.parametrize(
    "kernels",
    [DecoderKernels(convs_2d=True), DecoderKernels(bias_after_conv=True, channel_tile=10, convs_2d=True)],
    ids=["2d", "2d-tiled-bias-after"],
)
def test_convs_as_2d_decode_the_plain_frames(vae: WanVAE, latents, kernels, frames_per_call) -> None:
    """Causal convs over stacked frames, shortcuts as matrix products: the plain decoder's sums in another order."""
    plain = _decode_in_chunks(StreamingDecoder(vae), latents)
    decoder = StreamingDecoder(vae, frames_per_call=frames_per_call, kernels=kernels)
    ours = _decode_in_chunks(decoder, latents)
    assert ours.shape == plain.shape
    assert _relative_error(ours, plain) < 1e-5  # float32 rounding (about 1.5e-6 here); a wrong tap lands near 1
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=2e-5)
    filters = [cache.filters()[0] for cache in decoder._stream.caches.values()]
    assert all(weight.dim() == 4 for weight in filters)  # [C_out, 3 C_in, kh, kw]: every causal conv ran as 2-D


def test_convs_as_2d_decode_the_plain_frames_in_float64(vae: WanVAE, latents: torch.Tensor) -> None:
    vae64 = copy.deepcopy(vae).double()
    plain = _decode_in_chunks(StreamingDecoder(vae64), latents.double())
    kernels = DecoderKernels(bias_after_conv=True, channel_tile=10, convs_2d=True)
    ours = _decode_in_chunks(StreamingDecoder(vae64, frames_per_call=2, kernels=kernels), latents.double())
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)


def test_convs_as_2d_stream_the_whole_video_decode(vae: WanVAE, reference, latents: torch.Tensor) -> None:
    decoder = StreamingDecoder(vae, kernels=DecoderKernels(convs_2d=True))
    ours = _decode_in_chunks(decoder, latents)
    with torch.no_grad():
        expected = reference.decode(decoder.denormalise(latents)).sample[0].permute(1, 0, 2, 3)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_upsampled_conv_on_the_small_image_is_the_conv_of_the_upsampled_one() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1).double()
    images = torch.randn(2, 6, 4, 7, dtype=torch.float64)
    upsample = torch.nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact")
    assert UpsampledConv.applies_to(upsample, conv)
    expected = conv(torch.nn.functional.interpolate(images, scale_factor=2.0, mode="nearest-exact"))  # float64 through
    ours = UpsampledConv(conv)(images)
    assert ours.shape == expected.shape == (2, 5, 8, 14)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    assert not UpsampledConv.applies_to(upsample, torch.nn.Conv2d(6, 5, 3, padding=1, stride=2))
    assert not UpsampledConv.applies_to(torch.nn.Upsample(scale_factor=2.0, mode="bilinear"), conv)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_subpixel_upsampling_convs_decode_the_plain_frames(vae, latents, dtype: torch.dtype) -> None:
    own = copy.deepcopy(vae).to(dtype)
    plain = _decode_in_chunks(StreamingDecoder(own), latents.to(dtype))
    decoder = StreamingDecoder(own, kernels=DecoderKernels(convs_2d=True, upsample_subpixel=True))
    ours = _decode_in_chunks(decoder, latents.to(dtype))
    assert len(decoder._stream.upsampled) == 3  # every 2x upsampling's conv (two with time upsampling, one without)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(ours, plain, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("convs_2d", [False, True], ids=["3d", "2d-subpixel"])
def test_computed_filters_follow_the_vae_weights_from_one_video_to_the_next(vae, latents, convs_2d: bool) -> None:
    vae64 = copy.deepcopy(vae).double()
    kernels = DecoderKernels(bias_after_conv=True, channel_tile=10, convs_2d=convs_2d, upsample_subpixel=convs_2d)
    decoder = StreamingDecoder(vae64, kernels=kernels)
    _decode_in_chunks(decoder, latents.double())
    with torch.no_grad():
        vae64.decoder.up_blocks[-1].resnets[-1].conv2.weight.mul_(0.5)  # a tiled conv's new weights, in place
        vae64.decoder.conv_in.weight.mul_(0.5)  # an untiled one's (run from a reshaped copy by a 2-D conv)
        vae64.decoder.up_blocks[0].upsamplers[0].resample[1].bias.add_(0.5)  # an upsampling conv's (summed filters)
    decoder.reset()
    again = _decode_in_chunks(decoder, latents.double())
    fresh = _decode_in_chunks(StreamingDecoder(vae64, kernels=kernels), latents.double())
    assert torch.equal(again, fresh)


def test_padded_channels_fill_one_tile_from_three_quarters_of_it() -> None:
    assert padded_channels(96, 128) == 128  # the full-resolution stage of the Wan2.1 decoder
    assert [padded_channels(c, 128) for c in (3, 95, 128, 192, 384)] == [3, 95, 128, 192, 384]
    assert padded_channels(96, None) == 96


def _without_conv2_bias(vae: WanVAE) -> WanVAE:
    other = copy.deepcopy(vae)
    other.decoder.up_blocks[-1].resnets[-1].conv2.bias.data.zero_()
    return other


def test_first_call_of_a_video_carries_one_latent_frame(vae: WanVAE, latents: torch.Tensor) -> None:
    stream = DecoderStream(vae.decoder)
    with pytest.raises(ValueError, match="first decoder call must carry one latent frame, got 2"):
        stream(vae.post_quant_conv(latents[:, :2].permute(0, 2, 1, 3, 4)))


def test_streaming_refuses_a_decoder_that_is_not_memflows(reference: AutoencoderKLWan) -> None:
    """diffusers' modules are not walked (their private attributes change between versions): a clear TypeError."""
    with pytest.raises(TypeError, match=r"expected memflow's Wan2.1 VAE \(wan_vae.WanVAE\), got AutoencoderKLWan"):
        StreamingDecoder(reference)
    with pytest.raises(TypeError, match=r"expected memflow's Wan2.1 decoder \(wan_vae.WanDecoder\), got WanDecoder3d"):
        DecoderStream(reference.decoder)


def _buffer_addresses(decoder: StreamingDecoder) -> dict[torch.nn.Module, tuple[int, ...]]:
    """Where each causal conv keeps its history and computed filters."""
    caches = decoder._stream.caches
    return {conv: (cache.history.data_ptr(), cache.filters()[0].data_ptr()) for conv, cache in caches.items()}


@pytest.mark.parametrize("convs_2d", [False, True], ids=["3d", "2d"])
def test_each_causal_conv_keeps_its_buffers_at_one_address_across_chunks_and_videos(vae, latents, convs_2d) -> None:
    """What a CUDA graph of a decoder call needs: the state it reads and writes never moves."""
    decoder = StreamingDecoder(vae, kernels=DecoderKernels(channel_tile=10, convs_2d=convs_2d))
    first = _decode_in_chunks(decoder, latents[:, :4])
    addresses = _buffer_addresses(decoder)
    temporal = [m for m in vae.decoder.modules() if isinstance(m, CausalConv3d)]
    assert len(addresses) == sum(conv.kernel_size[0] == 3 for conv in temporal)  # all but the 1x1x1 shortcuts
    made = decoder._stream.buffers_made
    decoder.decode_float(latents[:, 4:])
    decoder.reset()
    assert all(not cache.history.any() for cache in decoder._stream.caches.values())  # zeroed in place
    again = _decode_in_chunks(decoder, latents[:, :4])
    assert _buffer_addresses(decoder) == addresses and decoder._stream.buffers_made == made
    assert torch.equal(again, first)


def test_a_new_frame_size_gets_new_buffers(vae, latents) -> None:
    decoder = StreamingDecoder(vae)
    decoder.decode_float(latents[:, :2])
    made = decoder._stream.buffers_made
    decoder.reset()
    small = latents[:, :2, :, :2, :4]
    ours = decoder.decode_float(small)
    assert decoder._stream.buffers_made == 2 * made  # every history again, at the new size
    assert decoder._stream.buffers_moved == made
    torch.testing.assert_close(ours, StreamingDecoder(vae).decode_float(small), rtol=0, atol=0)
