"""Hostile files and values around the weights: JSON nested too deep or no file at all (a FIFO, a device, a folder)
where a config should be, absurd sizes in a transformer config, cache bounds that are no number, option values
that are no number, and the messages a file of the wrong kind gets. Each is one `error:` line (or one warning) with
the README's exit code, at once: nothing waits on a FIFO or reads a device."""

from __future__ import annotations

import json
import logging
import os
import pickle
import threading
from pathlib import Path

import pytest

from memflow_cli.loading import CONFIG_MAX_BYTES, WeightsError, read_json_file, read_transformer_config
from memflow_cli.merged_cache import CONVERTED_VAE, DEFAULT_KEEP, KEEP_ENV, MergedCacheSettings
from memflow_cli.settings import LORA_ALPHA_MAX, LoraSettings, SettingsError
from memflow_cli.weights import load_text_encoder, resolve_model, verify
from memflow_cli.weights.locate import weight_files

from .cli_helpers import EXAMPLES, memflow

SCRIPT = EXAMPLES / "lighthouse.yaml"
WAN_CONFIG = {
    "_class_name": "WanModel", "model_type": "t2v", "dim": 64, "ffn_dim": 128, "num_heads": 2, "num_layers": 2,
    "freq_dim": 32, "text_dim": 32, "text_len": 512, "in_dim": 16, "out_dim": 16, "eps": 1e-06, "qk_norm": True,
    "cross_attn_norm": True, "patch_size": [1, 2, 2],
}  # fmt: skip
DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's JSON parser recurses


def weights_folder(root: Path) -> Path:
    """A weights folder in the official layout whose files are there (as `resolve_model` looks) but hold nothing
    loadable: what is tested is what happens before they are read."""
    wan = root / "Wan2.1-T2V-1.3B"
    (wan / "google" / "umt5-xxl").mkdir(parents=True)
    for name in ("base.pt", "lora.pt"):
        (root / name).write_bytes(b"not read")
    for name in ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth"):
        (wan / name).write_bytes(b"not read")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (wan / "google" / "umt5-xxl" / name).write_text("{}")
    (wan / "config.json").write_text(json.dumps(WAN_CONFIG))
    return root


def config_of(root: Path) -> Path:
    return root / "Wan2.1-T2V-1.3B" / "config.json"


def at_once(function, *args):
    """`function(*args)`, failing the test where it does not return within seconds (a FIFO waited on)."""
    outcome: list = []

    def call() -> None:
        try:
            outcome.append(function(*args))
        except Exception as error:  # noqa: BLE001 - handed to the test
            outcome.append(error)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), f"{function.__name__} blocked"
    return outcome[0]


def one_error_line(result, code: int) -> str:
    """The run's only stderr line, an `error:` line; the exit code as the README says."""
    assert result.exit_code == code, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "Traceback" not in result.stderr
    return line


# -- JSON files of the weights ----------------------------------------------------------------------------------


def test_a_config_nested_too_deep_is_one_line_from_verify_and_render(tmp_path):
    root = weights_folder(tmp_path / "w")
    config_of(root).write_text(DEEP)
    with pytest.raises(WeightsError, match="not valid JSON \\(nested too deeply to read\\)"):
        read_transformer_config(config_of(root))
    listed = memflow("weights", "verify", "--model", root)
    assert "FAIL transformer_config: not valid JSON (nested too deeply to read)" in listed.stdout
    line = one_error_line(memflow("render", SCRIPT, "--model", root, "--device", "cpu", "-o", tmp_path / "x.mp4"), 1)
    assert line.startswith(f"error: {config_of(root)}: not valid JSON (nested too deeply to read)")


@pytest.mark.parametrize("kind", ["fifo", "device", "folder", "dangling"])
def test_no_file_at_config_json_is_refused_not_taken_for_the_built_in_config(tmp_path, kind):
    root = weights_folder(tmp_path / "w")
    config = config_of(root)
    config.unlink()
    expected = {"fifo": "a named pipe (FIFO), not a file", "device": "a device, not a file",
                "folder": "a folder, not a file", "dangling": "file not found"}[kind]  # fmt: skip
    if kind == "fifo":
        os.mkfifo(config)
    elif kind == "device":
        config.symlink_to("/dev/zero")
    elif kind == "folder":
        config.mkdir()
    else:
        config.symlink_to(tmp_path / "nothing")
    assert resolve_model(root).transformer_config == config
    refused = at_once(read_transformer_config, config)
    assert isinstance(refused, WeightsError) and str(refused).startswith(f"{config}: {expected}")
    [row] = [result for result in at_once(verify, resolve_model(root)) if result.path == config]
    assert not row.ok and row.detail.startswith("a link to nothing" if kind == "dangling" else expected)


