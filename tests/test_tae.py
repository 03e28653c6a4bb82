"""The TAEHV preview decoder on the CPU: its released key layout, its weights files (good, cut, foreign), the
streaming rules (frame counts, memory carried), the hub download and verify against a local stand-in of the hub,
and the decoder choice of the commands. Parity with the reference is in test_tae_parity.py."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError

from memflow_cli.decoders import DecoderChoice, DecoderRequest
from memflow_cli.demo import build_demo_taehv
from memflow_cli.loading import WeightsError
from memflow_cli.plan import EXIT_BAD_INPUT, PlanError, decoder_request
from memflow_cli.tae import (
    TAE_DOWNLOAD_COMMAND,
    TAEW2_1,
    StreamingTaeDecoder,
    TaehvDecoder,
    decode_video,
    load_taehv,
    random_released_state,
    released_shapes,
)
from memflow_cli.tae import files as tae_files
from memflow_cli.tae.model import GrowUpConv, TaeMemory, phase_kernel
from memflow_cli.tae.weights import prepared, taehv_from_released

from .tae_reference import PlainStreamingTae, PlainTimeGrow, plain_taehv

CPU = torch.device("cpu")


def readme_decoder_shapes() -> dict[str, tuple[int, ...]]:
    """The decoder's keys and shapes as the fixtures' README lists them (written out here, not derived)."""
    shapes: dict[str, tuple[int, ...]] = {"decoder.1.weight": (256, 16, 3, 3), "decoder.1.bias": (256,)}
    for blocks, width in (((3, 4, 5), 256), ((9, 10, 11), 128), ((15, 16, 17), 64)):
        for index in blocks:
            shapes[f"decoder.{index}.conv.0.weight"] = (width, 2 * width, 3, 3)
            for conv in (2, 4):
                shapes[f"decoder.{index}.conv.{conv}.weight"] = (width, width, 3, 3)
            for conv in (0, 2, 4):
                shapes[f"decoder.{index}.conv.{conv}.bias"] = (width,)
    shapes |= {
        "decoder.7.conv.weight": (256, 256, 1, 1), "decoder.8.weight": (128, 256, 3, 3),
        "decoder.13.conv.weight": (256, 128, 1, 1), "decoder.14.weight": (64, 128, 3, 3),
        "decoder.19.conv.weight": (128, 64, 1, 1), "decoder.20.weight": (64, 64, 3, 3),
        "decoder.22.weight": (3, 64, 3, 3), "decoder.22.bias": (3,),
    }  # fmt: skip
    return shapes


@pytest.fixture(scope="module")
def released() -> dict[str, torch.Tensor]:
    """Random decoder weights in the released layout and dtype (float16), with an encoder key beside them, as the
    file holds."""
    state = {key: tensor.half() for key, tensor in random_released_state(TAEW2_1, seed=5).items()}
    return state | {"encoder.0.weight": torch.zeros(64, 3, 3, 3, dtype=torch.float16)}


@pytest.fixture(scope="module")
def taew2_1(released) -> TaehvDecoder:
    return taehv_from_released({key: t for key, t in released.items() if key.startswith("decoder.")})


@pytest.fixture(scope="module")
def pth_file(tmp_path_factory, released) -> Path:
    path = tmp_path_factory.mktemp("tae") / "taew2_1.pth"
    torch.save(released, path)
    return path


def small_latents(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, frames, 16, 2, 3, generator=torch.Generator().manual_seed(seed))


# -- layout and weights files ---------------------------------------------------------------------------------


def test_the_released_layout_is_the_readmes():
    assert released_shapes(TAEW2_1) == readme_decoder_shapes()
    assert sum(torch.Size(shape).numel() for shape in released_shapes(TAEW2_1).values()) == 9_844_611
    state = random_released_state(TAEW2_1)
    assert {key: tuple(tensor.shape) for key, tensor in state.items()} == readme_decoder_shapes()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_file_in_the_released_layout_loads_the_same_decoder(tmp_path, taew2_1, released, suffix):
    path = tmp_path / f"taew2_1{suffix}"
    if suffix == ".pth":
        torch.save(released, path)
    else:
        from safetensors.torch import save_file

        save_file(released, path)
    loaded = load_taehv(path, CPU, torch.float32)
    latents = small_latents(3)
    with torch.inference_mode():
        decoder_state = {key: tensor for key, tensor in released.items() if key.startswith("decoder.")}
        expected = plain_taehv(decoder_state)(latents)[:, TAEW2_1.trimmed_frames :].clamp(0, 1)  # the file's values
        torch.testing.assert_close(decode_video(loaded, latents), expected, rtol=0, atol=1e-5)


def test_a_cut_file_is_one_line_naming_it_and_the_download(tmp_path, pth_file):
    for name in ("taew2_1.pth", "taew2_1.safetensors"):
        path = tmp_path / name
        path.write_bytes(pth_file.read_bytes()[: pth_file.stat().st_size // 2])
        with pytest.raises(WeightsError) as caught:
            load_taehv(path, CPU, torch.float32)
        message = str(caught.value)
        assert message.startswith(f"{path}: truncated or corrupt") and TAE_DOWNLOAD_COMMAND in message
        assert "\n" not in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: s.pop("decoder.9.conv.2.weight"), "missing key decoder.9.conv.2.weight"),
        (lambda s: s.update({"decoder.8.weight": torch.zeros(128, 128, 3, 3)}),
         "decoder.8.weight has shape [128, 128, 3, 3], expected [128, 256, 3, 3]"),
        (lambda s: s.update({"decoder.23.weight": torch.zeros(3)}), "unexpected key decoder.23.weight"),
    ],
    ids=["missing-key", "wrong-shape", "unexpected-key"],
)  # fmt: skip
def test_a_file_of_another_layout_names_the_first_mismatch(tmp_path, released, change, expected):
    state = dict(released)
    change(state)
    path = tmp_path / "other.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as caught:
        load_taehv(path, CPU, torch.float32)
    assert str(caught.value) == f"{path}: not a taew2_1 decoder: {expected}" + (
        f" (re-run `{TAE_DOWNLOAD_COMMAND}`)" if expected.startswith("missing") else ""
    )


def test_a_missing_file_names_the_download_command(tmp_path):
    with pytest.raises(WeightsError, match=TAE_DOWNLOAD_COMMAND):
        load_taehv(tmp_path / "nothing.pth", CPU, torch.float32)


# -- the built form: phase convolutions ---------------------------------------------------------------------


@pytest.mark.parametrize("factor", [1, 2])
def test_a_phase_conv_is_time_grow_upsampling_and_a_3x3_conv(factor):
    """The 2x2 phase kernel and the pixel shuffle give the frames of the reference's order of layers."""
    generator = torch.Generator().manual_seed(factor)
    grow = PlainTimeGrow(6, factor)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1, bias=False)
    for weight in (grow.conv.weight, conv.weight):
        weight.data.normal_(0.0, 0.3, generator=generator)
    x = torch.randn(3, 6, 4, 7, generator=generator).contiguous(memory_format=torch.channels_last)
    up = GrowUpConv(6, 5, factor)
    up.weight.data = phase_kernel(grow.conv.weight, conv.weight).float()
    with torch.inference_mode():
        expected = conv(torch.nn.functional.interpolate(grow(x), scale_factor=2.0, mode="nearest"))
        ours = up(x)
    assert ours.shape == expected.shape == (3 * factor, 5, 8, 14)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours, expected, rtol=2e-6, atol=2e-6)  # float32 rounding: values up to ~5


