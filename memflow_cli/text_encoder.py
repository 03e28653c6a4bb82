"""The umT5 text encoder: prompts in, zero-padded prompt embeddings [n, max_length, d] out.

It does what the official Wan text-encoder wrapper does (spec §11): clean each prompt ('whitespace' mode),
tokenise with EOS, pad with id 0 and truncate to `max_length`, run the encoder under the attention mask,
then set every row at or past the prompt's true length (EOS included) to exactly zero. A prompt longer than
`tokens.prompt_head` keeps for `max_length` tokens (thousands of words) is cleaned and tokenised by a head that
holds twice the tokens read (`_cleaned`): its first `max_length` tokens are the whole prompt's, and a prompt of
megabytes costs no more than its head. The encoder is
transformers' own `UMT5EncoderModel`; nothing of it is re-implemented here.

The engine loads it on first need (`prompt_embeds.py`); where the card is small it calls `offload()` after
encoding, so that the ~11 GB encoder leaves the GPU before generation starts. transformers and ftfy are
imported when a tokenizer or encoder is loaded, not with this module.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .tokens import prompt_head

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

# What the official pipeline uses: prompts are padded or truncated to this many tokens.
DEFAULT_MAX_LENGTH = 512
PAD_TOKEN_ID = 0

_WHITESPACE_RUN = re.compile(r"\s+")


def dtype_argument() -> str:
    """What transformers calls the load dtype: `dtype` since 4.56, which deprecates the older `torch_dtype`."""
    import transformers

    version = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if version >= (4, 56) else "torch_dtype"


def clean_prompt(text: str) -> str:
    """The official 'whitespace' cleaning: fix mojibake, unescape HTML twice, collapse whitespace."""
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    text = _WHITESPACE_RUN.sub(" ", text.strip())
    return text.strip()


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `folder`: a Diffusers `tokenizer/` or the release's `google/umt5-xxl/`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), **_t5_sentinel_override(Path(folder)))


# T5 tokenizers add this many `<extra_id_N>` sentinel tokens when the config does not say.
T5_DEFAULT_EXTRA_IDS = 100


def _t5_sentinel_override(folder: Path) -> dict[str, int]:
    """`extra_ids=0` for a T5 tokenizer whose config lists a different number of sentinels than `extra_ids`.

    transformers' T5 tokenizers refuse such a config ("Both extra_ids (100) and additional_special_tokens
    ... are provided", Wan-Video/Wan2.1#157). The listed sentinels are in its `tokenizer.json` already, so
    none need adding: with `extra_ids=0` the tokenizer takes them as they are.
    """
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # no readable config: transformers reports it
    if not str(config.get("tokenizer_class", "")).startswith("T5Tokenizer"):
        return {}
    sentinels = [token for token in config.get("additional_special_tokens") or [] if "<extra_id_" in str(token)]
    if sentinels and len(sentinels) != config.get("extra_ids", T5_DEFAULT_EXTRA_IDS):
        return {"extra_ids": 0}
    return {}


def with_eager_attention(encoder: UMT5EncoderModel) -> UMT5EncoderModel:
    """The encoder with transformers' eager attention, the official T5's arithmetic; returns it.

    transformers 5 runs UMT5 attention through SDPA by default, whose fused bf16 kernels round differently
    from the official matmul + float32 softmax (0.7% relative L2 on the embeddings); eager reproduces it
    bit for bit. The text encoder runs once per prompt, so its speed does not matter.
    """
    if hasattr(encoder, "set_attn_implementation"):
        encoder.set_attn_implementation("eager")
    else:  # transformers 4.x: UMT5 has no other attention, the attribute only records it
        encoder.config._attn_implementation = "eager"
    return encoder


class TextEncoder:
    """A tokenizer and a `UMT5EncoderModel` that turn prompts into the DiT's `prompt_embeds`."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        encoder: UMT5EncoderModel,
        max_length: int = DEFAULT_MAX_LENGTH,
    ):
        if tokenizer.pad_token_id != PAD_TOKEN_ID:
            raise ValueError(f"the tokenizer must pad with id {PAD_TOKEN_ID}, not {tokenizer.pad_token_id}")
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        self.tokenizer = tokenizer
        self.encoder = with_eager_attention(encoder).eval().requires_grad_(False)
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls,
        folder: Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> TextEncoder:
        """Load `folder/tokenizer` and `folder/text_encoder` (the Diffusers Wan2.1-T2V-1.3B layout)."""
        folder = Path(folder)
        return cls.from_folders(folder / "tokenizer", folder / "text_encoder", device, dtype, max_length)

    @classmethod
    def from_folders(
        cls,
        tokenizer_dir: Path,
        encoder_dir: Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> TextEncoder:
        """Load a tokenizer folder and a transformers `UMT5EncoderModel` folder."""
        from transformers import UMT5EncoderModel

        tokenizer = load_tokenizer(tokenizer_dir)
        encoder = UMT5EncoderModel.from_pretrained(str(encoder_dir), **{dtype_argument(): dtype})
        return cls(tokenizer, encoder.to(device), max_length)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the encoder's weights."""
        return sum(param.nbytes for param in self.encoder.parameters())

    @property
    def dim(self) -> int:
        """Width of one embedding row (4096 for umT5-XXL)."""
        return self.encoder.config.d_model

    def describe(self) -> str:
        """What encodes the prompts, for reports."""
        config = self.encoder.config
        return f"umT5 {config.num_layers} layers x {config.d_model}"

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned prompts -> token ids and attention mask, both [n, max_length] int64 on the CPU."""
        batch = self.tokenizer(
            [self._cleaned(prompt) for prompt in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    def _cleaned(self, prompt: str) -> str:
        """The cleaned prompt; of a prompt of megabytes, its cleaned head (`tokens.prompt_head`), taken four times
        longer until it is the whole prompt or holds twice the tokens the encoder reads: its first `max_length`
        tokens are then the whole prompt's, whatever the cleaning drops (an `&nbsp;` unescapes to a space)."""
        tokens = self.max_length
        while True:
            head = prompt_head(prompt, tokens)
            cleaned = clean_prompt(head)
            if len(head) == len(prompt) or self._token_count(cleaned) >= 2 * self.max_length:
                return cleaned
            tokens *= 4

    def _token_count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])

    @torch.no_grad()
    def encode(self, prompts: list[str], keep_on_device: bool = False, batch_size: int = 1) -> torch.Tensor:
        """Prompts -> embeddings [n, max_length, dim], rows past each prompt's length exactly zero.

        By default each prompt is encoded alone, as the official inference encodes it: a batch of several
        runs other matrix kernels, whose rounding can differ, and a prompt's embeddings must not depend on
        the prompts beside it (the disk cache hands them to other stories, a live session's replay encodes
        its prompts together). By default the result is float32 on the CPU (exact for bf16 values); with
        `keep_on_device` it stays on the encoder's device in the encoder's dtype.
        """
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        chunks = [self._encode_batch(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
        embeds = torch.cat(chunks)
        return embeds if keep_on_device else embeds.to("cpu", torch.float32)

    def _encode_batch(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_tokens(*self.tokenize(prompts))

    @torch.no_grad()
    def encode_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids and attention mask [n, L] -> embeddings [n, L, dim] in the encoder's dtype, on its device.

        Every row at or past a prompt's length (the number of ones in its mask) is exactly zero.
        """
        device = self.device
        hidden = self.encoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        # hidden: [n, L, dim]; a row is padding when its position is >= the prompt's true length
        lengths = mask.sum(dim=1).to(device)
        padding = torch.arange(ids.shape[1], device=device)[None, :] >= lengths[:, None]
        return hidden.masked_fill(padding[:, :, None], 0.0)

    def to(self, device: torch.device | str) -> TextEncoder:
        """Move the encoder to `device`; returns self."""
        self.encoder.to(device)
        return self

    def offload(self) -> TextEncoder:
        """Move the encoder to the CPU and release the GPU memory it held."""
        was_cuda = self.device.type == "cuda"
        self.encoder.to("cpu")
        if was_cuda:
            torch.cuda.empty_cache()
        return self
