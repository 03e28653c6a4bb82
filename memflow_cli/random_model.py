"""The parts of `--model random` (`engine._random_engine`) that are not the transformer: a seeded VAE and
prompts as seeded noise.

Nothing is loaded or downloaded, so throughput (on one GPU or many) can be measured anywhere; the video is
noise and `RANDOM_NOTICE` says so on the terminal and in every sidecar. The weights come from fixed seeds,
so every process of a torchrun job builds the same model. By default the 5.7B-parameter text encoder is
not built: prompts become seeded random embeddings of the real encoder's shape (its cost is once per
prompt anyway). `random_text_encoder` builds it at full size, for measuring what a whole render needs.

`write_official_layout` (`python -m memflow_cli.random_model DIR`) writes full-size random files in the
official layout instead, so that a render's real loaders can be timed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import UMT5Config, UMT5EncoderModel

from .settings import WAN_1_3B, TransformerConfig
from .text_encoder import TextEncoder
from .wan_vae import WanVAE, WanVAEConfig
from .weights.load import UMT5_BLOCK_NAMES, UMT5_NAMES

RANDOM = "random"
# umT5-XXL's encoder as Wan2.1 releases it (`models_t5_umt5-xxl-enc-bf16.pth`): 5.7B parameters, 11.4 GB in bf16
UMT5_XXL = UMT5Config(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)  # fmt: skip

RANDOM_NOTICE = "random model: full-size random weights, nothing loaded - the video is noise, for speed measurements"


class NoiseTextEncoder:
    """Prompt -> [text_len, text_dim] random embeddings seeded by the prompt's text (same prompt, same rows).

    Shaped like umT5's output: a quarter of the rows carry values, the rest are padding zeros.
    """

    def __init__(self, text_len: int, text_dim: int):
        self.text_len, self.text_dim = text_len, text_dim

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return torch.stack([self._embedding(prompt) for prompt in prompts])

    def _embedding(self, prompt: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little")
        generator = torch.Generator().manual_seed(seed)
        embeds = torch.randn((self.text_len, self.text_dim), generator=generator) * 0.1
        embeds[self.text_len // 4 :] = 0
        return embeds

    def describe(self) -> str:
        return "none (prompts become seeded noise)"

    def to(self, device: torch.device | str) -> NoiseTextEncoder:
        return self

    def offload(self) -> NoiseTextEncoder:
        return self


def random_vae(device: torch.device, dtype: torch.dtype) -> WanVAE:
    """The Wan2.1 VAE's decode side with weights drawn from seed 0 (torch's default initialisation)."""
    from .seeding import drawing_from, seeded
    from .weights import WAN21_VAE_CONFIG

    with drawing_from(seeded(0)):  # the global RNG untouched
        vae = WanVAE(WanVAEConfig.from_diffusers(WAN21_VAE_CONFIG))
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def random_text_encoder(
    device: torch.device, dtype: torch.dtype, config: UMT5Config = UMT5_XXL, max_length: int = 512
) -> TextEncoder:
    """umT5 (umT5-XXL by default) with seeded random weights, built and left on `device`.

    The engine builds it on first need, as it loads the real encoder, and leaves it on the GPU or sends it
    to the CPU after encoding as it does the real one (`prompt_embeds.py`), so its memory is a real
    render's. The demo tokenizer stands in for umT5's (ids fit the vocabulary; prompts are padded to
    `max_length` tokens either way).
    """
    from .demo import build_demo_tokenizer

    with torch.device("meta"):
        encoder = UMT5EncoderModel(config).to(dtype)  # in `dtype` before memory is taken: no float32 copy
    encoder = encoder.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    for param in encoder.parameters():
        if param.dim() == 1:  # the RMS norms' weights
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=generator)
    encoder.tie_weights()  # the input embedding is `shared`, one tensor
    return TextEncoder(build_demo_tokenizer(), encoder, max_length=max_length)


# -- full-size files in the official layout ---------------------------------------------------------------------
#
# `write_official_layout(DIR)` writes what `memflow weights download --to DIR` would fetch, with random values:
#     DIR/base.pt, DIR/lora.pt,
#     DIR/Wan2.1-T2V-1.3B/{models_t5_umt5-xxl-enc-bf16.pth, Wan2.1_VAE.pth, config.json, google/umt5-xxl/}
# so that `memflow render --model DIR` reads, converts and merges them through exactly the loaders a real render
# uses (`weights.resolve_model`, `checkpoint.load_transformer`, `weights.load_text_encoder`, `weights.load_vae`).
# Tensors are drawn one at a time in bf16 (on the GPU where there is one) and saved with torch.save.


@dataclass(frozen=True)
class OfficialSizes:
    """The sizes of the files `write_official_layout` writes: the release's, or tiny ones for tests."""

    transformer: TransformerConfig = WAN_1_3B
    text_encoder: UMT5Config = field(default_factory=lambda: UMT5_XXL)
    lora_rank: int = 256  # as released (`memflow render --lora-rank` defaults to it)


