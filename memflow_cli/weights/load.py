"""Load the text encoder and the VAE of either layout; the original `.pth` files are converted on load.

The VAE is memflow's own decoder modules (`wan_vae.WanVAE`), read from a diffusers `vae/` folder or from an
original `Wan2.1_VAE.pth` converted by diffusers' own converter; the umT5 by the key map of spec §11.3. The
converted VAE is kept in memflow's cache (`merged_cache.CONVERTED_VAE`), so that later loads read its
decoder tensors as they are, without diffusers: diffusers is imported only to convert an original file
(its first load). transformers is imported when a text encoder is loaded, not with this module (`memflow
weights verify` needs neither).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..loading import (
    NOT_A_FILE_FIX,
    TOKENIZER_JSON_MAX_BYTES,
    TRUNCATED,
    WeightsError,
    error_words,
    not_a_file,
    read_json_config,
    read_json_file,
    read_torch_file,
)
from ..merged_cache import ConvertKey, MergedCache
from ..text_encoder import DEFAULT_MAX_LENGTH, TextEncoder, load_tokenizer
from ..wan_vae import WanVAE, WanVAEConfig
from .identity import file_fingerprint
from .locate import ModelFiles, weight_files

if TYPE_CHECKING:
    from transformers import UMT5Config, UMT5EncoderModel

# The Wan2.1 VAE (diffusers `AutoencoderKLWan` names); the original `Wan2.1_VAE.pth` has no config of its own.
WAN21_VAE_CONFIG: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "latents_mean": [
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    ],
    "latents_std": [
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    ],
}
# A VAE file's tensors by side: a decode reads the first; the second (the encoder's) are never read.
DECODE_PREFIXES = ("post_quant_conv.", "decoder.")
ENCODE_PREFIXES = ("quant_conv.", "encoder.")
_VAE_WEIGHTS_STEM = "diffusion_pytorch_model"  # a diffusers `vae/` folder's safetensors file (or index)


def load_vae(
    path: Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: dict[str, Any] | None = None,
    cache: MergedCache | None = None,
) -> WanVAE:
    """memflow's Wan2.1 VAE (the decode side) from a diffusers `vae/` folder, or from an original
    `Wan2.1_VAE.pth` converted by diffusers' Wan VAE converter; its tensors on `device` in `dtype`.

    `config` (diffusers `AutoencoderKLWan` arguments) applies to a single file only; default: Wan2.1. With
    `cache` (of `CONVERTED_VAE`), a single file's converted decoder tensors are read from it where they are
    there (no diffusers import), else the file is converted, checked whole and kept there: the same values
    either way. A file or config that is not the Wan2.1 VAE's is one `WeightsError` naming the file.
    """
    path, device = Path(path), torch.device(device)
    if path.is_dir():
        vae = _vae_from_folder(path, device, dtype)
    else:
        vae = _vae_from_original(path, config or WAN21_VAE_CONFIG, device, dtype, cache)
    return vae.eval().requires_grad_(False)


def vae_config(config: Mapping[str, Any], source: Path) -> WanVAEConfig:
    """The typed config of diffusers `AutoencoderKLWan` arguments; a WeightsError naming `source` if not Wan2.1's."""
    try:
        return WanVAEConfig.from_diffusers(config)
    except (ValueError, TypeError) as err:
        raise WeightsError(f"not a Wan2.1 VAE config: {err}", source) from None


def convert_key(path: Path, config: dict[str, Any], dtype: torch.dtype) -> ConvertKey:
    """The converted-VAE cache's key of an original VAE file converted with `config` to `dtype`."""
    return ConvertKey(
        vae=file_fingerprint(path), config=json.dumps(config, sort_keys=True, separators=(",", ":")),
        dtype=str(dtype).removeprefix("torch."), converter=version("diffusers"),
    )  # fmt: skip


def converted_vae_file(
    path: Path, dtype: torch.dtype, cache: MergedCache | None, config: dict[str, Any] | None = None
) -> Path:
    """The file a load of the VAE at `path` (`config`: Wan2.1's) reads: its converted weights where the cache
    has them."""
    path = Path(path)
    if cache is None or not path.is_file():
        return path
    cached = cache.path(convert_key(path, config or WAN21_VAE_CONFIG, dtype))
    return cached if cached.is_file() else path