def test_the_built_decoder_decodes_as_the_plain_one_whole_and_streamed():
    """Two videos at once, odd sizes: the whole decode and 2 + 1 + 2 latent chunks give the plain path's frames."""
    state = random_released_state(TAEW2_1, seed=7)
    ours, plain = taehv_from_released(state), plain_taehv(state)
    latents = torch.randn(2, 5, 16, 3, 5, generator=torch.Generator().manual_seed(3))
    memory, plain_memory = TaeMemory(), []
    with torch.inference_mode():
        expected = plain(latents)
        torch.testing.assert_close(ours(latents), expected, rtol=0, atol=1e-5)
        pieces = [ours(piece, memory) for piece in latents.split((2, 1, 2), dim=1)]
        plain_pieces = [plain(piece, plain_memory) for piece in latents.split((2, 1, 2), dim=1)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(plain_pieces, dim=1), expected, rtol=0, atol=1e-5)
    assert (expected[:, 3:].clamp(0, 1) - expected[:, 3:].clamp(0, 1).mean()).abs().max() > 0.1  # not a constant


def test_the_streamed_uint8_frames_are_the_plain_paths():
    """Chunk by chunk, the uint8 frames the writer gets are the plain path's, level for level."""
    config = replace(TAEW2_1, widths=(32, 16, 8))
    state = random_released_state(config, seed=2)
    ours, plain = StreamingTaeDecoder(taehv_from_released(state, config)), PlainStreamingTae(plain_taehv(state, config))
    latents = torch.randn(1, 6, 16, 4, 6, generator=torch.Generator().manual_seed(4))
    for piece in latents.split(3, dim=1):
        frames, expected = ours.decode(piece), plain.decode(piece)
        assert frames.dtype == torch.uint8 and frames.shape == expected.shape
        assert (frames.int() - expected.int()).abs().max() <= 1  # a level apart only where float rounding straddles
        assert (frames != expected).float().mean() < 1e-3