def test_a_json_file_past_its_bound_is_refused_unread(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(" " * CONFIG_MAX_BYTES + "{}")
    with pytest.raises(WeightsError, match=f"larger than {CONFIG_MAX_BYTES:,} bytes"):
        read_json_file(path)
    assert read_json_file(path, CONFIG_MAX_BYTES + 2) == {}


@pytest.mark.parametrize(
    ("index", "problem"),
    [
        (DEEP, "nested too deeply"),
        ('{"weight_map": ["model.safetensors"]}', "no `weight_map` of tensor names to shard files"),
        ('{"weight_map": {"a": "../../outside.safetensors"}}', "a shard named outside its folder"),
    ],
    ids=["deep", "no-map", "outside"],
)
def test_a_shard_index_that_is_no_index_is_named(tmp_path, index, problem):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(WeightsError, match=problem) as refused:
        weight_files(tmp_path, "model")
    assert str(refused.value).startswith(str(tmp_path / "model.safetensors.index.json"))


# -- sizes in a transformer config -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field", "rule"),
    [
        ({"dim": 10**12}, "'dim' is 1000000000000", "a whole number from 1 to 65,536"),
        ({"num_layers": -1}, "'num_layers' is -1", "a whole number from 1 to 1,024"),
        ({"num_heads": True}, "'num_heads' is true", "a whole number from 1 to 1,024"),
        ({"ffn_dim": 1.5}, "'ffn_dim' is 1.5", "a whole number from 1 to 262,144"),
        ({"dim": "big"}, "'dim' is 'big'", "a whole number from 1 to 65,536"),
        ({"eps": 0}, "'eps' is 0", "a number between 0 and 1, like 1e-06"),
        ({"patch_size": [1, 2]}, "'patch_size' is [1, 2]", "3 whole numbers from 1 to 64"),
        ({"qk_norm": "yes"}, "'qk_norm' is 'yes'", "true or false"),
    ],
)
def test_absurd_sizes_in_a_config_name_the_file_and_field(tmp_path, change, field, rule):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**WAN_CONFIG, **change}))
    with pytest.raises(WeightsError) as refused:
        read_transformer_config(path)
    assert str(refused.value) == f"{path}: unusable transformer config: the field {field}: it must be {rule}"


def test_a_nan_eps_and_an_overflowing_diffusers_config_are_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(WAN_CONFIG).replace("1e-06", "NaN"))  # JSON as Python writes it
    with pytest.raises(WeightsError, match="the field 'eps' is nan: it must be a number between 0 and 1"):
        read_transformer_config(path)
    diffusers = {"_class_name": "WanTransformer3DModel", "num_attention_heads": 2, "attention_head_dim": 10**9,
                 "ffn_dim": 128, "num_layers": 2, "freq_dim": 32, "text_dim": 32, "in_channels": 16,
                 "out_channels": 16, "patch_size": [1, 2, 2], "eps": 1e-6, "cross_attn_norm": True}  # fmt: skip
    path.write_text(json.dumps(diffusers))
    with pytest.raises(WeightsError, match="the field 'dim' is 2000000000: it must be a whole number"):
        read_transformer_config(path)
    del diffusers["ffn_dim"]
    path.write_text(json.dumps(diffusers))
    with pytest.raises(WeightsError, match="the field 'ffn_dim' is missing"):
        read_transformer_config(path)
    path.write_text(json.dumps({**diffusers, "num_attention_heads": [1], "attention_head_dim": 10**12}))
    with pytest.raises(WeightsError, match="'num_attention_heads' and 'attention_head_dim' must be whole numbers"):
        read_transformer_config(path)  # a list times 1e12 would take all memory


def test_a_huge_dim_is_one_line_from_render_not_an_overflow(tmp_path):
    root = weights_folder(tmp_path / "w")
    config_of(root).write_text(json.dumps({**WAN_CONFIG, "dim": 10**12}))
    result = memflow("render", SCRIPT, "--model", root, "--device", "cpu", "-o", tmp_path / "x.mp4")
    assert "the field 'dim' is 1000000000000" in one_error_line(result, 1)


# -- environment values -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["²", "-1", "1001", "9" * 5000, "nan", "1e3", "+2", "2.0", "٣"])
def test_a_merged_cache_count_that_is_no_whole_number_keeps_the_default(tmp_path, caplog, value):
    environ = {"MEMFLOW_CACHE_DIR": str(tmp_path), KEEP_ENV: value}
    with caplog.at_level(logging.WARNING, "memflow_cli.merged_cache"):
        settings = MergedCacheSettings.from_environment(environ, CONVERTED_VAE)
    assert settings.keep == DEFAULT_KEEP
    [record] = caplog.records
    assert record.getMessage().startswith(f"{KEEP_ENV}={value!r} is not a whole number of files (like 2, at most")
    assert MergedCacheSettings.from_environment({**environ, KEEP_ENV: "1000"}).keep == 1000