def vae_needs_converter(
    path: Path, dtype: torch.dtype, cache: MergedCache | None, config: dict[str, Any] | None = None
) -> bool:
    """A load of the VAE at `path` (`config`: Wan2.1's) converts it (diffusers' converter, so diffusers is
    imported): an original file whose conversion is not in the cache."""
    path = Path(path)
    return path.is_file() and converted_vae_file(path, dtype, cache, config) == path


def _empty_vae(config: WanVAEConfig) -> WanVAE:
    """The modules without memory (meta tensors): the loaded tensors are assigned, nothing is initialised."""
    with torch.device("meta"):
        return WanVAE(config)


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


def _vae_from_folder(folder: Path, device: torch.device, dtype: torch.dtype) -> WanVAE:
    """A diffusers `vae/` folder: its config.json and its safetensors (one file, or an index and its shards);
    only the decoder's tensors are read, straight to `device`."""
    config_file = folder / "config.json"
    vae = _empty_vae(vae_config(read_json_config(config_file, "the VAE's config"), config_file))
    shards = [file for file in weight_files(folder, _VAE_WEIGHTS_STEM) if file.suffix == ".safetensors"]
    if not shards:
        raise WeightsError(f"no {_VAE_WEIGHTS_STEM}.safetensors (or its index and shards)", folder)
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for shard in shards:
        unexpected += _read_decode_tensors(shard, device, dtype, state)
    return _assigned(vae, state, folder, unexpected)


def _read_decode_tensors(
    path: Path, device: torch.device, dtype: torch.dtype, into: dict[str, torch.Tensor]
) -> list[str]:
    """The decode tensors of a safetensors file read into `into` (on `device`, in `dtype`); its names that are
    of neither side of a Wan VAE are returned."""
    from safetensors import SafetensorError, safe_open

    unexpected = []
    try:
        with safe_open(path, framework="pt", device=str(device)) as file:
            for name in file.keys():  # noqa: SIM118 - a safetensors file is no dict
                if name.startswith(DECODE_PREFIXES):
                    into[name] = file.get_tensor(name).to(dtype)
                elif not name.startswith(ENCODE_PREFIXES):
                    unexpected.append(name)
    except FileNotFoundError:
        raise WeightsError("file not found", path) from None
    except (OSError, SafetensorError) as err:  # a cut or garbled file; anything else (out of memory) is no file's fault
        raise WeightsError(f"{TRUNCATED} ({error_words(err)})", path) from None
    return unexpected


def _vae_from_original(
    path: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype, cache: MergedCache | None
) -> WanVAE:
    """An original VAE file: its converted decoder tensors read from `cache` (straight to `device`) where it has
    them, else converted by diffusers, checked whole against diffusers' VAE and written to the cache."""
    vae = _empty_vae(vae_config(config, path))
    key = convert_key(path, config, dtype) if cache is not None and path.is_file() else None
    if key is not None and (state := cache.get(key, _shapes(vae), device, unread=ENCODE_PREFIXES)) is not None:
        return _assigned(vae, state, path)
    state = _converted_vae(path, dtype)
    _check_converted(state, config, path)  # a file that does not fit is refused before it is kept
    if key is not None:
        cache.put(key, state)
    decode = {name: tensor.to(device) for name, tensor in state.items() if name.startswith(DECODE_PREFIXES)}
    return _assigned(vae, decode, path)


def _converted_vae(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """An original Wan VAE file's weights in diffusers' names (its converter), in `dtype`, on the CPU."""
    checkpoint = read_torch_file(path)  # before diffusers' import (seconds): a missing file says so at once
    while isinstance(checkpoint, dict) and "state_dict" in checkpoint:  # some exports nest the weights
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"holds a {type(checkpoint).__name__}, not a VAE's named tensors", path)
    others = sorted(str(key) for key, value in checkpoint.items() if not isinstance(value, torch.Tensor))
    if others:
        raise WeightsError(f"holds entries that are not tensors ({', '.join(others[:3])}): not a Wan VAE file", path)
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    return {key: tensor.to(dtype) for key, tensor in convert_wan_vae_to_diffusers(checkpoint).items()}


