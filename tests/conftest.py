"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from transformers import PreTrainedTokenizerFast, UMT5EncoderModel

from memflow_cli.cache_dir import CACHE_DIR_ENV
from memflow_cli.demo import build_demo_tokenizer, demo_text_encoder_config

from .parity import ParityRenders


def worker_threads() -> int | None:
    """Under pytest-xdist, the cores this worker's torch may use: its share of this machine's (None: not a
    worker, or OMP_NUM_THREADS says already)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is None or "OMP_NUM_THREADS" in os.environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # not macOS
    return max(1, cores // int(workers))


def pytest_configure(config: pytest.Config) -> None:
    """pytest-xdist workers share the cores instead of each taking all of them: torch's threads in this process,
    and OMP_NUM_THREADS for the `memflow` processes its tests start."""
    threads = worker_threads()
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


# The files whose tests take longest (CPU seconds of one worker, its `memflow` processes included), longest first:
# pytest-xdist's --dist loadfile hands files to its workers in this order, and a long file started last would
# finish alone. A worker with two tests or fewer left takes the next file at once: the worker that starts
# test_parity_share_1.py (one scenario) takes test_cli_robustness.py with it, and the other queues the next file
# behind test_parity.py's long scenarios once its quick tests ran; every file after the parity ones is well under
# the half of the suite that a worker runs. Measured one file at a time on one thread (2026-12-07, a busy machine,
# the Wan decoder still diffusers'; each figure includes about 9 s of imports per pytest run).
LONGEST_FILES = (
    "test_parity.py",  # two full-resolution scenarios, one forked from the other, a resume (about 4 minutes)
    "test_parity_share_1.py",  # the other scenario (about 2 minutes on one core)
    "test_cli_robustness.py",  # 88 CPU-s: the batch script, signals, kill -9: real processes
    "test_distributed.py",  # 77 CPU-s: torchrun
    "test_live.py",  # 43 CPU-s: live sessions stopped by signals: real processes
    "test_snapshots.py",  # 29 CPU-s (19:20, an idle machine): resumes decoded by the Wan VAE
    "test_update.py",  # 27 CPU-s (19:20, idle): a render killed and resumed; the rest on the TAEHV decoder
    "test_tae_parity.py",  # 25 CPU-s: a full-size decode
    "test_bench.py",  # 17 CPU-s (19:20, idle): time to video: two render processes
    "test_live_browser.py",  # 15 CPU-s: a browser
    "test_cli.py",  # 14 CPU-s (19:20, idle)
    "test_embed_cache.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first (each file's tests in their own order), the rest as collected."""

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)


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


@pytest.fixture(scope="session")
def parity_renders() -> ParityRenders:
    """The parity scenarios, each rendered once per session (pytest-xdist: once per worker that runs them)."""
    return ParityRenders()
