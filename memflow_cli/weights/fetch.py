"""Fetch the model's files into the Hugging Face cache or a folder (nothing under HF_HUB_OFFLINE)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError

from ..loading import DOWNLOAD_COMMAND, WeightsError
from .locate import (
    BASE_FILE,
    LORA_FILE,
    MEMFLOW_REPO,
    WAN_DIR,
    WAN_PATTERNS,
    WAN_REPO,
    ModelFiles,
    hub_cache_dir,
    hub_offline,
    resolve_model,
)


def download(to: Path | None = None) -> ModelFiles:
    """Fetch whatever is missing into the hub cache, or into the folder `to`; returns the resolved files.

    Under HF_HUB_OFFLINE nothing is fetched: the files are returned if all are present, else WeightsError
    says so and lists what is missing.
    """
    if hub_offline():
        try:
            return resolve_model(to)
        except WeightsError as err:
            raise WeightsError(f"HF_HUB_OFFLINE is set, so nothing can be downloaded.\n{err}") from None
    cache_dir = None if to is not None else hub_cache_dir()
    wan_dir = None if to is None else Path(to) / WAN_DIR
    for name in (BASE_FILE, LORA_FILE):
        fetch_file = partial(hf_hub_download, MEMFLOW_REPO, name, cache_dir=cache_dir, local_dir=to)
        _fetch(f"{MEMFLOW_REPO}/{name}", fetch_file)
    fetch_wan = partial(snapshot_download, WAN_REPO, allow_patterns=list(WAN_PATTERNS), cache_dir=cache_dir)
    _fetch(WAN_REPO, partial(fetch_wan, local_dir=wan_dir))
    return resolve_model(to)


def _fetch(what: str, fetch: Callable[[], Any]) -> None:
    try:
        fetch()
    except (HfHubHTTPError, OSError) as err:  # LocalEntryNotFoundError (no network) is an OSError
        raise WeightsError(
            f"could not download {what}: {err}\ncheck the network (and HF_TOKEN if the repo needs one), "
            f"then run `{DOWNLOAD_COMMAND}` again"
        ) from None