def test_the_fused_memory_blocks_are_chosen_only_for_cuda():
    """On the CPU no cuDNN fusion is tried; a decoder built with it keeps its weights and, fed CPU tensors,
    computes the plain way (the same frames, bit for bit)."""
    from memflow_cli.tae.model import cudnn_fusion_works
    from memflow_cli.tae.weights import _rebuilt

    assert not cudnn_fusion_works(CPU, torch.float32, TAEW2_1.widths)
    decoder = build_demo_taehv()
    assert not prepared(decoder, CPU, torch.float32).fused_cuda
    fused = _rebuilt(decoder, fused_cuda=True)
    assert fused.fused_cuda and all(block.fused_cuda for stage in fused.stages for block in stage.blocks)
    latents = small_latents(3, seed=8)
    with torch.inference_mode():
        assert torch.equal(decode_video(fused, latents), decode_video(decoder, latents))


# -- streaming ------------------------------------------------------------------------------------------------


def test_streamed_chunks_give_9_then_12_frames_of_the_whole_video():
    decoder = build_demo_taehv()
    latents = torch.randn(1, 9, 16, 8, 12, generator=torch.Generator().manual_seed(1))
    stream = StreamingTaeDecoder(decoder)
    chunks = [stream.decode_float(piece) for piece in latents.split(3, dim=1)]
    assert [chunk.shape[0] for chunk in chunks] == [9, 12, 12]
    with torch.inference_mode():
        whole = decode_video(decoder, latents)[0]
    assert whole.shape == (33, 3, 64, 96)
    torch.testing.assert_close(torch.cat(chunks), whole, rtol=0, atol=1e-5)
    # a new video starts afresh: its frames are the first video's again
    stream.reset()
    torch.testing.assert_close(stream.decode_float(latents[:, :3]), chunks[0], rtol=0, atol=0)


def test_decode_gives_rounded_uint8_frames_on_the_cpu():
    decoder = build_demo_taehv()
    latents = small_latents(3, seed=2).expand(1, 3, 16, 2, 3).contiguous()
    floats = StreamingTaeDecoder(decoder).decode_float(latents)
    frames = StreamingTaeDecoder(decoder).decode(latents)
    assert frames.dtype == torch.uint8 and frames.shape == (9, 16, 24, 3) and frames.device.type == "cpu"
    assert torch.equal(frames, (floats * 255).round().to(torch.uint8).permute(0, 2, 3, 1))
    assert 0 < frames.float().mean() < 255


