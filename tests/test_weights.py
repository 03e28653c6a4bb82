"""Locating, checking and loading model files, on tiny files in the real formats, written by the tests.

The original-format files (`Wan2.1_VAE.pth`, `models_t5_umt5-xxl-enc-bf16.pth`) are made by renaming a tiny
diffusers/transformers model's state dict back to the original Wan names, with inverse maps written here
independently of the loader's own maps.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import UMT5EncoderModel

from memflow_cli import weights
from memflow_cli.cache_dir import cache_root
from memflow_cli.decode import StreamingDecoder
from memflow_cli.loading import read_transformer_config
from memflow_cli.merged_cache import CONVERTED_VAE, MergedCache, MergedCacheSettings
from memflow_cli.random_model import wan_vae_name
from memflow_cli.settings import WAN_1_3B
from memflow_cli.speed.compile_cache import CompileChoice
from memflow_cli.wan_vae import WanVAE, WanVAEConfig
from memflow_cli.weights import (
    TRUNCATED,
    WAN21_VAE_CONFIG,
    ModelFiles,
    WeightsError,
    download,
    load_text_encoder,
    load_vae,
    locate,
    resolve_model,
    verify,
    weights_identity,
)
from memflow_cli.weights import fetch as download_module
from memflow_cli.weights import load as load_module

TINY_VAE_CONFIG = {**WAN21_VAE_CONFIG, "base_dim": 4}  # keeps num_res_blocks 2: the converter's block indices
PROMPTS = ["a dog runs on the beach", "the knight rides toward the castle in the fog"]

WAN_DIFFUSERS_TRANSFORMER_CONFIG = {
    "_class_name": "WanTransformer3DModel",
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 8960,
    "freq_dim": 256,
    "image_dim": None,
    "in_channels": 16,
    "num_attention_heads": 12,
    "num_layers": 30,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "text_dim": 4096,
}
WAN_ORIGINAL_CONFIG = {"_class_name": "WanModel", "model_type": "t2v", "dim": 1536, "ffn_dim": 8960, "num_heads": 12,
                       "num_layers": 30, "freq_dim": 256, "text_len": 512, "in_dim": 16, "out_dim": 16}  # fmt: skip


# -- tiny models and their original-format state dicts ------------------------------------------------------


@pytest.fixture(scope="module")
def vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(**TINY_VAE_CONFIG).eval()


def original_vae_state(vae: AutoencoderKLWan) -> dict[str, torch.Tensor]:
    original = {wan_vae_name(k): v.clone() for k, v in vae.state_dict().items()}
    diffusers_only = ("blocks", "resnets", "mid_block", "conv_in", "conv_out", "norm_out", "quant_conv", "upsamplers")
    assert not [k for k in original if any(word in k for word in diffusers_only)]
    assert set(convert_wan_vae_to_diffusers(original)) == set(vae.state_dict())  # the inverse is exact
    return original


_T5_NAMES = {
    "0.SelfAttention.q": "attn.q",
    "0.SelfAttention.k": "attn.k",
    "0.SelfAttention.v": "attn.v",
    "0.SelfAttention.o": "attn.o",
    "0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
    "0.layer_norm": "norm1",
    "1.DenseReluDense.wi_0": "ffn.gate.0",
    "1.DenseReluDense.wi_1": "ffn.fc1",
    "1.DenseReluDense.wo": "ffn.fc2",
    "1.layer_norm": "norm2",
}


def wan_t5_state(encoder: UMT5EncoderModel) -> dict[str, torch.Tensor]:
    """transformers UMT5EncoderModel -> the key names of Wan's `models_t5_umt5-xxl-enc-bf16.pth`."""
    state = {}
    for key, value in encoder.state_dict().items():
        if key == "shared.weight":
            state["token_embedding.weight"] = value.clone()
        elif key == "encoder.final_layer_norm.weight":
            state["norm.weight"] = value.clone()
        elif m := re.fullmatch(r"encoder\.block\.(\d+)\.layer\.(.+)\.weight", key):
            state[f"blocks.{m[1]}.{_T5_NAMES[m[2]]}.weight"] = value.clone()
    return state


# -- folders in each layout -------------------------------------------------------------------------------


def write_checkpoints(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"generator": {"model.head.modulation": torch.randn(1, 2, 8)}}, folder / "base.pt")
    lora_key = "base_model.model.blocks.0.self_attn.q.lora_A.weight"
    torch.save({"generator_lora": {lora_key: torch.randn(4, 8)}}, folder / "lora.pt")


def write_diffusers_wan(root: Path, tokenizer, umt5, vae, shard: bool = False) -> Path:
    tokenizer.save_pretrained(root / "tokenizer")
    umt5.save_pretrained(root / "text_encoder", max_shard_size="40KB" if shard else "10GB")
    vae.save_pretrained(root / "vae")
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text(json.dumps(WAN_DIFFUSERS_TRANSFORMER_CONFIG))
    return root


def write_official(root: Path, tokenizer, umt5, vae) -> Path:
    write_checkpoints(root / "checkpoints")
    write_official_wan(root / "wan_models" / "Wan2.1-T2V-1.3B", tokenizer, umt5, vae)
    return root