def tiny_official_sizes() -> OfficialSizes:
    """A transformer and text encoder small enough for a CPU test (the VAE keeps the Wan2.1 size: its file
    has no config, so the loader assumes Wan2.1's)."""
    transformer = TransformerConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, text_dim=32)
    text_encoder = UMT5Config(
        vocab_size=512, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return OfficialSizes(transformer, text_encoder)  # the LoRA keeps the released rank, which render expects


class _Draw:
    """Random bf16 tensors, one at a time, drawn on `device` from one seeded generator, returned on the CPU."""

    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        if _is_norm_weight(name):  # the norms' scales: ones, as initialised
            return torch.ones(shape, dtype=dtype)
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        return tensor.normal_(0.0, 0.02, generator=self.generator).cpu()


def _is_norm_weight(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] == "gamma" or (parts[-1] == "weight" and len(parts) > 1 and "norm" in parts[-2])


def _shapes(module_class, *args, **kwargs) -> dict[str, tuple[int, ...]]:
    """The state dict's tensor names and shapes of a module, built on the meta device (no memory)."""
    with torch.device("meta"):
        module = module_class(*args, **kwargs)
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


def write_official_layout(folder: Path, sizes: OfficialSizes | None = None, device: torch.device | None = None) -> Path:
    """Write random model files in the official layout into `folder` (created); returns it.

    At the release's size (the default) that is about 15.9 GB: base.pt 2.8 GB and lora.pt 0.2 GB (bf16), the
    umT5-XXL encoder 11.4 GB (bf16, as released), the VAE 0.5 GB (float32, as released), a config.json and a
    small umT5-style tokenizer.
    """
    from .model.transformer import PLAIN_KERNELS, CausalWanTransformer
    from .weights import OFFICIAL_T5_FILE, OFFICIAL_VAE_FILE, WAN_DIR

    sizes = sizes or OfficialSizes()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    draw = _Draw(device)
    wan = folder / WAN_DIR
    (wan / "google" / "umt5-xxl").mkdir(parents=True, exist_ok=True)
    # 1. the MemFlow transformer: base.pt (original Wan names under "generator" / "model.") and its LoRA
    transformer = _shapes(CausalWanTransformer, sizes.transformer, PLAIN_KERNELS)
    base = {f"model.{name}": draw(name, shape) for name, shape in transformer.items()}
    torch.save({"generator": base}, folder / "base.pt")
    del base
    torch.save({"generator_lora": _lora_state(transformer, sizes.lora_rank, draw)}, folder / "lora.pt")
    # 2. Wan2.1's files: config, umT5 encoder (Wan names), VAE (Wan names), tokenizer
    (wan / "config.json").write_text(json.dumps(_wan_config(sizes.transformer), indent=2), encoding="utf-8")
    text_encoder = _shapes(UMT5EncoderModel, sizes.text_encoder)
    t5 = {t5_name: draw(name, shape) for name, shape in text_encoder.items() if (t5_name := wan_t5_name(name))}
    torch.save(t5, wan / OFFICIAL_T5_FILE)
    del t5
    torch.save(_vae_state(draw), wan / OFFICIAL_VAE_FILE)
    write_umt5_tokenizer(wan / "google" / "umt5-xxl")
    return folder


def _lora_state(transformer: dict[str, tuple[int, ...]], rank: int, draw: _Draw) -> dict[str, torch.Tensor]:
    """A PEFT LoRA pair (A [rank, in], B [out, rank]) for every Linear of the blocks (2-D weights there)."""
    state = {}
    for name, shape in transformer.items():
        if name.startswith("blocks.") and name.endswith(".weight") and len(shape) == 2:
            module = name.removesuffix(".weight")
            state[f"base_model.model.{module}.lora_A.weight"] = draw(module, (rank, shape[1]))
            state[f"base_model.model.{module}.lora_B.weight"] = draw(module, (shape[0], rank))
    return state


def _wan_config(config: TransformerConfig) -> dict[str, object]:
    """The transformer's `config.json` in the release's (original Wan) naming."""
    keys = ("dim", "ffn_dim", "num_heads", "num_layers", "freq_dim", "text_dim", "text_len", "in_dim", "out_dim",
            "eps", "qk_norm", "cross_attn_norm")  # fmt: skip
    return {"_class_name": "WanModel", "model_type": "t2v", **{key: getattr(config, key) for key in keys},
            "patch_size": list(config.patch_size)}  # fmt: skip


# transformers UMT5EncoderModel names -> the Wan umT5 names: `weights.load`'s names, the other way round
_WAN_T5_NAMES = {umt5: wan for wan, umt5 in UMT5_NAMES.items()}
_WAN_T5_BLOCK_NAMES = {umt5: wan for wan, umt5 in UMT5_BLOCK_NAMES.items()}


def wan_t5_name(name: str) -> str | None:
    """The Wan umT5 file's name of a transformers UMT5EncoderModel tensor; None for the tied input embedding."""
    if name in _WAN_T5_NAMES:
        return _WAN_T5_NAMES[name]
    if match := re.fullmatch(r"encoder\.block\.(\d+)\.(.+)\.weight", name):
        return f"blocks.{match[1]}.{_WAN_T5_BLOCK_NAMES[match[2]]}.weight"
    if name == "encoder.embed_tokens.weight":
        return None
    raise KeyError(name)


_VAE_RESNET_NAMES = {
    "norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
    "norm2.gamma": "residual.3.gamma", "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
    "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias",
}  # fmt: skip
_VAE_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
_VAE_ENDS = (("conv_in.", "conv1."), ("conv_out.", "head.2."), ("norm_out.", "head.0."))


def wan_vae_name(name: str) -> str:
    """The `Wan2.1_VAE.pth` name of a diffusers AutoencoderKLWan tensor (Wan2.1: 4 stages, 2 res blocks)."""
    module, _, param = name.rpartition(".")
    if module in _VAE_TOP:
        return f"{_VAE_TOP[module]}.{param}"
    side, rest = name.split(".", 1)
    for new, old in _VAE_ENDS:
        if rest.startswith(new):
            return f"{side}.{old}{rest[len(new) :]}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", rest):
        return f"{side}.middle.{2 * int(match[1])}.{_VAE_RESNET_NAMES[match[2]]}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
        return f"{side}.middle.1.{match[1]}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest):
        return f"{side}.downsamples.{match[1]}.{_VAE_RESNET_NAMES.get(match[2], match[2])}"
    if match := re.fullmatch(r"up_blocks\.(\d)\.resnets\.(\d)\.(.+)", rest):
        return f"{side}.upsamples.{4 * int(match[1]) + int(match[2])}.{_VAE_RESNET_NAMES[match[3]]}"
    if match := re.fullmatch(r"up_blocks\.(\d)\.upsamplers\.0\.(.+)", rest):
        return f"{side}.upsamples.{4 * int(match[1]) + 3}.{match[2]}"
    raise KeyError(name)


