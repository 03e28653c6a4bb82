"""Checkpoint loading on tiny files in the real formats (spec §10): base.pt, PEFT lora.pt, Wan config.json."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

from memflow_cli import checkpoint
from memflow_cli.checkpoint import (
    MergeSource,
    load_transformer,
    merge_key,
    merge_lora,
    read_base_state,
    read_lora_state,
    read_transformer,
)
from memflow_cli.loading import WeightsError, read_transformer_config
from memflow_cli.merged_cache import MergedCache, MergedCacheSettings, MergeKey
from memflow_cli.model.cache import KVMemory, TextCache
from memflow_cli.model.transformer import CausalWanTransformer, PassState, rope_angles, rope_tables
from memflow_cli.settings import WAN_1_3B, LoraSettings, MemorySettings, TransformerConfig

CONFIG = TransformerConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, text_len=16, freq_dim=32)
CONFIG_JSON = {
    "_class_name": "WanModel",
    "_diffusers_version": "0.30.0",
    "model_type": "t2v",
    "dim": 64,
    "ffn_dim": 128,
    "num_heads": 2,
    "num_layers": 2,
    "text_dim": 32,
    "text_len": 16,
    "freq_dim": 32,
    "in_dim": 16,
    "out_dim": 16,
    "patch_size": [1, 2, 2],
    "eps": 1e-06,
    "window_size": [-1, -1],
    "qk_norm": True,
    "cross_attn_norm": True,
}
RANK = 4
LORA = LoraSettings(rank=RANK, alpha=8.0)  # scale alpha / rank = 2
# every Linear inside a block: (module, in features, out features)
LORA_MODULES = [(f"{attn}.{p}", 64, 64) for attn in ("self_attn", "cross_attn") for p in "qkvo"] + [
    ("ffn.0", 64, 128),
    ("ffn.2", 128, 64),
]


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in CausalWanTransformer(CONFIG).state_dict().items()}


@pytest.fixture(scope="module")
def lora_sd() -> dict[str, torch.Tensor]:
    """PEFT adapter state dict for the bare DiT; blocks.1.self_attn.q is hand-set for an exact check."""
    generator = torch.Generator().manual_seed(1)
    sd = {}
    for block in range(CONFIG.num_layers):
        for module, fan_in, fan_out in LORA_MODULES:
            prefix = f"base_model.model.blocks.{block}.{module}"
            sd[f"{prefix}.lora_A.weight"] = torch.randn(RANK, fan_in, generator=generator)
            sd[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, RANK, generator=generator)
    a = torch.zeros(RANK, 64)
    b = torch.zeros(64, RANK)
    a[0, 3] = 1.0
    a[2, 7] = -1.5
    b[5, 0] = 0.25
    b[9, 2] = 1.0
    sd["base_model.model.blocks.1.self_attn.q.lora_A.weight"] = a
    sd["base_model.model.blocks.1.self_attn.q.lora_B.weight"] = b
    return sd


def save_base(path: Path, state: dict[str, torch.Tensor], key: str = "generator", prefix: str = "model.") -> Path:
    torch.save({key: {prefix + k: v for k, v in state.items()}, "step": 1000}, path)
    return path


@pytest.fixture
def base(tmp_path, weights) -> Path:
    return save_base(tmp_path / "base.pt", weights)


@pytest.fixture
def config_json(tmp_path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIG_JSON))
    return path


def assert_state_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert sorted(state) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


# -- round trip --------------------------------------------------------------------------------------


def test_tiny_model_has_the_spec_tensor_list(weights):
    assert len(weights) == 2 * 27 + 15  # §10.2: 27 per block + 15 global
    assert weights["blocks.0.modulation"].shape == (1, 6, 64)
    assert weights["head.modulation"].shape == (1, 2, 64)
    assert weights["patch_embedding.weight"].shape == (64, 16, 1, 2, 2)


def test_load_round_trip(base, config_json, weights):
    model = load_transformer(base, config=config_json)
    assert model.config == CONFIG
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert_state_equal(model, weights)


def test_load_with_config_object_and_dtype(base, weights):
    model = load_transformer(base, config=CONFIG, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.equal(model.blocks[1].ffn[2].weight, weights["blocks.1.ffn.2.weight"].bfloat16())


@pytest.mark.parametrize("key", ["generator_ema", "model"])
def test_base_under_the_other_keys_the_official_loader_accepts(tmp_path, weights, key):
    path = save_base(tmp_path / "base.pt", weights, key=key)
    assert {k: v.tolist() for k, v in read_base_state(path).items()} == {k: v.tolist() for k, v in weights.items()}


def test_generator_wins_over_model(tmp_path, weights):
    path = tmp_path / "base.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in weights.items()}, "model": {"x": torch.zeros(1)}}, path)
    assert sorted(read_base_state(path)) == sorted(weights)


def test_read_base_state_strips_prefix(base, weights):
    state = read_base_state(base)
    assert sorted(state) == sorted(weights)
    assert "blocks.0.self_attn.q.weight" in state


@pytest.mark.parametrize(
    "fsdp",
    [
        lambda k: "model._fsdp_wrapped_module." + k.replace("blocks.0.", "blocks.0._fsdp_wrapped_module."),
        lambda k: "_fsdp_wrapped_module.model." + k,
    ],
    ids=["inner", "outer"],
)
def test_generator_ema_with_fsdp_infixes(tmp_path, weights, config_json, fsdp):
    ema = {fsdp(k): v + 1.0 for k, v in weights.items()}
    assert any("._fsdp_wrapped_module." in k or k.startswith("_fsdp") for k in ema)
    path = tmp_path / "ema.pt"
    torch.save({"generator_ema": ema, "critic": {"x": torch.zeros(1)}}, path)
    model = load_transformer(path, config=config_json)
    assert_state_equal(model, {k: v + 1.0 for k, v in weights.items()})


# -- LoRA --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrapped", [True, False], ids=["generator_lora", "raw"])
def test_lora_merge(tmp_path, base, config_json, weights, lora_sd, wrapped):
    path = tmp_path / "lora.pt"
    torch.save({"generator_lora": lora_sd, "critic_lora": {}, "step": 7} if wrapped else lora_sd, path)
    model = load_transformer(base, path, config_json, LORA)
    state = model.state_dict()

    # the hand-set module: 2 * B @ A has exactly two non-zero entries
    w = weights["blocks.1.self_attn.q.weight"]
    merged = state["blocks.1.self_attn.q.weight"]
    expected = w.clone()
    expected[5, 3] += 0.5  # 2 * B[5, 0] * A[0, 3] = 2 * 0.25 * 1
    expected[9, 7] += -3.0  # 2 * B[9, 2] * A[2, 7] = 2 * 1 * -1.5
    assert torch.equal(merged, expected)

    # every other adapted Linear: W + (alpha / rank) * B @ A
    for block in range(CONFIG.num_layers):
        for module, _, _ in LORA_MODULES:
            a = lora_sd[f"base_model.model.blocks.{block}.{module}.lora_A.weight"]
            b = lora_sd[f"base_model.model.blocks.{block}.{module}.lora_B.weight"]
            key = f"blocks.{block}.{module}.weight"
            torch.testing.assert_close(state[key], weights[key] + 2.0 * (b @ a), rtol=1e-5, atol=1e-5)
            assert not torch.equal(state[key], weights[key])

    # biases and everything outside the blocks' Linears are untouched
    adapted = {f"blocks.{i}.{m}.weight" for i in range(CONFIG.num_layers) for m, _, _ in LORA_MODULES}
    for key, tensor in weights.items():
        if key not in adapted:
            assert torch.equal(state[key], tensor), key


def test_read_lora_state_pairs(tmp_path, lora_sd):
    path = tmp_path / "lora.pt"
    torch.save(lora_sd, path)
    pairs = read_lora_state(path)
    assert len(pairs) == 20  # 10 Linears x 2 blocks
    a, b = pairs["blocks.0.ffn.2"]
    assert a.shape == (RANK, 128) and b.shape == (64, RANK)


def test_merge_rank_from_file_when_unset(weights, lora_sd, tmp_path):
    path = tmp_path / "lora.pt"
    torch.save(lora_sd, path)
    merged = merge_lora(weights, read_lora_state(path), LoraSettings(rank=None, alpha=2.0))  # scale 0.5
    assert merged["blocks.1.self_attn.q.weight"][5, 3] == weights["blocks.1.self_attn.q.weight"][5, 3] + 0.125


def test_lora_wrong_rank_setting(tmp_path, base, config_json, lora_sd):
    path = tmp_path / "lora.pt"
    torch.save({"generator_lora": lora_sd}, path)
    with pytest.raises(WeightsError, match="rank is 4 in the file but 256 in the settings") as err:
        load_transformer(base, path, config_json, LoraSettings())
    assert str(path) in str(err.value)


def test_lora_for_missing_module(tmp_path, base, config_json, lora_sd):
    sd = dict(lora_sd)
    sd["base_model.model.blocks.7.self_attn.q.lora_A.weight"] = torch.zeros(RANK, 64)
    sd["base_model.model.blocks.7.self_attn.q.lora_B.weight"] = torch.zeros(64, RANK)
    path = tmp_path / "lora.pt"
    torch.save(sd, path)
    with pytest.raises(WeightsError, match="blocks.7.self_attn.q") as err:
        load_transformer(base, path, config_json, LORA)
    assert "does not have" in str(err.value)
    assert str(path) in str(err.value)


def test_lora_shape_mismatch(tmp_path, base, config_json, lora_sd):
    sd = dict(lora_sd)
    sd["base_model.model.blocks.0.ffn.0.lora_B.weight"] = torch.zeros(64, RANK)  # ffn.0 is 128 x 64
    path = tmp_path / "lora.pt"
    torch.save(sd, path)
    with pytest.raises(WeightsError, match="do not fit"):
        load_transformer(base, path, config_json, LORA)


def test_lora_a_without_b(tmp_path, lora_sd):
    sd = dict(lora_sd)
    del sd["base_model.model.blocks.0.cross_attn.v.lora_B.weight"]
    path = tmp_path / "lora.pt"
    torch.save(sd, path)
    with pytest.raises(WeightsError, match="blocks.0.cross_attn.v.*lora_A but not its partner") as err:
        read_lora_state(path)
    assert str(path) in str(err.value)


def test_lora_unexpected_key_and_empty(tmp_path, lora_sd):
    path = tmp_path / "lora.pt"
    torch.save({**lora_sd, "base_model.model.blocks.0.self_attn.q.weight": torch.zeros(64, 64)}, path)
    with pytest.raises(WeightsError, match="unexpected key"):
        read_lora_state(path)
    torch.save({"generator_lora": {}}, path)
    with pytest.raises(WeightsError, match="no LoRA weights"):
        read_lora_state(path)


# -- file errors ---------------------------------------------------------------------------------------


def test_missing_files_are_named(tmp_path, base, config_json):
    missing = tmp_path / "nope" / "base.pt"
    with pytest.raises(WeightsError, match="file not found") as err:
        load_transformer(missing, config=config_json)
    assert str(missing) in str(err.value)
    assert err.value.path == missing
    missing_lora = tmp_path / "lora.pt"
    with pytest.raises(WeightsError, match="file not found") as err:
        load_transformer(base, missing_lora, config_json, LORA)
    assert err.value.path == missing_lora


def test_truncated_base_is_reported(tmp_path, base, config_json):
    data = base.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated") as err:
        load_transformer(truncated, config=config_json)
    assert str(truncated) in str(err.value)


def test_truncated_checkpoint_raising_oserror_is_reported(tmp_path):
    full = tmp_path / "full.pt"
    torch.save({"generator": {"model.a": torch.arange(10000, dtype=torch.float32).reshape(100, 100)}}, full)
    data = full.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated") as err:
        read_base_state(truncated)
    assert str(truncated) in str(err.value)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "base.pt"
    path.write_bytes(b"this is not a torch.save file")
    with pytest.raises(WeightsError, match="corrupt") as err:
        read_base_state(path)
    assert str(path) in str(err.value)


def test_base_without_generator_lists_found_keys(tmp_path, weights):
    path = tmp_path / "base.pt"
    torch.save({"critic": {"a": torch.zeros(1)}, "step": 3, "optimizer": {"b": torch.zeros(1)}}, path)
    with pytest.raises(WeightsError, match="found: critic, optimizer, step") as err:
        read_base_state(path)
    assert "'generator'" in str(err.value)
    assert str(path) in str(err.value)


def test_base_generator_not_a_state_dict(tmp_path):
    path = tmp_path / "base.pt"
    torch.save({"generator": [torch.zeros(1)]}, path)
    with pytest.raises(WeightsError, match="state dict of tensors"):
        read_base_state(path)


def test_missing_tensors(tmp_path, weights, config_json):
    state = {k: v for k, v in weights.items() if k != "blocks.1.ffn.2.bias"}
    path = save_base(tmp_path / "base.pt", state)
    with pytest.raises(WeightsError, match=r"missing 1 tensors \(e.g. blocks.1.ffn.2.bias\)") as err:
        load_transformer(path, config=config_json)
    assert str(path) in str(err.value)


def test_unexpected_tensors(tmp_path, weights, config_json):
    path = save_base(tmp_path / "base.pt", {**weights, "blocks.2.norm3.weight": torch.ones(64)})
    with pytest.raises(WeightsError, match=r"1 unexpected tensors \(e.g. blocks.2.norm3.weight\)"):
        load_transformer(path, config=config_json)


def test_more_layers_in_file_than_config(tmp_path, weights):
    with pytest.raises(WeightsError, match="unexpected"):
        load_transformer(save_base(tmp_path / "base.pt", weights), config=dataclasses.replace(CONFIG, num_layers=1))


def test_shape_mismatch_mentions_config(tmp_path, base):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**CONFIG_JSON, "ffn_dim": 96}))
    with pytest.raises(WeightsError, match="config") as err:
        load_transformer(base, config=path)
    message = str(err.value)
    assert "blocks.0.ffn.0" in message
    assert "(128, 64)" in message and "(96, 64)" in message
    assert str(base) in message


# -- config.json -------------------------------------------------------------------------------------


def test_read_transformer_config(config_json):
    assert read_transformer_config(config_json) == CONFIG
    assert read_transformer_config(None) == WAN_1_3B


def test_read_wan_1_3b_config(tmp_path):
    path = tmp_path / "config.json"
    wan = {
        "_class_name": "WanModel",
        "_diffusers_version": "0.30.0",
        "dim": 1536,
        "eps": 1e-06,
        "ffn_dim": 8960,
        "freq_dim": 256,
        "in_dim": 16,
        "model_type": "t2v",
        "num_heads": 12,
        "num_layers": 30,
        "out_dim": 16,
        "text_len": 512,
    }
    path.write_text(json.dumps(wan))
    assert read_transformer_config(path) == WAN_1_3B


def test_config_errors(tmp_path):
    missing = tmp_path / "config.json"
    with pytest.raises(WeightsError, match="file not found") as err:
        read_transformer_config(missing)
    assert err.value.path == missing

    bad = tmp_path / "bad.json"
    bad.write_text('{"dim": 64,')
    with pytest.raises(WeightsError, match="not valid JSON") as err:
        read_transformer_config(bad)
    assert str(bad) in str(err.value)

    with pytest.raises(WeightsError, match="a folder, not a file"):
        read_transformer_config(tmp_path)  # a directory

    array = tmp_path / "array.json"
    array.write_text("[1, 2]")
    with pytest.raises(WeightsError, match="JSON object"):
        read_transformer_config(array)

    i2v = tmp_path / "i2v.json"
    i2v.write_text(json.dumps({**CONFIG_JSON, "model_type": "i2v"}))
    with pytest.raises(WeightsError, match="t2v") as err:
        read_transformer_config(i2v)
    assert str(i2v) in str(err.value)

    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({**CONFIG_JSON, "num_heads": 3}))
    with pytest.raises(WeightsError, match="unusable transformer config"):
        read_transformer_config(odd)


def test_binary_config_is_reported(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"\xff\xfe\x00\x81binary")
    with pytest.raises(WeightsError, match="not valid JSON"):
        read_transformer_config(path)


def test_zero_heads_config_is_reported(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**CONFIG_JSON, "num_heads": 0}))
    with pytest.raises(WeightsError, match="unusable transformer config"):
        read_transformer_config(path)


# -- the merged-transformer cache ------------------------------------------------------------------------


def sequential_merge(state, lora, alpha):
    """The merge as memflow did it before it was cached: (W.float() + (B @ A) * scale).to(W.dtype)."""
    merged = dict(state)
    for module, (a, b) in lora.items():
        weight = merged[f"{module}.weight"]
        delta = (b.float() @ a.float()) * (alpha / a.shape[0])
        merged[f"{module}.weight"] = (weight.float() + delta).to(weight.dtype)
    return merged


@pytest.fixture
def lora_file(tmp_path, lora_sd) -> Path:
    path = tmp_path / "lora.pt"
    torch.save({"generator_lora": lora_sd}, path)
    return path


@pytest.fixture
def cache(tmp_path) -> MergedCache:
    return MergedCache(MergedCacheSettings(tmp_path / "merged"))


@pytest.mark.parametrize("alpha", [8.0, float(RANK)], ids=["scaled", "scale-1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_in_place_merge_equals_the_plain_float32_merge_bit_for_bit(weights, lora_file, dtype, alpha):
    base_state = {k: v.to(dtype) for k, v in weights.items()}
    lora = read_lora_state(lora_file)
    merged = merge_lora(base_state, lora, LoraSettings(rank=RANK, alpha=alpha))
    expected = sequential_merge(base_state, lora, alpha)
    assert sorted(merged) == sorted(expected)
    for name, tensor in expected.items():
        assert merged[name].dtype == dtype and torch.equal(merged[name], tensor), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_load_equals_the_uncached_load_and_the_plain_merge(monkeypatch, base, lora_file, weights, cache, dtype):
    expected = {k: v.to(dtype) for k, v in sequential_merge(weights, read_lora_state(lora_file), LORA.alpha).items()}
    uncached = read_transformer(base, lora_file, CONFIG, LORA, dtype=dtype)
    first = read_transformer(base, lora_file, CONFIG, LORA, dtype=dtype, cache=cache)
    assert (uncached.merge, first.merge) == (MergeSource.MERGED, MergeSource.MERGED_AND_CACHED)
    assert len(list(cache.folder.glob("*.safetensors"))) == 1

    def no_merge(*args, **kwargs):
        raise AssertionError("the second load merged again")

    monkeypatch.setattr(checkpoint, "merge_lora", no_merge)
    second = read_transformer(base, lora_file, CONFIG, LORA, dtype=dtype, cache=cache)
    assert second.merge is MergeSource.CACHED
    for loaded in (uncached, first, second):
        assert_state_equal(loaded.model, expected)


def test_a_damaged_cache_file_is_warned_about_merged_again_and_rewritten(caplog, base, lora_file, weights, cache):
    expected = sequential_merge(weights, read_lora_state(lora_file), LORA.alpha)
    read_transformer(base, lora_file, CONFIG, LORA, cache=cache)
    (path,) = cache.folder.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:-100])  # cut short
    with caplog.at_level(logging.WARNING, "memflow_cli.merged_cache"):
        damaged = read_transformer(base, lora_file, CONFIG, LORA, cache=cache)
    assert damaged.merge is MergeSource.MERGED_AND_CACHED
    (warning,) = caplog.records
    assert str(path) in warning.getMessage() and "merged again" in warning.getMessage()
    assert_state_equal(damaged.model, expected)
    caplog.clear()
    again = read_transformer(base, lora_file, CONFIG, LORA, cache=cache)
    assert again.merge is MergeSource.CACHED and not caplog.records
    assert_state_equal(again.model, expected)


def test_a_foreign_file_under_the_key_is_not_used(caplog, base, lora_file, cache):
    read_transformer(base, lora_file, CONFIG, LORA, cache=cache)
    (path,) = cache.folder.glob("*.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, path, metadata={"format": "something-else"})
    with caplog.at_level(logging.WARNING, "memflow_cli.merged_cache"):
        assert read_transformer(base, lora_file, CONFIG, LORA, cache=cache).merge is MergeSource.MERGED_AND_CACHED
    assert "not a memflow merged-transformer file" in caplog.records[0].getMessage()


def test_an_unwritable_cache_is_one_warning_and_the_load_goes_on(caplog, tmp_path, base, lora_file, weights):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    cache = MergedCache(MergedCacheSettings(blocker / "merged"))
    with caplog.at_level(logging.WARNING, "memflow_cli.merged_cache"):
        loaded = read_transformer(base, lora_file, CONFIG, LORA, cache=cache)
    assert loaded.merge is MergeSource.MERGED
    (warning,) = caplog.records
    assert "cannot write the merged-transformer cache" in warning.getMessage()
    assert_state_equal(loaded.model, sequential_merge(weights, read_lora_state(lora_file), LORA.alpha))


def test_the_key_changes_with_the_files_the_lora_settings_and_the_dtype(tmp_path, base, lora_file, weights):
    key = merge_key(base, lora_file, LORA, torch.bfloat16)
    other_base = save_base(tmp_path / "other.pt", {k: v + 1 for k, v in weights.items()})
    others = [
        merge_key(other_base, lora_file, LORA, torch.bfloat16),
        merge_key(base, base, LORA, torch.bfloat16),
        merge_key(base, lora_file, LoraSettings(rank=RANK, alpha=4.0), torch.bfloat16),
        merge_key(base, lora_file, LoraSettings(rank=None, alpha=LORA.alpha), torch.bfloat16),
        merge_key(base, lora_file, LORA, torch.float32),
        dataclasses.replace(key, merge=key.merge + 1),
    ]
    assert merge_key(base, lora_file, LORA, torch.bfloat16) == key
    assert len({key.file_name, *(other.file_name for other in others)}) == 1 + len(others)


def test_the_cache_keeps_the_most_recently_used_files(tmp_path, base, lora_file):
    cache = MergedCache(MergedCacheSettings(tmp_path / "merged", keep=1))
    read_transformer(base, lora_file, CONFIG, LORA, cache=cache)
    other = LoraSettings(rank=RANK, alpha=4.0)
    read_transformer(base, lora_file, CONFIG, other, cache=cache)
    assert [p.name for p in cache.folder.iterdir()] == [merge_key(base, lora_file, other, torch.float32).file_name]


def test_tensors_that_share_a_storage_are_cached_and_read_back(cache):
    whole = torch.arange(12.0)
    state = {"a": whole[:6], "b": whole[6:].view(2, 3)}  # views of one storage, as a checkpoint may hold
    key = MergeKey(base="0" * 64, lora="1" * 64, rank=RANK, alpha=8.0, dtype="float32")
    assert cache.put(key, state)
    read = cache.get(key, {"a": (6,), "b": (2, 3)}, torch.device("cpu"))
    assert torch.equal(read["a"], state["a"]) and torch.equal(read["b"], state["b"])


def test_with_a_cache_a_missing_file_is_still_named(tmp_path, base, cache):
    missing = tmp_path / "nope" / "lora.pt"
    with pytest.raises(WeightsError, match="file not found") as err:
        load_transformer(base, missing, CONFIG, LORA, cache=cache)
    assert err.value.path == missing


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_the_cached_bf16_load_equals_the_uncached_one_bit_for_bit(base, lora_file, cache):
    """The cache casts to bf16 on the CPU; the uncached load copies float32 to the GPU and casts there."""
    load = {"device": "cuda", "dtype": torch.bfloat16}
    uncached = read_transformer(base, lora_file, CONFIG, LORA, **load).model.state_dict()
    first = read_transformer(base, lora_file, CONFIG, LORA, cache=cache, **load)
    second = read_transformer(base, lora_file, CONFIG, LORA, cache=cache, **load)
    assert (first.merge, second.merge) == (MergeSource.MERGED_AND_CACHED, MergeSource.CACHED)
    for loaded in (first, second):
        state = loaded.model.state_dict()
        assert all(state[name].is_cuda and torch.equal(state[name], tensor) for name, tensor in uncached.items())


def test_merged_cache_settings_from_the_environment(tmp_path, caplog):
    environ = {"MEMFLOW_CACHE_DIR": str(tmp_path)}
    assert MergedCacheSettings.from_environment(environ) == MergedCacheSettings(tmp_path / "merged", 2)
    assert not MergedCacheSettings.from_environment({**environ, "MEMFLOW_MERGED_CACHE_FILES": "0"}).enabled
    with caplog.at_level(logging.WARNING, "memflow_cli.merged_cache"):
        assert MergedCacheSettings.from_environment({**environ, "MEMFLOW_MERGED_CACHE_FILES": "two"}).keep == 2
    assert "MEMFLOW_MERGED_CACHE_FILES='two'" in caplog.text


# -- the loaded model runs -----------------------------------------------------------------------------


def test_loaded_model_forward_matches_source_model(base, config_json, weights):
    torch.manual_seed(0)
    source = CausalWanTransformer(CONFIG).eval()
    source.load_state_dict(weights)
    loaded = load_transformer(base, config=config_json)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, 1, 16, 4, 4, generator=generator)  # one latent frame, 2 x 2 tokens
    context = torch.randn(1, CONFIG.text_len, CONFIG.text_dim, generator=generator)
    outputs = []
    for model in (source, loaded):
        memory = KVMemory(CONFIG, MemorySettings(window=2, sink=1, bank_size=1), 4, 1, 1, "cpu", torch.float32)
        text = TextCache(CONFIG, 1, "cpu", torch.float32)
        plan = memory.plan(0, 4)
        memory.begin(plan)
        rope = rope_tables(rope_angles(CONFIG, 0, 1, 2, 2, "cpu"), torch.float64)
        with torch.no_grad():
            model.embed_text(context, text)
            outputs.append(model(x, 1000.0, PassState(plan, memory, text, rope, 0, None)))
    assert outputs[0].shape == (1, 1, 16, 4, 4)
    assert torch.isfinite(outputs[0]).all()
    assert torch.equal(outputs[0], outputs[1])


def test_a_files_fingerprint_is_read_once_unless_it_changed_or_was_just_written(tmp_path):
    import os
    import time

    from memflow_cli.weights import identity

    path = tmp_path / "base.pt"
    path.write_bytes(b"a" * 3000)
    hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(hour_ago, hour_ago))
    first = identity.file_fingerprint(path)
    hits = identity._remembered_fingerprint.cache_info().hits
    assert identity.file_fingerprint(path) == first  # asked again (identity, cache key): not read again
    assert identity._remembered_fingerprint.cache_info().hits == hits + 1
    path.write_bytes(b"b" * 3000)  # the same size, written now: read at every ask
    changed = identity.file_fingerprint(path)
    assert changed != first
    path.write_bytes(b"c" * 3000)
    os.utime(path, ns=(hour_ago + 1, hour_ago + 1))  # an old file changed since: another version, read again
    assert identity.file_fingerprint(path) not in (first, changed)
