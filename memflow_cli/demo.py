"""The `--model demo` components: a tiny, seeded, random-weight model that runs anywhere in seconds.

Nothing is downloaded. The tokenizer is a byte-level BPE trained in-process on a fixed paragraph, the
text encoder is a two-layer umT5 and the VAE a narrow Wan VAE, both initialised from a seed. Every command
(render, check, bench) can run end to end on a CPU with them, but the weights are random: the video is
noise, and `DEMO_NOTICE` says so. The tiny transformer is built elsewhere from `DEMO_TRANSFORMER`.
torch, tokenizers and transformers are imported by the builders, not with the module: its
sizes are read before any argument is checked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from memflow_cli.settings import TransformerConfig, VideoGeometry

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast, UMT5Config

    from memflow_cli.tae import TaehvDecoder
    from memflow_cli.text_encoder import TextEncoder
    from memflow_cli.wan_vae import WanVAE

DEMO_NOTICE = "demo model: tiny random weights, nothing downloaded — the video is noise, not your story"

# 64x96 pixels -> latent 8x12 -> 4x6 = 24 tokens per latent frame
DEMO_GEOMETRY = VideoGeometry(height=64, width=96)

DEMO_TEXT_DIM = 32  # d_model of the demo umT5
DEMO_TEXT_LEN = 256  # prompts are padded or truncated to this many tokens (story prompts: ~100-130)

# head_dim 32: even, and its rotary split (12, 10, 10) is even too
DEMO_TRANSFORMER = TransformerConfig(
    dim=64,
    ffn_dim=128,
    num_heads=2,
    num_layers=2,
    freq_dim=32,
    text_dim=DEMO_TEXT_DIM,
    text_len=DEMO_TEXT_LEN,
)

# The Wan2.1 VAE (`weights.WAN21_VAE_CONFIG`), narrowed: same strides (8x spatial, 4x temporal), latent
# channels and latent statistics.
DEMO_VAE_NARROWING = {"base_dim": 8, "num_res_blocks": 1}

# The TAEHV decoder's layout (`--decoder tae`), narrowed: same stages, memory blocks and 8x/4x upscaling.
DEMO_TAEHV_WIDTHS = (16, 8, 8)

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2 as in umT5
_BPE_VOCAB_SIZE = 1024

# The demo tokenizer's training text: the words video prompts tend to use.
_CORPUS = """
A woman in a red coat walks slowly along a quiet street at dawn, the camera following her from behind.
A young man with short dark hair sits on a wooden bench in a park and reads an old book. Children play
with a ball on a sandy beach while gentle waves roll onto the shore under a bright blue sky. A small dog
runs across a green meadow full of yellow and white wildflowers, its ears flapping in the wind. An old
fisherman in a wool sweater repairs a net on the deck of his boat as seagulls circle overhead. The
detective, a tall woman in a grey trench coat, steps out of a black car into the pouring rain and looks
up at the neon signs of the city at night. A beekeeper in a white protective suit with a mesh hood lifts
a frame covered with honeybees from the hive. A girl and her grandfather cook dinner together in a warm
kitchen, steam rising from a pot on the stove. Soft golden light falls through tall windows onto a
wooden floor. The camera slowly pans to the left, then zooms in on her face as she smiles. A close-up
shot shows his hands holding a cup of hot coffee. A wide aerial view reveals snowy mountains, a frozen
lake and a dark pine forest. A cat sleeps on a sunny windowsill beside a vase of fresh flowers. A knight
in silver armour rides a brown horse through a misty valley toward an ancient stone castle. A robot
with glowing blue eyes explores an abandoned factory, its footsteps echoing in the empty hall. Two
friends laugh as they ride bicycles down a hill in autumn, orange leaves swirling around them. The
chef slices vegetables quickly on a cutting board in a busy restaurant kitchen. A painter stands in
front of a large canvas and adds bright strokes of paint. Rain drips from the roof of a small cottage
at the edge of a dense forest. The boy, about eight years old, hesitates, then takes his mother's hand
and steps forward with a curious expression. Cinematic lighting, shallow depth of field, realistic
detail, smooth motion, a steady handheld camera, high quality, vivid colors, natural daylight, evening,
morning, afternoon, night, sunset, sunrise, fog, snow, storm, wind, fire, water, river, ocean, desert,
city, village, garden, room, house, road, bridge, train, ship, airplane, he, she, they, it, his, her,
their, is, are, was, were, has, have, and, or, but, with, without, from, into, onto, over, under,
between, behind, beside, near, far, up, down, left, right, then, now, still, again, very, slightly.
"""


def build_demo_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here on `_CORPUS`: no unknown text, pad id 0, EOS appended."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_demo_bpe(), pad_token=PAD, eos_token=EOS, unk_token=UNK, model_max_length=DEMO_TEXT_LEN
    )


def demo_token_counter() -> Callable[[str], int]:
    """Tokens of a prompt as the demo text encoder reads it, EOS included, as `build_demo_tokenizer` counts
    them, with the `tokenizers` library alone: counting costs no transformers import."""
    tokenizer = _demo_bpe()
    return lambda text: len(tokenizer.encode(text).ids)


def _demo_bpe() -> Tokenizer:
    """The demo tokenizer's `tokenizers` model: byte-level BPE trained on `_CORPUS`, EOS appended."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        special_tokens=[PAD, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS], trainer=trainer)
    eos_id = tokenizer.token_to_id(EOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, eos_id)]
    )
    return tokenizer


def demo_text_encoder_config(vocab_size: int) -> UMT5Config:
    """A two-layer umT5 encoder of width `DEMO_TEXT_DIM`, otherwise configured like umT5-XXL."""
    from transformers import UMT5Config

    return UMT5Config(
        vocab_size=vocab_size,
        d_model=DEMO_TEXT_DIM,
        d_kv=16,
        num_heads=2,
        d_ff=64,
        num_layers=2,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def build_demo_text_encoder(seed: int = 0) -> TextEncoder:
    """The demo tokenizer with a randomly initialised tiny umT5 encoder (float32, CPU)."""
    from transformers import UMT5EncoderModel

    from memflow_cli.seeding import drawing_from, seeded
    from memflow_cli.text_encoder import TextEncoder

    tokenizer = build_demo_tokenizer()
    config = demo_text_encoder_config(len(tokenizer))
    with drawing_from(seeded(seed)):  # the global RNG untouched
        encoder = UMT5EncoderModel(config)
    return TextEncoder(tokenizer, encoder, max_length=DEMO_TEXT_LEN)


def build_demo_vae(seed: int = 0) -> WanVAE:
    """A narrow, randomly initialised Wan VAE, its decode side (float32, CPU, eval mode)."""
    from memflow_cli.seeding import drawing_from, seeded
    from memflow_cli.wan_vae import WanVAE, WanVAEConfig
    from memflow_cli.weights import WAN21_VAE_CONFIG

    with drawing_from(seeded(seed)):
        vae = WanVAE(WanVAEConfig.from_diffusers({**WAN21_VAE_CONFIG, **DEMO_VAE_NARROWING}))
    return vae.eval().requires_grad_(False)


def build_demo_taehv(seed: int = 0) -> TaehvDecoder:
    """A narrow TAEHV decoder with seeded random weights (float32, CPU, eval mode): the demo's `--decoder tae`."""
    from memflow_cli.tae import TAEW2_1, random_taehv

    return random_taehv(replace(TAEW2_1, widths=DEMO_TAEHV_WIDTHS), seed)
