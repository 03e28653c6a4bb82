"""memflow's own Wan2.1 VAE decoder modules (`wan_vae.py`): diffusers' names and shapes, its config, its loads,
and the renders and loads that no longer import diffusers."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders import autoencoder_kl_wan
from safetensors.torch import load_file, save_file

from memflow_cli.demo import DEMO_VAE_NARROWING, build_demo_vae
from memflow_cli.merged_cache import CONVERTED_VAE, MergedCache, MergedCacheSettings
from memflow_cli.random_model import wan_vae_name
from memflow_cli.wan_vae import CausalConv3d, WanVAE, WanVAEConfig
from memflow_cli.weights import WAN21_VAE_CONFIG, WeightsError, convert_key, load_vae, vae_needs_converter

REPO = Path(__file__).resolve().parents[1]
TINY = {**WAN21_VAE_CONFIG, "base_dim": 4}  # num_res_blocks 2: the converter's block indices
DECODE_SIDE = ("decoder.", "post_quant_conv.")


def decode_side(vae: AutoencoderKLWan) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in vae.state_dict().items() if name.startswith(DECODE_SIDE)}


@pytest.fixture(scope="module")
def reference() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(**copy.deepcopy(TINY)).eval()


def _run(code: str, tmp_path: Path, timeout: int = 300) -> list[str]:
    """`python -c code` in a fresh process (this checkout's package, caches under tmp_path); its stdout lines."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "MEMFLOW_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                            env=environment, cwd=REPO)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


# -- the modules -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("narrowing", [{}, DEMO_VAE_NARROWING, {"base_dim": 8, "dim_mult": [1, 2, 2, 2]}])
def test_parameter_names_and_shapes_are_diffusers_decoder_and_post_quant_conv(narrowing) -> None:
    config = {**WAN21_VAE_CONFIG, **narrowing}
    with torch.device("meta"):
        theirs = AutoencoderKLWan(**copy.deepcopy(config))
        ours = WanVAE(WanVAEConfig.from_diffusers(config))
    expected = {name: tuple(tensor.shape) for name, tensor in decode_side(theirs).items()}
    assert {name: tuple(tensor.shape) for name, tensor in ours.state_dict().items()} == expected
    if not narrowing:
        assert len(expected) == 108  # Wan2.1's decode side


def test_the_wan21_config_derives_the_decoders_sizes() -> None:
    config = WanVAEConfig.from_diffusers(WAN21_VAE_CONFIG)
    assert config.decoder_dims == (384, 384, 384, 192, 96)
    assert config.temporal_upsample == (True, True, False)
    assert (config.spatial_ratio, config.temporal_ratio, config.z_dim) == (8, 4, 16)
    assert config.latents_std == tuple(WAN21_VAE_CONFIG["latents_std"])
    # a diffusers vae/config.json: its own keys skipped, the Wan2.1 defaults of newer diffusers accepted
    written = {"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.35.0", **WAN21_VAE_CONFIG,
               "is_residual": False, "patch_size": None, "in_channels": 3, "out_channels": 3,
               "scale_factor_spatial": 8, "scale_factor_temporal": 4}  # fmt: skip
    assert WanVAEConfig.from_diffusers(written) == config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"is_residual": True, "decoder_base_dim": 256}, "is_residual is true (the Wan2.2 VAE)"),
        ({"patch_size": 2}, "patch_size is 2 (frames patchified, Wan2.2)"),
        ({"out_channels": 12}, "out_channels is 12, not 3"),
        ({"scale_factor_spatial": 16}, "scale_factor_spatial is 16, but the stages give 8"),
        ({"latents_std": [1.0] * 8}, "latents_std has 8 values, not one per latent channel (16)"),
        ({"temperal_downsample": [True]}, "temperal_downsample has 1 entries; a VAE of 4 stages"),
        ({"attention_heads": 2}, "unknown field(s) attention_heads"),
        ({"decoder_base_dim": -8}, "decoder_base_dim is -8: it must be positive"),
        ({"decoder_base_dim": "eight"}, "decoder_base_dim is 'eight': not a number"),
        ({"dim_mult": 4}, "dim_mult is 4: not a number or list of numbers"),
    ],
)
def test_a_config_that_is_not_wan21_is_refused_naming_the_field(change, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        WanVAEConfig.from_diffusers({**WAN21_VAE_CONFIG, **change})


def test_a_config_without_a_size_is_refused_naming_it() -> None:
    config = {key: value for key, value in WAN21_VAE_CONFIG.items() if key != "z_dim"}
    with pytest.raises(ValueError, match="no z_dim: not a Wan VAE config"):
        WanVAEConfig.from_diffusers(config)


def test_a_causal_conv_computes_diffusers_causal_conv_over_a_whole_video() -> None:
    torch.manual_seed(0)
    theirs = autoencoder_kl_wan.WanCausalConv3d(4, 6, 3, padding=1).double()
    ours = CausalConv3d(4, 6, (3, 3, 3), (1, 1)).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 4, 5, 6, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


# -- loading ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sharded_diffusers_folder_loads_its_decode_side_in_the_dtype(tmp_path, reference, dtype) -> None:
    reference.save_pretrained(tmp_path / "vae", max_shard_size="20KB")
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = load_vae(tmp_path / "vae", "cpu", dtype)
    expected = {name: tensor.to(dtype) for name, tensor in decode_side(reference).items()}
    got = loaded.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[name], expected[name]) for name in expected)
    assert loaded.dtype == dtype and not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_a_wan22_folder_is_refused_in_one_line_naming_its_config(tmp_path, reference) -> None:
    reference.save_pretrained(tmp_path / "vae")
    config_file = tmp_path / "vae" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "is_residual": True}))
    with pytest.raises(WeightsError) as refused:
        load_vae(tmp_path / "vae")
    message = str(refused.value)
    assert message.startswith(f"{config_file}: not a Wan2.1 VAE config: is_residual is true") and "\n" not in message