def _check_converted(state: Mapping[str, torch.Tensor], config: dict[str, Any], path: Path) -> None:
    """Every tensor of the converted file is one of diffusers' whole `AutoencoderKLWan` (encoder included), of
    its shape, and none is missing; else one WeightsError naming the file."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        whole = AutoencoderKLWan(**copy.deepcopy(config))
    _check_tensors(_shapes(whole), state, path, "AutoencoderKLWan")


def _assigned(vae: WanVAE, state: dict[str, torch.Tensor], path: Path, unexpected: Iterable[str] = ()) -> WanVAE:
    """`vae` with `state`'s tensors as its parameters (`_load_strict`)."""
    _load_strict(vae, state, path, assign=True, unexpected=unexpected)
    return vae


def _check_tensors(
    shapes: Mapping[str, tuple[int, ...]],
    state: Mapping[str, torch.Tensor],
    path: Path,
    model: str,
    unexpected: Iterable[str] = (),
) -> None:
    """`state` has exactly the tensors `shapes` names, of those shapes; else one WeightsError naming the file,
    the counts and the first few names. `unexpected`: more names of the file that fit no tensor."""
    missing = [name for name in shapes if name not in state]
    unexpected = [*unexpected, *(name for name in state if name not in shapes)]
    reshaped = [name for name in shapes if name in state and tuple(state[name].shape) != shapes[name]]
    if missing or unexpected or reshaped:
        problems = [f"missing {k}" for k in missing[:5]] + [f"unexpected {k}" for k in unexpected[:5]]
        problems += [f"{k} of shape {list(state[k].shape)}, not {list(shapes[k])}" for k in reshaped[:5]]
        raise WeightsError(
            f"does not match {model} ({len(missing)} missing, {len(unexpected)} unexpected keys, "
            f"{len(reshaped)} of another shape: {', '.join(problems)})", path,
        )  # fmt: skip


