"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast, UMT5EncoderModel

from memflow_cli.demo import build_demo_tokenizer, demo_text_encoder_config


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """The demo model's tokenizer."""
    return build_demo_tokenizer()


@pytest.fixture(scope="session")
def umt5(tokenizer) -> UMT5EncoderModel:
    """The demo model's tiny umT5 text encoder, with seeded random weights."""
    config = demo_text_encoder_config(len(tokenizer))
    torch.manual_seed(0)
    return UMT5EncoderModel(config).eval()
