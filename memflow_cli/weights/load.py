"""Load the text encoder and the VAE of either layout; the original `.pth` files are converted on load.

The VAE by diffusers' own converter, the umT5 by the key map of spec §11.3. The converted VAE can be kept in
memflow's cache (`merged_cache.CONVERTED_VAE`), so that later loads read it as it is. diffusers and
transformers are imported when a model is loaded, not with this module (`memflow weights verify` needs
neither); transformers' text-encoder modules only when a text encoder is loaded.
"""

from __future__ import annotations

import copy
import json
import re
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..loading import WeightsError, read_torch_file
from ..merged_cache import ConvertKey, MergedCache
from ..text_encoder import DEFAULT_MAX_LENGTH, TextEncoder, load_tokenizer
from .identity import file_fingerprint
from .locate import ModelFiles

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan
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


def load_vae(
    path: Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: dict[str, Any] | None = None,
    cache: MergedCache | None = None,
) -> AutoencoderKLWan:
    """A diffusers `vae/` folder, or an original `Wan2.1_VAE.pth` converted by diffusers' Wan VAE converter.

    `config` (diffusers `AutoencoderKLWan` arguments) applies to a single file only; default: Wan2.1. With
    `cache` (of `CONVERTED_VAE`), a single file's converted weights are read from it where they are there,
    else converted and kept there: the same values either way.
    """
    from diffusers import AutoencoderKLWan

    path = Path(path)
    if path.is_dir():
        vae = AutoencoderKLWan.from_pretrained(str(path), torch_dtype=dtype)
    else:
        vae = _vae_from_original(path, config or WAN21_VAE_CONFIG, torch.device(device), dtype, cache)
    # dtype is already right: diffusers' `to(dtype=...)` warns about fp32 modules even when there are none
    return vae.to(device).eval().requires_grad_(False)


def convert_key(path: Path, config: dict[str, Any], dtype: torch.dtype) -> ConvertKey:
    """The converted-VAE cache's key of an original VAE file converted with `config` to `dtype`."""
    return ConvertKey(
        vae=file_fingerprint(path), config=json.dumps(config, sort_keys=True, separators=(",", ":")),
        dtype=str(dtype).removeprefix("torch."), converter=version("diffusers"),
    )  # fmt: skip


def converted_vae_file(path: Path, dtype: torch.dtype, cache: MergedCache | None) -> Path:
    """The file a load of the Wan2.1 VAE at `path` reads: its converted weights where the cache has them."""
    if cache is None or not Path(path).is_file():
        return path
    cached = cache.path(convert_key(path, WAN21_VAE_CONFIG, dtype))
    return cached if cached.is_file() else path


def _vae_from_original(
    path: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype, cache: MergedCache | None
) -> AutoencoderKLWan:
    """What `AutoencoderKLWan.from_single_file` does, offline, and strict about missing keys; the converted
    weights read from `cache` (straight to `device`) where it has them, else converted and written to it."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):  # the converted tensors become the parameters: no random init, no copy
        vae = AutoencoderKLWan(**copy.deepcopy(config))
    key = convert_key(path, config, dtype) if cache is not None and path.is_file() else None
    if key is not None:
        shapes = {name: tuple(tensor.shape) for name, tensor in vae.state_dict().items()}
        if (state := cache.get(key, shapes, device)) is not None:
            _load_strict(vae, state, path, assign=True)
            return vae
    state = _converted_vae(path, dtype)
    _load_strict(vae, state, path, assign=True)  # a file that does not fit is refused before it is kept
    if key is not None:
        cache.put(key, state)
    return vae


def _converted_vae(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """An original Wan VAE file's weights in diffusers' names (its converter), in `dtype`, on the CPU."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    checkpoint = read_torch_file(path)
    while "state_dict" in checkpoint:  # some exports nest the weights, as diffusers allows
        checkpoint = checkpoint["state_dict"]
    return {key: tensor.to(dtype) for key, tensor in convert_wan_vae_to_diffusers(checkpoint).items()}


def load_text_encoder(
    files: ModelFiles,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> TextEncoder:
    """The tokenizer and umT5 encoder of either layout, on `device` in `dtype`."""
    if files.layout == "diffusers":
        return TextEncoder.from_folders(files.tokenizer_dir, files.text_encoder_dir, device, dtype, max_length)
    tokenizer = load_tokenizer(files.tokenizer_dir)
    return TextEncoder(tokenizer, load_wan_t5(files.text_encoder_dir, device, dtype), max_length)


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
) -> None:
    """load_state_dict that names missing and unexpected keys in one WeightsError; `tied` may be missing."""
    missing, unexpected = module.load_state_dict(state, strict=False, assign=assign)
    missing = [key for key in missing if key not in tied]
    if missing or unexpected:
        problems = [f"missing {k}" for k in missing[:5]] + [f"unexpected {k}" for k in unexpected[:5]]
        raise WeightsError(
            f"{path}: does not match {type(module).__name__} "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys: {', '.join(problems)})"
        )
