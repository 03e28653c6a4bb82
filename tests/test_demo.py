"""The demo components: small, seeded, self-consistent, and built without any download."""

from __future__ import annotations

import torch

from memflow_cli import demo
from memflow_cli.engine import load_engine
from memflow_cli.model.transformer import CausalWanTransformer
from memflow_cli.speed.compile_cache import CompileChoice


def test_a_demo_latent_frame_becomes_the_tokens_the_geometry_counts():
    geometry = demo.DEMO_GEOMETRY
    model = CausalWanTransformer(demo.DEMO_TRANSFORMER)
    frame = torch.zeros(1, geometry.latent_channels, 1, geometry.latent_height, geometry.latent_width)
    with torch.no_grad():
        tokens = model.patch_embedding(frame)  # [1, dim, 1, h/2, w/2]
    assert tokens.shape[2:].numel() == geometry.tokens_per_frame


def test_transformer_matches_the_text_encoder():
    config = demo.DEMO_TRANSFORMER
    assert config.head_dim >= 32 and config.head_dim % 2 == 0
    encoder = demo.build_demo_text_encoder()
    assert config.text_dim == encoder.dim
    assert config.text_len == encoder.max_length
    assert config.in_dim == config.out_dim == demo.DEMO_GEOMETRY.latent_channels


def test_tokenizer_pads_with_zero_appends_eos_and_knows_no_unknown():
    tokenizer = demo.build_demo_tokenizer()
    assert tokenizer.pad_token_id == 0
    ids = tokenizer("a zebra in Zürich, 日本")["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids  # byte-level: every text has tokens
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "a zebra in Zürich, 日本"


def test_tokenizer_is_deterministic():
    first, second = demo.build_demo_tokenizer(), demo.build_demo_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    text = "The beekeeper kneels beside her son in the meadow."
    assert first(text)["input_ids"] == second(text)["input_ids"]


def test_the_token_counter_counts_as_the_tokenizer_does():
    tokenizer, count = demo.build_demo_tokenizer(), demo.demo_token_counter()
    texts = ["", "a fox", "a zebra in Zürich, 日本 🦊", "The beekeeper kneels beside her son. " * 60, "  two\n lines\t"]
    counts = [count(text) for text in texts]
    assert counts == [len(tokenizer(text, truncation=False, verbose=False)["input_ids"]) for text in texts]
    assert counts[0] == 1 and counts[3] > demo.DEMO_TEXT_LEN  # EOS alone; a prompt the encoder cuts is counted whole


def test_text_encoder_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    prompts = ["a dog on a beach", "a castle in the fog"]
    first = demo.build_demo_text_encoder(seed=0).encode(prompts)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first, demo.build_demo_text_encoder(seed=0).encode(prompts))
    assert not torch.equal(first, demo.build_demo_text_encoder(seed=1).encode(prompts))
    assert first.shape == (2, demo.DEMO_TEXT_LEN, demo.DEMO_TEXT_DIM)
    assert not torch.equal(first[0], first[1])


def test_vae_has_the_wan_strides_and_latent_statistics():
    geometry = demo.DEMO_GEOMETRY
    from memflow_cli.decode import StreamingDecoder

    vae = demo.build_demo_vae()
    assert len(vae.config.latents_mean) == len(vae.config.latents_std) == geometry.latent_channels
    assert (vae.config.spatial_ratio, vae.config.temporal_ratio) == (8, 4)
    latents = torch.randn(1, geometry.latent_channels, 3, geometry.latent_height, geometry.latent_width)
    video = StreamingDecoder(vae).decode_z(latents)
    assert video.shape == (1, 3, geometry.video_frames(3), geometry.height, geometry.width)


def test_vae_is_seeded():
    first, second = demo.build_demo_vae(seed=0), demo.build_demo_vae(seed=0)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    other = demo.build_demo_vae(seed=1).state_dict()
    assert not torch.equal(first.state_dict()["decoder.conv_in.weight"], other["decoder.conv_in.weight"])


def test_the_demo_engine_warns_in_one_line_that_its_video_is_noise():
    with load_engine("demo", "cpu", compile=CompileChoice.fixed(False)) as engine:
        notice, identity = engine.notice, engine.identity
    assert notice is not None and "noise" in notice and "\n" not in notice
    assert identity["model"] == "demo"


def _built_from_the_global_rng(build, seed: int) -> dict[str, torch.Tensor]:
    """What the builders made before they had generators: the global RNG seeded, then the constructor."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().state_dict()


def test_the_demo_and_random_builders_draw_from_generators_the_same_weights_as_the_seeded_global_rng():
    from transformers import UMT5EncoderModel

    from memflow_cli.random_model import random_vae
    from memflow_cli.wan_vae import WanVAE, WanVAEConfig
    from memflow_cli.weights import WAN21_VAE_CONFIG

    narrow_vae = WanVAEConfig.from_diffusers({**WAN21_VAE_CONFIG, **demo.DEMO_VAE_NARROWING})
    wan21_vae = WanVAEConfig.from_diffusers(WAN21_VAE_CONFIG)
    encoder_config = demo.demo_text_encoder_config(len(demo.build_demo_tokenizer()))
    torch.manual_seed(1234)  # whatever the caller's stream is, it is neither read nor moved
    state = torch.random.get_rng_state()
    with load_engine("demo", "cpu", compile=CompileChoice.fixed(False)) as engine:  # its transformer, seed 0
        transformer = {name: tensor.float() for name, tensor in engine.transformer.state_dict().items()}
        engine.embeddings(["a lighthouse"])  # the demo text encoder built and run
    cases = [
        (lambda: demo.build_demo_vae(seed=3), lambda: WanVAE(narrow_vae), 3),
        (lambda: demo.build_demo_text_encoder(seed=3).encoder, lambda: UMT5EncoderModel(encoder_config), 3),
        (lambda: random_vae(torch.device("cpu"), torch.float32), lambda: WanVAE(wan21_vae), 0),
    ]
    built = [(build().state_dict(), _built_from_the_global_rng(before, seed)) for build, before, seed in cases]
    assert torch.equal(torch.random.get_rng_state(), state)
    for new, old in built:
        assert new.keys() == old.keys() and all(torch.equal(new[name], old[name]) for name in old)
    old_transformer = _built_from_the_global_rng(lambda: CausalWanTransformer(demo.DEMO_TRANSFORMER), 0)
    assert set(transformer) <= set(old_transformer)
    assert all(torch.equal(tensor, old_transformer[name].float()) for name, tensor in transformer.items())