@pytest.mark.gpu
def test_decode_on_a_gpu_gives_page_locked_uint8_frames_of_its_float_frames():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    decoder = prepared(build_demo_taehv(), torch.device("cuda"), torch.bfloat16)
    latents = torch.randn(1, 3, 16, 8, 12, generator=torch.Generator().manual_seed(6))
    floats = StreamingTaeDecoder(decoder).decode_float(latents)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # as the decode worker runs it
        frames = StreamingTaeDecoder(decoder).decode(latents)
    assert frames.device.type == "cpu" and frames.is_pinned() and frames.shape == (9, 64, 96, 3)
    expected = (floats.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    assert torch.equal(frames, expected)


def test_the_decoder_refuses_latents_in_the_vae_layout():
    with pytest.raises(ValueError, match=r"latents must be \[1, F>0, 16, h, w\]"):
        StreamingTaeDecoder(build_demo_taehv()).decode(torch.zeros(1, 16, 3, 2, 3))


# -- the hub: download and verify against a local stand-in ----------------------------------------------------


@pytest.fixture
def tae_hub(tmp_path, monkeypatch, pth_file) -> list[dict]:
    """huggingface_hub's hf_hub_download in `tae.files`, answering from a local taew2_1.pth; records each fetch."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls: list[dict] = []

    def fake_download(repo, name, *, cache_dir=None, local_dir=None, local_files_only=False, **kwargs):
        snapshot = Path(cache_dir or tmp_path / "hf" / "hub") / f"models--{repo.replace('/', '--')}" / "snapshots" / "1"
        if local_files_only:
            if not (snapshot / name).is_file():
                raise LocalEntryNotFoundError(f"{name} is not cached")
            return str(snapshot / name)
        calls.append({"repo": repo, "file": name, "cache_dir": cache_dir, "local_dir": local_dir})
        target = Path(local_dir) if local_dir is not None else snapshot
        target.mkdir(parents=True, exist_ok=True)
        return shutil.copy(pth_file, target / name)

    monkeypatch.setattr(tae_files, "hf_hub_download", fake_download)
    return calls


def test_download_fetches_taew2_1_into_the_hub_cache_where_verify_finds_it(tmp_path, tae_hub):
    assert tae_files.find_tae_weights() is None
    path = tae_files.download_tae()
    assert tae_hub == [{"repo": "madebyollin/taehv", "file": "taew2_1.pth", "cache_dir": tmp_path / "hf" / "hub",
                        "local_dir": None}]  # fmt: skip
    assert tae_files.tae_weights() == path
    result = tae_files.verify_tae(path)
    assert result.ok and "taew2_1 decoder layout" in str(result)


def test_download_into_a_folder_is_found_as_the_weights_folders_file(tmp_path, tae_hub):
    path = tae_files.download_tae(tmp_path / "weights")
    assert path == tmp_path / "weights" / "taew2_1.pth"
    assert tae_files.tae_weights(None, tmp_path / "weights") == path


def test_download_offline_says_so(tmp_path, tae_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE is set"):
        tae_files.download_tae()
    assert tae_hub == []


def test_verify_reports_a_cut_file_and_a_foreign_one(tmp_path, pth_file):
    cut = tmp_path / "cut.pth"
    cut.write_bytes(pth_file.read_bytes()[: pth_file.stat().st_size // 3])
    assert "too small" in str(tae_files.verify_tae(cut))
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(pth_file.read_bytes()[:-4096])
    result = tae_files.verify_tae(damaged)
    assert not result.ok and "truncated or corrupt" in result.detail
    foreign = tmp_path / "foreign.pth"
    torch.save({"weight": torch.zeros(2 * 9_844_611 // 2, dtype=torch.float16)}, foreign)
    result = tae_files.verify_tae(foreign)
    assert not result.ok and "missing key decoder.1.weight" in result.detail


# -- the choice -----------------------------------------------------------------------------------------------


def test_a_demo_engine_for_the_taehv_decoder_has_no_wan_vae_and_decodes_with_taehv():
    from memflow_cli.engine import Video, load_engine
    from memflow_cli.settings import GenerationSettings

    prompt = ["a fox runs through the snow"]
    with load_engine("demo", "cpu", decoder=DecoderRequest(DecoderChoice.TAE), embed_cache=False) as engine:
        assert engine.vae is None and engine.decoder is DecoderChoice.TAE
        engine.encode(prompt)
        video = Video(engine.embeddings(prompt), chunks=2)
        chunks = list(engine.stream(video, GenerationSettings(geometry=engine.geometry), seed=0))
    geometry = engine.geometry
    assert [tuple(c.frames.shape) for c in chunks] == [(9, geometry.height, geometry.width, 3),
                                                       (12, geometry.height, geometry.width, 3)]  # fmt: skip


def test_decoder_options_resolve_once_and_bad_ones_are_one_line(tmp_path, pth_file):
    assert decoder_request("demo", None, None) == DecoderRequest(DecoderChoice.WAN)
    assert decoder_request("demo", "TAE", None).is_tae
    assert decoder_request(None, "tae", pth_file) == DecoderRequest(DecoderChoice.TAE, pth_file)
    assert decoder_request(None, None, pth_file) == DecoderRequest(DecoderChoice.TAE, pth_file)  # alone: tae
    assert DecoderRequest(DecoderChoice.TAE, pth_file).options() == ["--decoder", "tae", "--decoder-weights",
                                                                     str(pth_file)]  # fmt: skip
    refusals = [
        (("demo", "vae", None), "--decoder vae: not a decoder"),
        (("demo", "wan", pth_file), "--decoder-weights is the TAEHV decoder's file, not used with --decoder wan"),
        (("demo", None, pth_file), "--decoder-weights: the demo model decodes with random TAEHV weights"),
        (("demo", "tae", pth_file), "--decoder-weights: the demo model decodes with random TAEHV weights"),
        ((None, "tae", tmp_path / "nothing.pth"), "--decoder-weights: no such file"),
    ]
    for arguments, message in refusals:
        with pytest.raises(PlanError) as caught:
            decoder_request(*arguments)
        assert caught.value.exit_code == EXIT_BAD_INPUT and message in caught.value.message


def test_live_takes_tae_unasked_only_where_its_weights_are_found(tmp_path, tae_hub, capsys):
    from memflow_cli.commands.live import _live_decoder, _say_decoder

    _say_decoder(chosen := _live_decoder(None, None, None))
    assert chosen.choice is DecoderChoice.WAN
    assert "--decoder tae for the fast preview decoder" in capsys.readouterr().err
    tae_files.download_tae()
    _say_decoder(chosen := _live_decoder(None, None, None))
    assert chosen.choice is DecoderChoice.TAE
    assert "decoding with tae" in capsys.readouterr().err
    assert _live_decoder(None, "wan", None).choice is DecoderChoice.WAN  # asked: as asked
    assert _live_decoder("demo", None, None).choice is DecoderChoice.WAN  # its decoders are random stand-ins