def write_official_wan(wan: Path, tokenizer, umt5, vae) -> Path:
    """The files of `Wan-AI/Wan2.1-T2V-1.3B` that memflow uses, tiny."""
    tokenizer.save_pretrained(wan / "google" / "umt5-xxl")
    (wan / "google" / "umt5-xxl" / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    # the release's SentencePiece file, for size checks only: the demo tokenizer loads from its tokenizer.json
    (wan / "google" / "umt5-xxl" / "spiece.model").write_bytes(bytes(range(256)))
    torch.save({k: v.to(torch.bfloat16) for k, v in wan_t5_state(umt5).items()}, wan / weights.OFFICIAL_T5_FILE)
    torch.save(original_vae_state(vae), wan / weights.OFFICIAL_VAE_FILE)
    (wan / "config.json").write_text(json.dumps(WAN_ORIGINAL_CONFIG))
    return wan


def sizes_of(wan: Path) -> dict[str, int]:
    """A release-size table in the form of `weights.RELEASE_BYTES`, for the tiny files in `wan`."""
    return {name: (wan / name).stat().st_size for name in weights.RELEASE_BYTES}


@pytest.fixture
def local_folder(tmp_path, tokenizer, umt5, vae) -> Path:
    write_checkpoints(tmp_path)
    write_diffusers_wan(tmp_path / weights.WAN_DIFFUSERS_DIR, tokenizer, umt5, vae)
    return tmp_path


def fake_hub_snapshot(cache: Path, repo: str) -> Path:
    """An entry of the hub cache as huggingface_hub lays it out: refs/main -> snapshots/<commit>/."""
    commit = "1" * 40
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture
def hub_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "hf"


# -- resolve ----------------------------------------------------------------------------------------------


def test_resolves_a_local_folder_with_a_diffusers_subfolder(local_folder):
    files = resolve_model(local_folder)
    wan = local_folder / weights.WAN_DIFFUSERS_DIR
    assert files == ModelFiles(
        base=local_folder / "base.pt",
        lora=local_folder / "lora.pt",
        text_encoder_dir=wan / "text_encoder",
        tokenizer_dir=wan / "tokenizer",
        vae=wan / "vae",
        transformer_config=wan / "transformer" / "config.json",
    )
    assert files.layout == "diffusers"
    assert all(result.ok for result in verify(files)), verify(files)


def test_resolves_diffusers_subfolders_placed_directly_in_the_folder(tmp_path, tokenizer, umt5, vae):
    write_checkpoints(tmp_path)
    write_diffusers_wan(tmp_path, tokenizer, umt5, vae)
    files = resolve_model(str(tmp_path))
    assert files.vae == tmp_path / "vae" and files.text_encoder_dir == tmp_path / "text_encoder"


def test_resolves_the_official_memflow_layout(tmp_path, tokenizer, umt5, vae):
    write_official(tmp_path, tokenizer, umt5, vae)
    files = resolve_model(tmp_path)
    wan = tmp_path / "wan_models" / "Wan2.1-T2V-1.3B"
    assert files.layout == "official"
    assert files.base == tmp_path / "checkpoints" / "base.pt"
    assert files.text_encoder_dir == wan / "models_t5_umt5-xxl-enc-bf16.pth"
    assert files.vae == wan / "Wan2.1_VAE.pth" and files.tokenizer_dir == wan / "google" / "umt5-xxl"
    assert files.transformer_config == wan / "config.json"
    assert all(result.ok for result in verify(files, release_bytes=sizes_of(wan))), verify(files)


def test_the_official_files_win_over_an_older_diffusers_download(local_folder, tokenizer, umt5, vae):
    write_official_wan(local_folder / weights.WAN_DIR, tokenizer, umt5, vae)
    files = resolve_model(local_folder)
    assert files.layout == "official"
    assert files.vae == local_folder / "Wan2.1-T2V-1.3B" / "Wan2.1_VAE.pth"


def test_missing_files_are_named_with_the_download_command(local_folder):
    (local_folder / "lora.pt").unlink()
    shutil.rmtree(local_folder / weights.WAN_DIFFUSERS_DIR / "vae")
    with pytest.raises(WeightsError) as err:
        resolve_model(local_folder)
    message = str(err.value)
    assert str(local_folder / "lora.pt") in message
    assert "vae/config.json" in message and "vae/diffusion_pytorch_model.safetensors" in message
    assert "base.pt" not in message.replace(str(local_folder), "")
    assert f"memflow weights download --to {local_folder}" in message


def test_a_missing_shard_of_the_text_encoder_is_named(tmp_path, tokenizer, umt5, vae):
    write_checkpoints(tmp_path)
    wan = write_diffusers_wan(tmp_path / weights.WAN_DIFFUSERS_DIR, tokenizer, umt5, vae, shard=True)
    shards = sorted((wan / "text_encoder").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(WeightsError, match=re.escape(shards[-1].name)):
        resolve_model(tmp_path)


def test_a_folder_that_does_not_exist(tmp_path):
    with pytest.raises(WeightsError, match="no such weights folder"):
        resolve_model(tmp_path / "nowhere")


def test_resolves_the_official_files_in_the_hub_cache_under_hf_home(hub_home, tokenizer, umt5, vae):
    cache = hub_home / "hub"
    write_checkpoints(fake_hub_snapshot(cache, "KlingTeam/MemFlow"))
    wan = write_official_wan(fake_hub_snapshot(cache, "Wan-AI/Wan2.1-T2V-1.3B"), tokenizer, umt5, vae)
    write_diffusers_wan(fake_hub_snapshot(cache, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"), tokenizer, umt5, vae)
    files = resolve_model(None)
    assert files.base.parent.parent.parent == cache / "models--KlingTeam--MemFlow"
    assert files.layout == "official"
    assert files.vae == wan / "Wan2.1_VAE.pth" and files.tokenizer_dir == wan / "google" / "umt5-xxl"
    assert files.transformer_config == wan / "config.json"


def test_a_diffusers_download_in_the_hub_cache_still_serves(hub_home, tokenizer, umt5, vae):
    cache = hub_home / "hub"
    write_checkpoints(fake_hub_snapshot(cache, "KlingTeam/MemFlow"))
    wan = write_diffusers_wan(fake_hub_snapshot(cache, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"), tokenizer, umt5, vae)
    files = resolve_model(None)
    assert files.layout == "diffusers"
    assert files.vae == wan / "vae" and files.transformer_config == wan / "transformer" / "config.json"


def test_an_empty_hub_cache_lists_every_missing_piece(hub_home):
    with pytest.raises(WeightsError) as err:
        resolve_model(None)
    message = str(err.value)
    pieces = ["KlingTeam/MemFlow: base.pt", "KlingTeam/MemFlow: lora.pt"]
    pieces += [f"Wan-AI/Wan2.1-T2V-1.3B: {name}" for name in ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth")]
    for piece in [*pieces, "Wan-AI/Wan2.1-T2V-1.3B: google/umt5-xxl/*"]:
        assert piece in message
    assert "Diffusers" not in message
    assert str(hub_home / "hub") in message and "memflow weights download" in message


# -- download ---------------------------------------------------------------------------------------------


def test_download_offline_says_so_and_lists_what_is_missing(hub_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real = locate.hf_hub_download

    def local_only(*args, **kwargs):
        assert kwargs.get("local_files_only"), "no network access when offline"
        return real(*args, **kwargs)

    monkeypatch.setattr(locate, "hf_hub_download", local_only)
    monkeypatch.setattr(download_module, "hf_hub_download", local_only)
    with pytest.raises(WeightsError) as err:
        download()
    message = str(err.value)
    assert "HF_HUB_OFFLINE" in message and "base.pt" in message and "lora.pt" in message


def test_download_offline_with_everything_present_returns_the_files(local_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download(local_folder) == resolve_model(local_folder)


def test_download_network_failure_names_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")

    monkeypatch.setattr(download_module, "hf_hub_download", unreachable)
    with pytest.raises(WeightsError, match="could not download KlingTeam/MemFlow/base.pt") as err:
        download(tmp_path)
    assert "memflow weights download" in str(err.value)


OFFICIAL_PATTERNS = {"models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", "config.json", "google/umt5-xxl/*"}


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, tokenizer, umt5, vae) -> list[dict]:
    """huggingface_hub's two download functions, answering from tiny files; the list records every call."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    template = tmp_path / "hub-template"
    write_checkpoints(template / "KlingTeam/MemFlow")
    write_official_wan(template / "Wan-AI/Wan2.1-T2V-1.3B", tokenizer, umt5, vae)
    calls: list[dict] = []

    def destination(repo: str, cache_dir, local_dir) -> Path:
        """Where the hub puts a repo's files: the folder asked for, else the repo's snapshot in the cache."""
        if local_dir is not None:
            return Path(local_dir)
        snapshot = Path(cache_dir) / f"models--{repo.replace('/', '--')}" / "snapshots" / ("1" * 40)
        (snapshot.parent.parent / "refs").mkdir(parents=True, exist_ok=True)
        (snapshot.parent.parent / "refs" / "main").write_text("1" * 40)
        return snapshot

    def fake_file(repo, name, *, cache_dir=None, local_dir=None, **kwargs):
        if kwargs.get("local_files_only"):  # resolving the cache afterwards: what the fake put there
            path = destination(repo, cache_dir, None) / name
            if not path.is_file():
                raise LocalEntryNotFoundError(f"{name} is not cached")
            return str(path)
        calls.append({"repo": repo, "file": name, "cache_dir": cache_dir, "local_dir": local_dir})
        target = destination(repo, cache_dir, local_dir)
        target.mkdir(parents=True, exist_ok=True)
        return shutil.copy(template / repo / name, target / name)

    def fake_snapshot(repo, *, allow_patterns, cache_dir=None, local_dir=None, **kwargs):
        if kwargs.get("local_files_only"):
            path = destination(repo, cache_dir, None)
            if not path.is_dir():
                raise LocalEntryNotFoundError(f"{repo} is not cached")
            return str(path)
        calls.append({"repo": repo, "patterns": set(allow_patterns), "cache_dir": cache_dir, "local_dir": local_dir})
        return str(shutil.copytree(template / repo, destination(repo, cache_dir, local_dir), dirs_exist_ok=True))

    for module in (download_module, locate):  # downloading, then resolving what was downloaded
        monkeypatch.setattr(module, "hf_hub_download", fake_file)
        monkeypatch.setattr(module, "snapshot_download", fake_snapshot)
    return calls


def test_download_into_a_folder_fetches_the_official_files(tmp_path, fake_hub):
    files = download(tmp_path / "weights")
    assert files == resolve_model(tmp_path / "weights")
    assert files.layout == "official"
    wan = tmp_path / "weights" / "Wan2.1-T2V-1.3B"
    assert files.text_encoder_dir == wan / "models_t5_umt5-xxl-enc-bf16.pth" and files.vae == wan / "Wan2.1_VAE.pth"
    assert files.tokenizer_dir == wan / "google" / "umt5-xxl" and files.transformer_config == wan / "config.json"
    assert [(call["repo"], call.get("file")) for call in fake_hub] == [
        ("KlingTeam/MemFlow", "base.pt"),
        ("KlingTeam/MemFlow", "lora.pt"),
        ("Wan-AI/Wan2.1-T2V-1.3B", None),
    ]
    assert fake_hub[2]["patterns"] == OFFICIAL_PATTERNS  # not the 1.3B transformer, which base.pt replaces
    assert [call["local_dir"] for call in fake_hub] == [tmp_path / "weights"] * 2 + [wan]
    assert all(result.ok for result in verify(files, release_bytes=sizes_of(wan))), verify(files)


def test_download_into_the_hub_cache(hub_home, fake_hub):
    files = download()
    assert files == resolve_model(None) and files.layout == "official"
    assert {call["cache_dir"] for call in fake_hub} == {hub_home / "hub"}
    assert {call["local_dir"] for call in fake_hub} == {None}
    assert files.vae.parent.parent.parent == hub_home / "hub" / "models--Wan-AI--Wan2.1-T2V-1.3B"


# -- verify -----------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _failures(files: ModelFiles, release_bytes: dict[str, int] | None = None) -> dict[str, str]:
    results = verify(files) if release_bytes is None else verify(files, release_bytes=release_bytes)
    return {result.name: str(result) for result in results if not result.ok}


def test_verify_compares_each_released_file_with_its_size(tmp_path, tokenizer, umt5, vae):
    files = resolve_model(write_official(tmp_path, tokenizer, umt5, vae))
    wan = files.vae.parent
    sizes = sizes_of(wan)
    results = verify(files, release_bytes=sizes)
    assert all(result.ok for result in results)
    assert sum("size as released" in result.detail for result in results) == len(weights.RELEASE_BYTES)

    cut = files.text_encoder_dir.stat().st_size - 10
    with files.text_encoder_dir.open("r+b") as handle:
        handle.truncate(cut)
    (files.tokenizer_dir / "special_tokens_map.json").unlink()
    (files.transformer_config).write_text(json.dumps({**WAN_ORIGINAL_CONFIG, "note": "edited"}))
    failures = _failures(files, release_bytes=sizes)
    assert set(failures) == {"text_encoder", "tokenizer/special_tokens_map.json", "transformer_config"}
    short = f"short: {cut:,} of {sizes['models_t5_umt5-xxl-enc-bf16.pth']:,} bytes: {TRUNCATED}"
    assert short in failures["text_encoder"] and str(files.text_encoder_dir) in failures["text_encoder"]
    assert "missing: run `memflow weights download`" in failures["tokenizer/special_tokens_map.json"]
    assert "not the released file" in failures["transformer_config"]


def test_the_release_sizes_cover_every_wan_file_memflow_loads():
    """Sizes of `Wan-AI/Wan2.1-T2V-1.3B`: the encoder 11.4 GB, the VAE 508 MB, the tokenizer's four files."""
    assert weights.RELEASE_BYTES["models_t5_umt5-xxl-enc-bf16.pth"] == 11_361_920_418
    assert weights.RELEASE_BYTES["Wan2.1_VAE.pth"] == 507_609_880
    tokenizer = {name.removeprefix("google/umt5-xxl/") for name in weights.RELEASE_BYTES if name.startswith("google/")}
    assert tokenizer == {"spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert sum(weights.RELEASE_BYTES.values()) / 1e9 == pytest.approx(11.89, abs=0.01)


def test_verify_reports_a_truncated_pt_file_by_name(local_folder):
    files = resolve_model(local_folder)
    _truncate(files.base)
    failures = _failures(files)
    assert list(failures) == ["base"]
    assert TRUNCATED in failures["base"] and str(files.base) in failures["base"]
    assert TRUNCATED == "truncated or corrupt: re-run memflow weights download"


def test_verify_reports_a_truncated_safetensors_file_by_name(local_folder):
    files = resolve_model(local_folder)
    _truncate(files.vae / "diffusion_pytorch_model.safetensors")
    failures = _failures(files)
    assert list(failures) == ["vae/diffusion_pytorch_model.safetensors"]
    assert TRUNCATED in failures["vae/diffusion_pytorch_model.safetensors"]


def test_verify_reports_empty_files_and_bad_json(local_folder):
    files = resolve_model(local_folder)
    files.lora.write_bytes(b"")
    (files.tokenizer_dir / "tokenizer.json").write_text('{"version": ')
    failures = _failures(files)
    assert set(failures) == {"lora", "tokenizer/tokenizer.json"}
    assert "empty" in failures["lora"]


def test_verify_reports_a_truncated_original_pth(tmp_path, tokenizer, umt5, vae):
    files = resolve_model(write_official(tmp_path, tokenizer, umt5, vae))
    _truncate(files.vae)
    assert list(_failures(files, release_bytes={})) == ["vae"]
    with pytest.raises(WeightsError, match=re.escape(f"{files.vae}: {TRUNCATED}")):
        load_vae(files.vae)


# -- load -------------------------------------------------------------------------------------------------


def _decode(vae: WanVAE) -> torch.Tensor:
    latents = torch.randn(1, 16, 2, 2, 3, generator=torch.Generator().manual_seed(0))
    return StreamingDecoder(vae).decode_z(latents.to(vae.dtype))


def assert_decode_side_of(loaded: WanVAE, vae: AutoencoderKLWan) -> None:
    """memflow's VAE holds exactly diffusers' decoder and post_quant_conv tensors, bit for bit."""
    decode_side = {k: v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    got = loaded.state_dict()
    assert isinstance(loaded, WanVAE) and got.keys() == decode_side.keys()
    assert all(torch.equal(got[name], tensor) for name, tensor in decode_side.items())


def test_load_vae_from_a_diffusers_folder(tmp_path, vae):
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_vae(tmp_path / "vae", "cpu", torch.float32)
    assert_decode_side_of(loaded, vae)
    assert loaded.config == WanVAEConfig.from_diffusers(TINY_VAE_CONFIG) and not loaded.training


def test_load_vae_from_an_original_single_file(tmp_path, vae):
    torch.save(original_vae_state(vae), tmp_path / "Wan2.1_VAE.pth")
    loaded = load_vae(tmp_path / "Wan2.1_VAE.pth", "cpu", torch.float32, config=TINY_VAE_CONFIG)
    assert_decode_side_of(loaded, vae)
    assert list(loaded.config.latents_std) == WAN21_VAE_CONFIG["latents_std"]


def test_load_vae_refuses_a_single_file_that_does_not_match_the_config(tmp_path, vae):
    state = original_vae_state(vae)
    del state["decoder.head.2.weight"]
    torch.save(state, tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(WeightsError, match="1 missing"):
        load_vae(tmp_path / "Wan2.1_VAE.pth", config=TINY_VAE_CONFIG)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([1, 2], "holds a list, not a VAE's named tensors"),
        ({"epoch": 3}, r"holds entries that are not tensors \(epoch\)"),
    ],
    ids=["a-list", "a-number"],
)
def test_load_vae_refuses_a_single_file_that_holds_no_named_tensors_naming_it(tmp_path, content, message):
    torch.save(content, tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(WeightsError, match=message) as refused:
        load_vae(tmp_path / "Wan2.1_VAE.pth", config=TINY_VAE_CONFIG)
    assert str(refused.value).startswith(str(tmp_path / "Wan2.1_VAE.pth"))


def test_load_text_encoder_from_the_diffusers_layout(local_folder, tokenizer, umt5):
    from memflow_cli.text_encoder import TextEncoder

    expected = TextEncoder(tokenizer, umt5, max_length=32).encode(PROMPTS)
    loaded = load_text_encoder(resolve_model(local_folder), "cpu", torch.float32, max_length=32)
    torch.testing.assert_close(loaded.encode(PROMPTS), expected, rtol=0, atol=0)


def test_load_text_encoder_from_the_official_t5_pth(tmp_path, tokenizer, umt5, vae):
    from memflow_cli.text_encoder import TextEncoder

    files = resolve_model(write_official(tmp_path, tokenizer, umt5, vae))
    loaded = load_text_encoder(files, "cpu", torch.bfloat16, max_length=32)
    assert loaded.encoder.encoder.embed_tokens.weight is loaded.encoder.shared.weight  # one embedding, tied
    assert loaded.dtype == torch.bfloat16 and loaded.encoder.config.num_layers == 2
    expected = TextEncoder(tokenizer, UMT5EncoderModel(umt5.config).to(torch.bfloat16), max_length=32)
    expected.encoder.load_state_dict(umt5.state_dict())
    torch.testing.assert_close(loaded.encode(PROMPTS), expected.encode(PROMPTS), rtol=0, atol=0)


def test_t5_ffn_mapping_puts_gelu_on_the_wan_gate(umt5):
    """Wan's FFN is fc2(fc1(x) * gelu_tanh(gate(x))): gate.0 must become the gelu branch wi_0."""
    state = wan_t5_state(umt5)
    converted = UMT5EncoderModel(weights.umt5_config_from_wan_t5(state)).eval()
    converted.load_state_dict(weights.convert_wan_t5_to_umt5(state), strict=False)
    x = torch.randn(3, 32)
    gate, fc1, fc2 = (state[f"blocks.1.ffn.{name}.weight"] for name in ("gate.0", "fc1", "fc2"))
    wan = (x @ fc1.T * torch.nn.functional.gelu(x @ gate.T, approximate="tanh")) @ fc2.T
    with torch.no_grad():
        ours = converted.encoder.block[1].layer[1].DenseReluDense(x)
    torch.testing.assert_close(ours, wan)


def test_unknown_t5_keys_are_refused():
    with pytest.raises(WeightsError, match="unexpected key 'blocks.0.attn.x.weight'"):
        weights.convert_wan_t5_to_umt5({"blocks.0.attn.x.weight": torch.zeros(1)})


def test_transformer_config_from_either_naming(local_folder, tmp_path, tokenizer, umt5, vae):
    assert read_transformer_config(resolve_model(local_folder).transformer_config) == WAN_1_3B
    official = resolve_model(write_official(tmp_path / "official", tokenizer, umt5, vae))
    assert read_transformer_config(official.transformer_config) == WAN_1_3B


# -- identity ---------------------------------------------------------------------------------------------


def test_weights_identity_lists_every_file_with_a_fingerprint(local_folder):
    files = resolve_model(local_folder)
    identity = weights_identity(files)
    assert identity["layout"] == "diffusers"
    names = {entry["name"] for entry in identity["files"]}
    assert {"base.pt", "lora.pt", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"} <= names
    assert "text_encoder/model.safetensors" in names and "tokenizer/tokenizer.json" in names
    base = next(entry for entry in identity["files"] if entry["role"] == "base")
    assert base["size"] == files.base.stat().st_size and len(base["fingerprint"]) == 64
    assert weights_identity(files) == identity
    json.dumps(identity)


def test_fingerprint_sees_the_head_and_the_tail_of_large_files(tmp_path):
    path = tmp_path / "big.bin"
    data = bytearray(3 * (1 << 20))
    path.write_bytes(data)
    first = weights.file_fingerprint(path)
    data[-1] = 1
    path.write_bytes(data)
    assert weights.file_fingerprint(path) != first
    data[-1], data[len(data) // 2] = 0, 1  # the middle MiB is not read: a cheap fingerprint, not a checksum
    path.write_bytes(data)
    assert weights.file_fingerprint(path) == first


class _NotATensor:
    pass


def test_verify_tells_an_unsafe_pickle_from_a_truncated_file(local_folder):
    files = resolve_model(local_folder)
    torch.save({"generator": {}, "config": _NotATensor()}, files.base)
    failure = _failures(files)["base"]
    assert "weights_only" in failure and "_NotATensor" in failure and TRUNCATED not in failure


def test_load_vae_casts_a_single_file_to_the_requested_dtype(tmp_path, vae):
    torch.save(original_vae_state(vae), tmp_path / "Wan2.1_VAE.pth")
    loaded = load_vae(tmp_path / "Wan2.1_VAE.pth", "cpu", torch.bfloat16, config=TINY_VAE_CONFIG)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in loaded.parameters()) and not loaded.training


# -- the converted-VAE cache ------------------------------------------------------------------------------


def vae_cache(folder: Path) -> MergedCache:
    return MergedCache(MergedCacheSettings(folder / "vae", kind=CONVERTED_VAE))


def assert_same_weights(loaded: WanVAE, expected: WanVAE) -> None:
    """Every tensor of the two VAEs' state dicts equal, bit for bit and in dtype; none left on the meta device."""
    got, want = loaded.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in got.items():
        assert not tensor.is_meta and tensor.dtype == want[name].dtype, name
        assert torch.equal(tensor, want[name]), name


def no_conversion(*args, **kwargs):
    raise AssertionError("the VAE file was converted again instead of read from the cache")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_converted_vae_is_kept_and_read_back_bit_for_bit(tmp_path, vae, monkeypatch, dtype):
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(original_vae_state(vae), path)
    cache = vae_cache(tmp_path)
    converted = load_vae(path, "cpu", dtype, TINY_VAE_CONFIG)  # no cache: converted at every load
    first = load_vae(path, "cpu", dtype, TINY_VAE_CONFIG, cache)
    [kept] = cache.folder.glob("*.safetensors")
    assert weights.converted_vae_file(path, dtype, cache) == path  # keyed by the config too: Wan2.1's is not kept
    assert kept == cache.path(weights.convert_key(path, TINY_VAE_CONFIG, dtype))

    monkeypatch.setattr(load_module, "_converted_vae", no_conversion)
    second = load_vae(path, "cpu", dtype, TINY_VAE_CONFIG, cache)
    assert_same_weights(first, converted)
    assert_same_weights(second, converted)
    assert list(second.config.latents_std) == WAN21_VAE_CONFIG["latents_std"] and not second.training
    torch.testing.assert_close(_decode(second), _decode(converted), rtol=0, atol=0)


def test_a_changed_vae_file_is_converted_again_not_read_from_the_cache(tmp_path, vae):
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(original_vae_state(vae), path)
    cache = vae_cache(tmp_path)
    load_vae(path, "cpu", torch.float32, TINY_VAE_CONFIG, cache)
    torch.save({name: tensor + 1 for name, tensor in original_vae_state(vae).items()}, path)  # same names and size

    loaded = load_vae(path, "cpu", torch.float32, TINY_VAE_CONFIG, cache)
    assert_same_weights(loaded, load_vae(path, "cpu", torch.float32, TINY_VAE_CONFIG))
    assert torch.equal(loaded.decoder.conv_in.bias, vae.decoder.conv_in.bias + 1)
    assert len(list(cache.folder.glob("*.safetensors"))) == 2  # the new file's conversion kept beside the old


def test_a_damaged_converted_vae_file_is_warned_about_converted_again_and_rewritten(tmp_path, vae, caplog, monkeypatch):
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(original_vae_state(vae), path)
    cache = vae_cache(tmp_path)
    expected = load_vae(path, "cpu", torch.float32, TINY_VAE_CONFIG, cache)
    [kept] = cache.folder.glob("*.safetensors")
    kept.write_bytes(kept.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, "memflow_cli.merged_cache"):
        assert_same_weights(load_vae(path, "cpu", torch.float32, TINY_VAE_CONFIG, cache), expected)
    [warning] = caplog.records
    message = warning.getMessage()
    assert str(kept) in message and "converted-VAE" in message and "the VAE file is converted again" in message
    monkeypatch.setattr(load_module, "_converted_vae", no_conversion)  # written again: read from now on
    assert_same_weights(load_vae(path, "cpu", torch.float32, TINY_VAE_CONFIG, cache), expected)


def test_a_vae_file_that_does_not_fit_is_refused_and_not_kept(tmp_path, vae):
    state = original_vae_state(vae)
    del state["decoder.head.2.weight"]
    torch.save(state, tmp_path / "Wan2.1_VAE.pth")
    cache = vae_cache(tmp_path)
    with pytest.raises(WeightsError, match="1 missing"):
        load_vae(tmp_path / "Wan2.1_VAE.pth", config=TINY_VAE_CONFIG, cache=cache)
    assert not list(cache.folder.glob("*.safetensors"))


def test_the_converted_vae_cache_shares_the_merged_transformers_setting(tmp_path):
    environ = {"MEMFLOW_CACHE_DIR": str(tmp_path)}
    settings = MergedCacheSettings.from_environment(environ, kind=CONVERTED_VAE)
    assert settings == MergedCacheSettings(tmp_path / "vae", 2, CONVERTED_VAE)
    turned_off = {**environ, "MEMFLOW_MERGED_CACHE_FILES": "0"}
    assert not MergedCacheSettings.from_environment(turned_off, CONVERTED_VAE).enabled


def test_verify_calls_random_bytes_corrupt_not_unsafe(local_folder):
    files = resolve_model(local_folder)
    files.base.write_bytes(bytes(range(256)) * 20)  # neither a zip archive nor a pickle
    failure = _failures(files)["base"]
    assert "not a torch checkpoint" in failure and TRUNCATED in failure
    assert "weights_only" not in failure and "()" not in failure


# -- the engine on real-format files ------------------------------------------------------------------------


def write_runnable_official(root: Path, tokenizer, umt5, vae, monkeypatch) -> Path:
    """The official layout with a tiny transformer that fits the tiny umT5 (its config.json says so); the
    engine reads the tiny VAE with its config (the original file has none: the engine assumes Wan2.1's)."""
    real_load_vae = weights.load_vae
    monkeypatch.setattr(weights, "load_vae", lambda path, device, dtype, cache=None: real_load_vae(
        path, device, dtype, TINY_VAE_CONFIG, cache))
    from memflow_cli.demo import DEMO_TEXT_LEN, DEMO_TRANSFORMER
    from memflow_cli.model.transformer import CausalWanTransformer

    wan = write_official_wan(root / "wan_models" / "Wan2.1-T2V-1.3B", tokenizer, umt5, vae)
    config = {**{name: getattr(DEMO_TRANSFORMER, name) for name in ("dim", "ffn_dim", "num_heads", "num_layers",
              "freq_dim", "text_dim")}, "text_len": DEMO_TEXT_LEN, "model_type": "t2v"}  # fmt: skip
    (wan / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    state = CausalWanTransformer(DEMO_TRANSFORMER).state_dict()
    (root / "checkpoints").mkdir(parents=True)
    base = {"generator": {f"model.{name}": tensor for name, tensor in state.items()}}
    torch.save(base, root / "checkpoints" / "base.pt")
    q = "base_model.model.blocks.0.self_attn.q"
    lora = {f"{q}.lora_A.weight": torch.randn(2, 64), f"{q}.lora_B.weight": torch.randn(64, 2)}
    torch.save({"generator_lora": lora}, root / "checkpoints" / "lora.pt")
    return root


def test_the_weights_engine_encodes_while_loading_then_reads_its_prompts_from_the_cache(
    tmp_path, tokenizer, umt5, vae, monkeypatch
):
    from memflow_cli.engine import load_engine
    from memflow_cli.prompt_embeds import CACHED, ENCODED
    from memflow_cli.settings import LoraSettings

    root = write_runnable_official(tmp_path / "model", tokenizer, umt5, vae, monkeypatch)
    lora = LoraSettings(rank=2, alpha=2.0)
    expected = load_text_encoder(resolve_model(root), "cpu", torch.float32, max_length=256).encode(PROMPTS)
    with load_engine(str(root), "cpu", lora, prompts=PROMPTS) as engine:
        assert engine.prompts.encoder_loaded and engine.prompts.encoded_prompts == 2  # done while loading
        assert engine.identity["lora_merge"] == "merged, cached for the next load"
        embeds, sources = engine.prompts.take(PROMPTS)
    torch.testing.assert_close(embeds, expected, rtol=0, atol=0)
    assert sources == (ENCODED, ENCODED)
    assert len(list((cache_root() / "vae").glob("*.safetensors"))) == 1  # the converted VAE, kept

    monkeypatch.setattr(load_module, "_converted_vae", no_conversion)

    with load_engine(str(root), "cpu", lora, prompts=PROMPTS) as engine:  # the same files: the same cache entries
        embeds, sources = engine.prompts.take(PROMPTS)
        assert not engine.prompts.encoder_loaded
        assert engine.identity["lora_merge"] == "cached"  # the merged transformer read back, not merged again
    torch.testing.assert_close(embeds, expected, rtol=0, atol=0)
    assert sources == (CACHED, CACHED)

    t5 = root / "wan_models" / "Wan2.1-T2V-1.3B" / weights.OFFICIAL_T5_FILE
    torch.save({k: v + 1 for k, v in torch.load(t5, weights_only=True).items()}, t5)  # other weights, same names
    with load_engine(str(root), "cpu", lora, prompts=PROMPTS[:1]) as engine:
        assert engine.prompts.encoded_prompts == 1  # another text encoder: nothing of the old one's is used


def test_with_the_taehv_decoder_the_weights_engine_loads_no_vae(tmp_path, tokenizer, umt5, vae, monkeypatch):
    from memflow_cli.decoders import DecoderChoice, DecoderRequest
    from memflow_cli.engine import load_engine
    from memflow_cli.settings import LoraSettings
    from memflow_cli.tae import TAEW2_1, StreamingTaeDecoder, random_released_state

    root = write_runnable_official(tmp_path / "model", tokenizer, umt5, vae, monkeypatch)
    tae = tmp_path / "taew2_1.pth"
    torch.save({key: t.half() for key, t in random_released_state(TAEW2_1, seed=3).items()}, tae)
    monkeypatch.setattr(weights, "load_vae", no_conversion)  # the VAE is never read
    request = DecoderRequest(DecoderChoice.TAE, tae)
    with load_engine(str(root), "cpu", LoraSettings(rank=2, alpha=2.0), prompts=PROMPTS, decoder=request) as engine:
        assert engine.vae is None and engine.decoder is DecoderChoice.TAE
        assert isinstance(engine.streaming_decoder(), StreamingTaeDecoder)
        assert engine.prompts.encoded_prompts == 2  # the text encoder loads without diffusers' import before it
    assert not (cache_root() / "vae").exists()


def test_a_text_encoder_that_cannot_load_fails_the_engine_load_with_its_file_named(
    tmp_path, tokenizer, umt5, vae, monkeypatch
):
    from memflow_cli.engine import load_engine
    from memflow_cli.settings import LoraSettings

    root = write_runnable_official(tmp_path / "model", tokenizer, umt5, vae, monkeypatch)
    t5 = root / "wan_models" / "Wan2.1-T2V-1.3B" / weights.OFFICIAL_T5_FILE
    t5.write_bytes(t5.read_bytes()[:-100])
    with pytest.raises(WeightsError, match=re.escape(str(t5))):
        load_engine(str(root), "cpu", LoraSettings(rank=2, alpha=2.0), prompts=PROMPTS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_the_weights_engine_loads_on_three_threads_and_keeps_the_encoder_where_there_is_room(
    tmp_path, tokenizer, umt5, vae, monkeypatch
):
    from memflow_cli.engine import load_engine
    from memflow_cli.settings import LoraSettings

    root = write_runnable_official(tmp_path / "model", tokenizer, umt5, vae, monkeypatch)
    lora = LoraSettings(rank=2, alpha=2.0)
    expected = load_text_encoder(resolve_model(root), "cpu", torch.float32, max_length=256).encode(PROMPTS)
    with load_engine(str(root), "cuda", lora, compile=CompileChoice.fixed(False), prompts=PROMPTS) as engine:
        assert engine.prompts.encoder_loaded
        embeds = engine.embeddings(PROMPTS)
        assert engine.text_encoder.device.type == "cuda"  # a tiny encoder always fits beside a render
        assert next(engine.transformer.parameters()).device == engine.device
        assert next(engine.vae.parameters()).device == engine.device
    error = (embeds - expected).norm() / expected.norm()
    assert error < 3e-2  # bf16 on the GPU against float32 on the CPU