def test_a_folder_with_missing_or_foreign_tensors_is_refused_naming_it(tmp_path, reference) -> None:
    reference.save_pretrained(tmp_path / "vae")
    weights_file = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights_file)
    del state["decoder.conv_out.weight"]
    state["decoder.extra.weight"] = torch.zeros(2)
    state["lora.weight"] = torch.zeros(2)
    save_file(state, weights_file)
    with pytest.raises(WeightsError, match=r"does not match WanVAE \(1 missing, 2 unexpected keys") as refused:
        load_vae(tmp_path / "vae")
    assert str(refused.value).startswith(f"{tmp_path / 'vae'}: ")
    assert "missing decoder.conv_out.weight" in str(refused.value)


def test_the_cache_reads_the_decode_side_and_leaves_the_encoder_unread(tmp_path, reference, caplog) -> None:
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save({wan_vae_name(name): tensor for name, tensor in reference.state_dict().items()}, path)
    cache = MergedCache(MergedCacheSettings(tmp_path / "cache" / "vae", kind=CONVERTED_VAE))
    assert vae_needs_converter(path, torch.float32, None) and vae_needs_converter(path, torch.float32, cache, TINY)
    load_vae(path, "cpu", torch.float32, TINY, cache)
    assert not vae_needs_converter(path, torch.float32, cache, TINY) and vae_needs_converter(path, torch.float32, None)
    assert vae_needs_converter(path, torch.bfloat16, cache, TINY)  # another dtype: another conversion
    key = convert_key(path, TINY, torch.float32)
    kept = load_file(cache.path(key))
    assert kept.keys() == reference.state_dict().keys()  # the whole converted file: encoder included
    shapes = {name: tuple(tensor.shape) for name, tensor in decode_side(reference).items()}
    state = cache.get(key, shapes, torch.device("cpu"), unread=("encoder.", "quant_conv."))
    assert state is not None and state.keys() == shapes.keys()
    with caplog.at_level(logging.WARNING, "memflow_cli.merged_cache"):
        assert cache.get(key, shapes, torch.device("cpu")) is None  # the encoder's tensors are not the model's
    assert "tensors that are not the model's" in caplog.text


# -- no diffusers import -----------------------------------------------------------------------------------------


def test_a_load_from_the_converted_cache_imports_no_diffusers(tmp_path, reference) -> None:
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save({wan_vae_name(name): tensor for name, tensor in reference.state_dict().items()}, path)
    cache = MergedCache(MergedCacheSettings(tmp_path / "cache" / "vae", kind=CONVERTED_VAE))
    first = load_vae(path, "cpu", torch.bfloat16, TINY, cache)  # converted by diffusers, kept
    out = tmp_path / "loaded.safetensors"
    code = (
        "import sys\nfrom pathlib import Path\nimport torch\nfrom safetensors.torch import save_file\n"
        "from memflow_cli.merged_cache import CONVERTED_VAE, MergedCache, MergedCacheSettings\n"
        "from memflow_cli.weights import load_vae, vae_needs_converter\n"
        f"config = {TINY!r}\n"
        f"cache = MergedCache(MergedCacheSettings(Path({str(cache.folder)!r}), kind=CONVERTED_VAE))\n"
        f"print(vae_needs_converter({str(path)!r}, torch.bfloat16, cache, config))\n"
        f"vae = load_vae({str(path)!r}, 'cpu', torch.bfloat16, config, cache)\n"
        f"save_file(vae.state_dict(), {str(out)!r})\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'diffusers'))\n"
    )  # fmt: skip
    assert _run(code, tmp_path)[-2:] == ["False", "[]"]
    loaded, expected = load_file(out), first.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[name], expected[name]) for name in expected)


def test_a_demo_render_with_the_wan_decoder_imports_no_diffusers(tmp_path) -> None:
    video = tmp_path / "x.mp4"
    story = REPO / "scripts_examples" / "lighthouse.yaml"
    code = (
        "import sys\nfrom memflow_cli.cli import app\n"
        f"app(['render', {str(story)!r}, '--model', 'demo', '--device', 'cpu', '--duration', '1.5s',"
        f" '-o', {str(video)!r}, '-q'], standalone_mode=False)\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'diffusers'))\n"
        "print('memflow_cli.tae.model' in sys.modules)\n"
    )  # fmt: skip
    assert _run(code, tmp_path)[-2:] == ["[]", "False"]  # the Wan VAE decoded it (not TAEHV), without diffusers
    assert video.stat().st_size > 0


def test_the_demo_vae_is_memflows_module() -> None:
    vae = build_demo_vae()
    assert isinstance(vae, WanVAE) and not vae.training
    assert vae.config == WanVAEConfig.from_diffusers({**WAN21_VAE_CONFIG, **DEMO_VAE_NARROWING})