def _vae_state(draw: _Draw) -> dict[str, torch.Tensor]:
    from diffusers import AutoencoderKLWan

    from .weights import WAN21_VAE_CONFIG

    shapes = _shapes(AutoencoderKLWan, **copy.deepcopy(WAN21_VAE_CONFIG))
    # float32, as the released file is (507 MB)
    return {wan_vae_name(name): draw(name, shape, torch.float32) for name, shape in shapes.items()}


# A small vocabulary for the tokenizer: its ids must only be valid for the encoder (values are random anyway).
_TOKENIZER_TEXT = (
    "a wide aerial view of a white lighthouse on a rocky cliff at sunset waves breaking on the rocks below "
    "seagulls circling in the golden light cinematic smooth camera motion the old keeper a grey bearded man "
    "in a navy wool sweater climbs the spiral staircase holding an oil lamp warm light on the stone walls "
    "at the top he lights the great lamp its beam sweeps across the dark sea as the first stars appear"
)
_UMT5_SPECIAL = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}  # ids 0, 1, 2
_UMT5_SENTINELS = 100


def write_umt5_tokenizer(folder: Path) -> None:
    """`google/umt5-xxl/` in the release's format (a SentencePiece unigram model, its `tokenizer.json`, a
    `T5Tokenizer` config with 100 `<extra_id_N>` tokens), trained here on a few sentences: pad 0, EOS 1, unk 2."""
    import io

    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    folder.mkdir(parents=True, exist_ok=True)
    words = _TOKENIZER_TEXT.split()
    sentences = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="unigram", vocab_size=160,
        hard_vocab_limit=False, character_coverage=1.0, normalization_rule_name="identity", pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", num_threads=1, minloglevel=2,
    )  # fmt: skip
    (folder / "spiece.model").write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    sentinels = [f"<extra_id_{i}>" for i in range(_UMT5_SENTINELS)]
    tokenizer.add_special_tokens([AddedToken(token, normalized=False) for token in _UMT5_SPECIAL.values()])
    tokenizer.add_special_tokens([AddedToken(token, normalized=False) for token in reversed(sentinels)])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": _UMT5_SENTINELS, "additional_special_tokens": sentinels,
              **_UMT5_SPECIAL, "model_max_length": 512, "sp_model_kwargs": {}}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {**_UMT5_SPECIAL, "additional_special_tokens": sentinels}
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """`python -m memflow_cli.random_model DIR [--tiny] [--device D]`: write random files in the official layout."""
    import argparse
    import time

    parser = argparse.ArgumentParser(prog="python -m memflow_cli.random_model", description=main.__doc__)
    parser.add_argument("folder", type=Path, help="where to write them (created)")
    parser.add_argument("--tiny", action="store_true", help="a tiny transformer and text encoder (tests, CPU)")
    parser.add_argument("--device", default=None, help="where to draw the values (default: cuda if present)")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder that holds files already")
    args = parser.parse_args(argv)
    if args.folder.exists() and (not args.folder.is_dir() or any(args.folder.iterdir())) and not args.overwrite:
        print(f"error: {args.folder} is not an empty folder: random weights would replace what is there\n"
              "  hint: give a new folder, or add --overwrite", file=sys.stderr)  # fmt: skip
        return 2
    started = time.perf_counter()
    sizes = tiny_official_sizes() if args.tiny else OfficialSizes()
    folder = write_official_layout(args.folder, sizes, torch.device(args.device) if args.device else None)
    written = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    print(f"{folder}: {written / 1e9:.2f} GB of random weights in the official layout in "
          f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