# -- option values ---------------------------------------------------------------------------------------------


def test_a_lora_alpha_past_a_million_is_refused_where_settings_are_made():
    assert LoraSettings(alpha=-LORA_ALPHA_MAX).alpha == -1e6
    with pytest.raises(SettingsError, match="must be from -1,000,000 to 1,000,000, got 1e\\+308"):
        LoraSettings(alpha=1e308)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "--lora-alpha '': not a number — give it like --lora-alpha 256"),
        (" 5", "--lora-alpha  5: not a number — give it like --lora-alpha 256"),
        ("٤", "--lora-alpha ٤: not a number — give it like --lora-alpha 256"),
        ("1e308", "--lora-alpha 1e308: give a number from -1,000,000 to 1,000,000"),
    ],
)
def test_a_lora_alpha_that_is_no_number_is_one_line_naming_the_option(tmp_path, value, message):
    result = memflow("render", SCRIPT, "--model", "demo", "-o", tmp_path / "x.mp4", "--lora-alpha", value)
    assert one_error_line(result, 2) == f"error: {message}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nan", "--memory-limit nan: not a number — give it like --memory-limit 24"),
        ("inf", "--memory-limit inf: not a number — give it like --memory-limit 24"),
        ("", "--memory-limit '': not a number — give it like --memory-limit 24"),
        ("-1", "--memory-limit -1: give a number from 0.5 to 4,096"),
        ("0.4", "--memory-limit 0.4: give a number from 0.5 to 4,096"),
        ("1e308", "--memory-limit 1e308: give a number from 0.5 to 4,096"),
    ],
)
def test_a_memory_limit_that_is_no_number_of_gib_is_one_line_naming_the_option(value, message):
    result = memflow("bench", "--model", "demo", "--device", "cpu", "--memory-limit", value)
    assert one_error_line(result, 2) == f"error: {message}"


# -- what a file of the wrong kind is called ----------------------------------------------------------------------


def test_a_model_option_naming_a_file_says_it_is_a_file(tmp_path):
    config = tmp_path / "wrongcfg.json"
    config.write_text(json.dumps(WAN_CONFIG))
    line = one_error_line(memflow("render", SCRIPT, "--model", config, "-o", tmp_path / "x.mp4"), 1)
    assert line.startswith(f"error: {config}: a file, not a weights folder; give the folder that holds base.pt")


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_decoder_weights_that_are_no_file_say_what_they_are(tmp_path, kind):
    weights = tmp_path / "taew2_1.pth"
    if kind == "fifo":
        os.mkfifo(weights)
    elif kind == "device":
        weights.symlink_to("/dev/zero")
    else:
        weights.mkdir()
    what = {"fifo": "a named pipe (FIFO)", "device": "a device", "folder": "a folder"}[kind]
    result = memflow("weights", "verify", "--decoder-weights", weights)
    assert f"{what}, not a file" in result.stdout + result.stderr and result.exit_code != 0
    line = one_error_line(memflow("render", SCRIPT, "--model", tmp_path, "--decoder-weights", weights,
                                  "-o", tmp_path / "x.mp4"), 2)  # fmt: skip
    assert line.startswith(f"error: {weights}: --decoder-weights: {what}, not a file; ")


def test_a_plain_pickle_or_a_text_at_base_pt_is_one_line_in_words(tmp_path):
    root = weights_folder(tmp_path / "w")
    with (root / "base.pt").open("wb") as file:
        pickle.dump({"weights": [1.0, 2.0]}, file, protocol=4)  # torch warns of its protocol before refusing it
    result = memflow("render", SCRIPT, "--model", root, "--device", "cpu", "-o", tmp_path / "x.mp4")
    line = one_error_line(result, 1)  # torch's UserWarning is not shown
    assert line.startswith(f"error: {root / 'base.pt'}: not a torch checkpoint (")
    (root / "base.pt").write_text("hello world")
    rows = {row.name: row for row in verify(resolve_model(root))}
    assert rows["base"].detail.endswith("(torch cannot read it: it starts with no pickle nor zip header)")
    assert "KeyError" not in rows["base"].detail


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"])
def test_tokenizer_json_that_transformers_would_choke_on_is_refused_first(tmp_path, name):
    root = weights_folder(tmp_path / "w")
    files = resolve_model(root)
    bad = files.tokenizer_dir / name
    if name == "tokenizer.json":
        bad.unlink()
        os.mkfifo(bad)  # transformers would wait on it for ever
    else:
        bad.write_text(DEEP)
    refused = at_once(load_text_encoder, files)
    assert isinstance(refused, WeightsError) and str(refused).startswith(f"{bad}: ")
    assert ("a named pipe (FIFO)" if name == "tokenizer.json" else "nested too deeply") in str(refused)
