"""The decoder's CUDA paths: its calls replayed from CUDA graphs, and its norm + SiLU without a compiler.

On the CPU: which calls a `DecoderGraphs` captures and replays (capture stood in for by a recorder), and the
arithmetic of the CUDA eager kernels in float64. On a GPU (marked `gpu`): replays equal the eager decode,
also on a second device, and the bench's decode timing runs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import pytest
import torch

from memflow_cli.bench import decode_ms_per_chunk
from memflow_cli.decode import StreamingDecoder
from memflow_cli.settings import VideoGeometry
from memflow_cli.speed.decoder import (
    EAGER_CUDA_KERNELS,
    CallShape,
    DecoderGraphs,
    DecoderKernelSet,
    channels_last_convs,
    rms_norm_silu_over_channels_into,
)
from memflow_cli.vae_stream import DecoderKernels, rms_norm_silu_into
from memflow_cli.wan_vae import WanVAE, WanVAEConfig
from memflow_cli.weights import WAN21_VAE_CONFIG

LATENT_HW = (4, 6)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    torch.manual_seed(0)
    narrow = {**WAN21_VAE_CONFIG, "base_dim": 8, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1}
    return WanVAE(WanVAEConfig.from_diffusers(narrow)).eval()


def _latents(frames: int, hw: tuple[int, int] = LATENT_HW, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, frames, 16, *hw, generator=torch.Generator().manual_seed(seed))  # [1, F, C, h, w]


def _decode(decoder: StreamingDecoder, latents: torch.Tensor, chunk: int = 3) -> torch.Tensor:
    return torch.cat([decoder.decode_float(piece) for piece in latents.split(chunk, dim=1)])  # [N, 3, H, W]


# -- which calls are captured and replayed (CPU: capture recorded, the call run as it is) ------------------------


class RecordedCapture:
    def __init__(
        self, run: Callable[[torch.Tensor], torch.Tensor], replays: list[CallShape], key: CallShape, pool: tuple
    ):
        self.run, self.replays, self.key, self.pool = run, replays, key, pool

    def replay(self, x: torch.Tensor) -> torch.Tensor:
        self.replays.append(self.key)
        return self.run(x)


class RecordingGraphs(DecoderGraphs):
    """`DecoderGraphs` whose capture is recorded instead of made: its choices run on the CPU."""

    def __init__(self, stream):
        super().__init__(stream)
        self.captured: list[CallShape] = []
        self.replayed: list[CallShape] = []
        self.pools_asked: list[tuple | None] = []  # the pool each capture was given (None: make a new one)

    def _capture_graph(self, key: CallShape, x: torch.Tensor, pool: tuple | None) -> RecordedCapture:
        self.captured.append(key)
        self.pools_asked.append(pool)
        made = pool if pool is not None else (0, len(self.captured))  # a new pool's id, as torch numbers them
        return RecordedCapture(lambda y: self.stream.run(y, key.first), self.replayed, key, made)


def _recording_decoder(vae: WanVAE, frames_per_call: int | None = 1) -> StreamingDecoder:
    decoder = StreamingDecoder(vae, frames_per_call=frames_per_call)
    decoder._call = RecordingGraphs(decoder._stream)
    return decoder


def test_a_call_shape_is_captured_at_its_second_use_and_replayed_after(vae: WanVAE) -> None:
    latents = _latents(9)
    decoder = _recording_decoder(vae)
    ours = _decode(decoder, latents)
    graphs = decoder._call
    later = CallShape(False, (1, 16, 1, *LATENT_HW), torch.float32, torch.device("cpu"))
    # 9 calls of one frame: the first alone (never repeated in a video), then 8 later ones: eager, capture, 6 replays
    assert graphs.captured == [later]
    assert graphs.replayed == [later] * 7
    torch.testing.assert_close(ours, _decode(StreamingDecoder(vae), latents), rtol=0, atol=0)
    decoder.reset()  # the next video: its first call is captured now (second use), its later calls replay
    again = _decode(decoder, latents)
    first = CallShape(True, (1, 16, 1, *LATENT_HW), torch.float32, torch.device("cpu"))
    assert graphs.captured == [later, first] and graphs.replayed.count(later) == 7 + 8
    torch.testing.assert_close(again, ours, rtol=0, atol=0)


def test_whole_chunk_calls_make_one_graph_per_shape(vae: WanVAE) -> None:
    decoder = _recording_decoder(vae, frames_per_call=None)
    _decode(decoder, _latents(12))
    shapes = [(key.first, key.shape[2]) for key in decoder._call._seen]
    # chunk 1: its first frame alone, then 2 frames; chunks 2-4: 3 frames (eager, captured, replayed)
    assert sorted(shapes) == [(False, 2), (False, 3), (True, 1)]
    assert [(key.first, key.shape[2]) for key in decoder._call.captured] == [(False, 3)]


def test_new_buffers_drop_every_graph(vae: WanVAE) -> None:
    """Another frame size makes every history anew: graphs reading the old ones must not replay."""
    decoder = _recording_decoder(vae)
    _decode(decoder, _latents(6))
    assert decoder._call.shapes
    decoder.reset()
    small = _latents(6, hw=(2, 4))
    ours = _decode(decoder, small)
    assert all(key.shape[3:] == (2, 4) for key in decoder._call.shapes)
    torch.testing.assert_close(ours, _decode(StreamingDecoder(vae), small), rtol=0, atol=0)


def test_replaced_weights_drop_every_graph_and_weights_changed_in_place_keep_them(vae: WanVAE) -> None:
    own = copy.deepcopy(vae)
    decoder = _recording_decoder(own)
    latents = _latents(6)
    _decode(decoder, latents)
    assert len(decoder._call.shapes) == 1
    with torch.no_grad():
        own.decoder.conv_out.weight.mul_(0.5)  # in place: the graphs read the new values
    decoder.reset()
    _decode(decoder, latents)
    assert len(decoder._call.shapes) == 2  # the first call's graph added, the later calls' kept
    own.decoder.conv_out.weight.data = own.decoder.conv_out.weight.data.clone()  # a new address
    decoder.reset()
    ours = _decode(decoder, latents)
    # dropped: the first call ran eagerly again, the later ones were captured anew (after one eager call)
    assert [key.first for key in decoder._call.captured] == [False, True, False]
    assert [key.first for key in decoder._call.shapes] == [False]
    torch.testing.assert_close(ours, _decode(StreamingDecoder(own), latents), rtol=0, atol=0)


def test_a_decoders_graphs_share_one_pool_and_start_a_new_one_after_a_drop(vae: WanVAE) -> None:
    """The allocator refuses a pool whose graphs all died: a capture after a drop, or in another decoder,
    must make its own pool (passing None), never reuse the old handle (torch 2.11's `use_count > 0` assert)."""
    own = copy.deepcopy(vae)
    decoder = _recording_decoder(own)
    latents = _latents(6)
    _decode(decoder, latents)
    decoder.reset()
    _decode(decoder, latents)  # the first call's graph: captured into the pool of the later calls' graph
    graphs = decoder._call
    assert graphs.pools_asked == [None, (0, 1)] and graphs.pool == (0, 1)
    own.decoder.conv_out.weight.data = own.decoder.conv_out.weight.data.clone()  # every graph dropped
    decoder.reset()
    _decode(decoder, latents)
    assert graphs.pools_asked == [None, (0, 1), None] and graphs.pool == (0, 3)
    other = _recording_decoder(own)  # another decoder (the engine makes one per video): a pool of its own
    _decode(other, latents)
    assert other._call.pools_asked == [None]


def test_graphs_only_on_cuda(vae: WanVAE) -> None:
    assert StreamingDecoder(vae).graphs is None  # a CPU decoder runs every call as it is


# -- the CUDA eager kernels' arithmetic, in float64 on the CPU ---------------------------------------------------


def test_norm_silu_over_channels_is_the_official_norm_then_silu() -> None:
    channels = 12
    gamma = torch.rand(channels, 1, 1, 1, dtype=torch.float64) + 0.5
    x = torch.randn(1, channels, 2, 4, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    x[0, :, 0, 0, 0] = 0  # a zero pixel stays zero, as normalize's eps makes it
    bias = torch.randn(channels, dtype=torch.float64)
    expected, ours = torch.empty_like(x), torch.empty_like(x)
    for scale, beta in ((channels**0.5, 0.0), (3.0, torch.randn(channels, 1, 1, 1, dtype=torch.float64))):
        rms_norm_silu_into(expected, x, bias, gamma, beta, scale)
        rms_norm_silu_over_channels_into(ours, x, bias, gamma, beta, scale)
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    assert ours.is_contiguous(memory_format=torch.channels_last_3d)  # written into the given window, in place


def test_eager_cuda_kernels_decode_the_plain_frames_in_float64(vae: WanVAE) -> None:
    vae64 = copy.deepcopy(vae).double()
    latents = _latents(6).double()
    plain = _decode(StreamingDecoder(vae64), latents)
    # the real tile is 128 (for 96 channels); 10 tiles this tiny decoder's 8-channel stage the same way
    kernels = DecoderKernels(norm_silu=EAGER_CUDA_KERNELS.norm_silu, channel_tile=10)
    ours = _decode(StreamingDecoder(vae64, kernels=kernels), latents)
    torch.testing.assert_close(ours, plain, rtol=1e-10, atol=1e-10)


# -- on a GPU --------------------------------------------------------------------------------------------------


def _cuda_vae(vae: WanVAE, device: str) -> WanVAE:
    on_device = copy.deepcopy(vae).to(device, torch.bfloat16)
    channels_last_convs(on_device)  # what the engine does on CUDA
    return on_device


KERNEL_SETS: dict[str, Callable[[], DecoderKernels]] = {kernels.value: kernels.kernels for kernels in DecoderKernelSet}




@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kernels", sorted(KERNEL_SETS))
@pytest.mark.parametrize("device", ["cuda:0", "cuda:1"])
@pytest.mark.parametrize("frames_per_call", [1, None], ids=["per-frame", "per-chunk"])
def test_graph_replays_equal_the_eager_decode(vae, kernels: str, device: str, frames_per_call) -> None:
    if torch.cuda.device_count() <= torch.device(device).index:
        pytest.skip(f"no {device}")
    cuda_vae = _cuda_vae(vae, device)
    latents = _latents(12, hw=(8, 12)).to(device, torch.bfloat16)
    made = KERNEL_SETS[kernels]()
    eager = _decode(StreamingDecoder(cuda_vae, frames_per_call=frames_per_call, kernels=made, graphs=False), latents)
    graphed_decoder = StreamingDecoder(cuda_vae, frames_per_call=frames_per_call, kernels=made, graphs=True)
    graphed = _decode(graphed_decoder, latents)
    assert graphed_decoder.graphs is not None and graphed_decoder.graphs.shapes  # replays happened
    assert torch.equal(graphed, eager)
    graphed_decoder.reset()  # the next video replays the same graphs over the zeroed histories
    assert torch.equal(_decode(graphed_decoder, latents), eager)


@pytest.mark.gpu
@needs_cuda
def test_decode_timing_runs_on_the_gpu(vae: WanVAE) -> None:
    geometry = VideoGeometry(height=64, width=96)
    decoder = StreamingDecoder(_cuda_vae(vae, "cuda"), kernels=EAGER_CUDA_KERNELS, graphs=True)
    ms = decode_ms_per_chunk(decoder, geometry, repeats=3)
    assert 0 < ms < 10_000
    assert decoder.graphs is not None and decoder.graphs.shapes


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kernel_set", [DecoderKernelSet.EAGER_CUDA, DecoderKernelSet.EAGER_CUDA_2D], ids=str)
def test_eager_cuda_kernels_are_as_faithful_as_the_plain_ones_on_the_full_width_decoder(kernel_set) -> None:
    """bf16 decodes against the float32 one of a random full-size Wan2.1 VAE: its 96-channel stage is computed
    as 128 channels and normalised by `F.rms_norm` over a strided view, as at 832x480; with the 2-D set, every
    causal conv runs over its stacked frames."""
    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig.from_diffusers(WAN21_VAE_CONFIG)).to("cuda").eval()
    channels_last_convs(vae)
    latents = torch.randn(1, 7, 16, 12, 20, device="cuda")
    expected = _decode(StreamingDecoder(vae, graphs=False), latents)
    vae.to(torch.bfloat16)
    plain = _decode(StreamingDecoder(vae, graphs=False), latents)
    eager_cuda = _decode(StreamingDecoder(vae, kernels=kernel_set.kernels()), latents)

    def error(x: torch.Tensor) -> float:
        return ((x - expected).norm() / expected.norm()).item()

    print(f"\nbf16 relative L2 to float32: plain {error(plain):.3e}, {kernel_set.value} {error(eager_cuda):.3e}")
    assert eager_cuda.shape == expected.shape == (25, 3, 96, 160)
    assert error(eager_cuda) < 5e-2
    assert error(eager_cuda) <= 1.1 * error(plain)