def load_text_encoder(
    files: ModelFiles,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> TextEncoder:
    """The tokenizer and umT5 encoder of either layout, on `device` in `dtype`."""
    _check_json_files(files.tokenizer_dir, files.text_encoder_dir if files.layout == "diffusers" else None)
    if files.layout == "diffusers":
        return TextEncoder.from_folders(files.tokenizer_dir, files.text_encoder_dir, device, dtype, max_length)
    tokenizer = load_tokenizer(files.tokenizer_dir)
    return TextEncoder(tokenizer, load_wan_t5(files.text_encoder_dir, device, dtype), max_length)


def _check_json_files(*folders: Path | None) -> None:
    """The JSON files transformers will read from the tokenizer's (and a diffusers text encoder's) folder, checked
    first as memflow reads JSON (`loading.read_json_file`): a WeightsError names a FIFO, a device, a file past its
    bound or nesting too deep, where transformers would block, read forever or fail with a traceback.
    `tokenizer.json` (16 MiB) is only checked to be a file of bounded size: its parser (Rust) has a depth limit."""
    for folder in folders:
        for path in sorted(folder.glob("*.json")) if folder is not None and folder.is_dir() else []:
            if path.name != "tokenizer.json":
                read_json_file(path)
            elif kind := not_a_file(path):
                raise WeightsError(f"{kind}: {NOT_A_FILE_FIX}", path)
            elif path.stat().st_size > TOKENIZER_JSON_MAX_BYTES:
                raise WeightsError(f"larger than {TOKENIZER_JSON_MAX_BYTES:,} bytes: {TRUNCATED}", path)


def load_wan_t5(
    path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16
) -> UMT5EncoderModel:
    """The original Wan `models_t5_umt5-xxl-enc-bf16.pth` as a transformers `UMT5EncoderModel`."""
    from transformers import UMT5EncoderModel

    original = read_torch_file(path)
    config = umt5_config_from_wan_t5(original)
    with torch.device("meta"):  # no second copy of the weights: the loaded tensors are assigned
        encoder = UMT5EncoderModel(config)
    _load_strict(encoder, convert_wan_t5_to_umt5(original), path, assign=True, tied=_UMT5_TIED)
    encoder.tie_weights()  # the stack's input embedding is `shared`, one tensor (2 GB at XXL size)
    return encoder.to(device=device, dtype=dtype).eval()


_UMT5_TIED = frozenset({"encoder.embed_tokens.weight"})  # tied to shared.weight

# Wan umT5 encoder names -> transformers UMT5EncoderModel names (spec §11.3): whole names, and the names of a
# block's weights (`blocks.N.<wan>.weight` <-> `encoder.block.N.<transformers>.weight`)
UMT5_NAMES = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
UMT5_BLOCK_NAMES = {
    "attn.q": "layer.0.SelfAttention.q", "attn.k": "layer.0.SelfAttention.k", "attn.v": "layer.0.SelfAttention.v",
    "attn.o": "layer.0.SelfAttention.o", "pos_embedding.embedding": "layer.0.SelfAttention.relative_attention_bias",
    "norm1": "layer.0.layer_norm", "ffn.gate.0": "layer.1.DenseReluDense.wi_0",
    "ffn.fc1": "layer.1.DenseReluDense.wi_1", "ffn.fc2": "layer.1.DenseReluDense.wo", "norm2": "layer.1.layer_norm",
}  # fmt: skip
_WAN_T5_BLOCK_WEIGHT = re.compile(r"blocks\.(\d+)\.(.+)\.weight")


def umt5_name(wan_name: str) -> str:
    """The transformers UMT5EncoderModel name of a Wan umT5 tensor; KeyError for a name the format has not."""
    if wan_name in UMT5_NAMES:
        return UMT5_NAMES[wan_name]
    if (match := _WAN_T5_BLOCK_WEIGHT.fullmatch(wan_name)) and match[2] in UMT5_BLOCK_NAMES:
        return f"encoder.block.{match[1]}.{UMT5_BLOCK_NAMES[match[2]]}.weight"
    raise KeyError(wan_name)


def convert_wan_t5_to_umt5(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Wan umT5 encoder state dict to transformers' UMT5EncoderModel names."""
    converted = {}
    for key, tensor in state.items():
        try:
            converted[umt5_name(key)] = tensor
        except KeyError:
            raise WeightsError(f"unexpected key {key!r} in the Wan umT5 checkpoint") from None
    return converted


def umt5_config_from_wan_t5(state: dict[str, torch.Tensor]) -> UMT5Config:
    """The UMT5 config of a Wan umT5 encoder state dict, read from its tensor shapes."""
    from transformers import UMT5Config

    try:
        vocab_size, d_model = state["token_embedding.weight"].shape
        num_buckets, num_heads = state["blocks.0.pos_embedding.embedding.weight"].shape
        inner_dim = state["blocks.0.attn.q.weight"].shape[0]
        d_ff = state["blocks.0.ffn.fc1.weight"].shape[0]
    except KeyError as err:
        raise WeightsError(f"not a Wan umT5 encoder checkpoint: no {err.args[0]!r}") from None
    num_layers = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    return UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=inner_dim // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=128,  # Wan's T5RelativeEmbedding max_dist; not in the state dict
        feed_forward_proj="gated-gelu",  # gelu with the tanh approximation, as Wan's GELU
        layer_norm_epsilon=1e-6,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def _load_strict(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    path: Path,
    assign: bool = False,
    tied: frozenset[str] = frozenset(),
    unexpected: Iterable[str] = (),
) -> None:
    """load_state_dict after `_check_tensors` (one WeightsError naming the file); `tied` may be missing;
    `unexpected`: more names of the file that fit no tensor."""
    shapes = {name: shape for name, shape in _shapes(module).items() if name not in tied or name in state}
    _check_tensors(shapes, state, path, type(module).__name__, unexpected)
    module.load_state_dict(state, strict=False, assign=assign)
