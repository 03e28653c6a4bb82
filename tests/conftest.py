"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from transformers import PreTrainedTokenizerFast, UMT5EncoderModel

from memflow_cli.cache_dir import CACHE_DIR_ENV
from memflow_cli.demo import build_demo_tokenizer, demo_text_encoder_config


@pytest.fixture(scope="session", autouse=True)
def _session_cache_dir(tmp_path_factory) -> Iterator[None]:
    """No test touches the user's cache: memflow's cache folder is a temporary one (engines of module-scoped
    fixtures, loaded before any test's own fixtures, use this one)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_DIR_ENV, str(tmp_path_factory.mktemp("memflow-cache")))
        yield


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch) -> None:
    """Each test starts with an empty cache folder of its own (outside its `tmp_path`, which stays empty)."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path_factory.mktemp("memflow-cache")))


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
