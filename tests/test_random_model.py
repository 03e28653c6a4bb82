"""`--model random`'s parts: the full-size random umT5 (built here at a tiny size) and the engine option."""

from __future__ import annotations

import pytest
import torch
from transformers import UMT5Config

from memflow_cli.engine import load_engine
from memflow_cli.random_model import UMT5_XXL, random_text_encoder

TINY = UMT5Config(
    vocab_size=UMT5_XXL.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
    relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
)  # fmt: skip


def test_the_full_size_config_is_umt5_xxl():
    config = UMT5_XXL
    assert (config.vocab_size, config.d_model, config.d_ff, config.num_layers, config.num_heads) == (
        256384, 4096, 10240, 24, 64,
    )  # fmt: skip
    assert config.d_kv * config.num_heads == config.d_model


def test_random_text_encoder_is_seeded_lives_on_the_cpu_and_pads_with_zeros():
    first = random_text_encoder(torch.device("cpu"), torch.float32, TINY, max_length=64)
    second = random_text_encoder(torch.device("cpu"), torch.float32, TINY, max_length=64)
    assert first.device.type == "cpu" and first.dtype == torch.float32
    assert first.describe() == "umT5 2 layers x 32"
    embedding = first.encoder.get_input_embeddings().weight
    assert embedding.shape == (256384, 32) and embedding.data_ptr() == first.encoder.shared.weight.data_ptr()

    prompts = ["a red fox trots across a snowy field", "night falls"]
    embeds = first.encode(prompts)
    assert embeds.shape == (2, 64, 32) and torch.isfinite(embeds).all()
    assert torch.equal(embeds, second.encode(prompts))  # the same seed, the same weights
    lengths = first.tokenize(prompts)[1].sum(dim=1)
    for row, length in zip(embeds, lengths, strict=True):
        assert row[:length].abs().sum() > 0 and torch.count_nonzero(row[length:]) == 0


def test_only_the_random_model_takes_a_full_size_text_encoder():
    with pytest.raises(ValueError, match="only the random model"):
        load_engine("demo", "cpu", full_text_encoder=True)


# -- random files in the official layout (`python -m memflow_cli.random_model DIR`) ---------------------------------


@pytest.fixture(scope="module")
def official_folder(tmp_path_factory):
    from memflow_cli.random_model import main

    folder = tmp_path_factory.mktemp("official") / "weights"
    assert main([str(folder), "--tiny", "--device", "cpu"]) == 0
    return folder


def test_random_weights_never_replace_files_without_overwrite(tmp_path, capsys):
    from memflow_cli.random_model import main

    (tmp_path / "base.pt").write_bytes(b"REAL")
    assert main([str(tmp_path), "--tiny", "--device", "cpu"]) == 2
    assert (tmp_path / "base.pt").read_bytes() == b"REAL" and len(list(tmp_path.iterdir())) == 1
    assert "is not an empty folder" in capsys.readouterr().err


def test_the_tiny_official_layout_is_the_release_layout(official_folder):
    from memflow_cli.weights import resolve_model

    files = resolve_model(official_folder)
    wan = official_folder / "Wan2.1-T2V-1.3B"
    assert files.layout == "official"
    assert (files.base, files.lora) == (official_folder / "base.pt", official_folder / "lora.pt")
    assert files.text_encoder_dir == wan / "models_t5_umt5-xxl-enc-bf16.pth"
    assert files.vae == wan / "Wan2.1_VAE.pth" and files.tokenizer_dir == wan / "google" / "umt5-xxl"
    assert files.transformer_config == wan / "config.json"
    t5 = torch.load(files.text_encoder_dir, mmap=True, weights_only=True)
    assert {tensor.dtype for tensor in t5.values()} == {torch.bfloat16}  # as released
    assert "token_embedding.weight" in t5 and "blocks.1.ffn.gate.0.weight" in t5
    vae = torch.load(files.vae, mmap=True, weights_only=True)
    assert {tensor.dtype for tensor in vae.values()} == {torch.float32}  # as released
    assert vae["decoder.head.0.gamma"].abs().sum() == vae["decoder.head.0.gamma"].numel()  # norm scales are ones


def test_the_tiny_official_layout_loads_through_the_render_loaders_and_generates(official_folder):
    from memflow_cli.engine import Video

    prompts = ["a white lighthouse at sunset", "the keeper climbs the spiral staircase"]
    with load_engine(str(official_folder), "cpu") as engine:
        assert engine.name == f"weights {official_folder}" and engine.identity["layout"] == "official"
        assert engine.text_encoder.describe() == "umT5 2 layers x 32"
        ids, mask = engine.text_encoder.tokenize(prompts)
        assert ids.max() < engine.text_encoder.encoder.config.vocab_size and (ids[:, 0] > 2).all()
        assert (ids[mask.bool()] == 2).sum() == 0  # every word is in the vocabulary: no unknown token
        engine.encode(prompts)
        embeds = engine.embeddings(prompts)
        assert embeds.shape == (2, 512, 32) and torch.isfinite(embeds).all()
        chunk = next(engine.stream(Video(embeds[:1], 1), _settings(engine), seed=0, decode=False))
        assert chunk.latents.shape == (1, 3, 16, 60, 104) and torch.isfinite(chunk.latents).all()


def _settings(engine):
    from memflow_cli.settings import GenerationSettings

    return GenerationSettings(geometry=engine.geometry)


def test_the_full_size_files_have_the_names_and_shapes_the_loaders_expect():
    """Checked on the meta device (no memory): the umT5-XXL file's names map back onto transformers' model and
    give back umT5-XXL's config; the VAE's names convert into diffusers' Wan VAE exactly."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    from transformers import UMT5EncoderModel

    from memflow_cli.random_model import _shapes, wan_t5_name, wan_vae_name
    from memflow_cli.weights import WAN21_VAE_CONFIG, convert_wan_t5_to_umt5, umt5_config_from_wan_t5

    umt5 = _shapes(UMT5EncoderModel, UMT5_XXL)
    t5 = {wan_t5_name(name): torch.empty(shape, device="meta") for name, shape in umt5.items() if wan_t5_name(name)}
    config = umt5_config_from_wan_t5(t5)
    assert (config.vocab_size, config.d_model, config.d_ff, config.num_layers, config.num_heads) == (
        256384, 4096, 10240, 24, 64,
    )  # fmt: skip
    assert set(convert_wan_t5_to_umt5(t5)) == set(umt5) - {"encoder.embed_tokens.weight"}  # tied to shared
    assert sum(tensor.numel() for tensor in t5.values()) * 2 == pytest.approx(11.36e9, rel=0.01)  # bf16 bytes

    vae = _shapes(AutoencoderKLWan, **WAN21_VAE_CONFIG)
    original = {wan_vae_name(name): torch.empty(shape, device="meta") for name, shape in vae.items()}
    assert set(convert_wan_vae_to_diffusers(original)) == set(vae)
    assert sum(tensor.numel() for tensor in original.values()) * 4 == pytest.approx(507.6e6, rel=0.01)  # float32
