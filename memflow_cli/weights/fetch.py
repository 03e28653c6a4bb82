"""Fetch the model's files into the Hugging Face cache or a folder (nothing under HF_HUB_OFFLINE)."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from huggingface_hub import constants, hf_hub_download, snapshot_download
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

REACH_TIMEOUT_S = 10.0  # seconds the hub has to answer one HEAD request before a download starts


def download(to: Path | None = None) -> ModelFiles:
    """Fetch whatever is missing into the hub cache, or into the folder `to`; returns the resolved files.

    Under HF_HUB_OFFLINE nothing is fetched: the files are returned if all are present, else WeightsError
    says so and lists what is missing.
    """
    if hub_offline():
        try:
            return resolve_model(to)
        except WeightsError as err:
            raise WeightsError(f"HF_HUB_OFFLINE is set, so nothing can be downloaded; {err}") from None
    cache_dir = None if to is not None else hub_cache_dir()
    wan_dir = None if to is None else Path(to) / WAN_DIR
    with no_locks_left(to):
        for name in (BASE_FILE, LORA_FILE):
            fetch_file = partial(hf_hub_download, MEMFLOW_REPO, name, cache_dir=cache_dir, local_dir=to)
            _fetch(f"{MEMFLOW_REPO}/{name}", fetch_file, download_command(to))
        fetch_wan = partial(snapshot_download, WAN_REPO, allow_patterns=list(WAN_PATTERNS), cache_dir=cache_dir)
        _fetch(WAN_REPO, partial(fetch_wan, local_dir=wan_dir), download_command(to))
    return resolve_model(to)


def check_reachable(
    endpoint: str | None = None, timeout_s: float = REACH_TIMEOUT_S, command: str = DOWNLOAD_COMMAND
) -> None:
    """One request to the hub (`endpoint`, default the hub's) before `download`: without a network, a
    WeightsError at once instead of the hub client's retries (five, about half a minute) and the lock files
    it leaves in the target folder. Nothing is asked under HF_HUB_OFFLINE."""
    if hub_offline():
        return
    endpoint = endpoint or constants.ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # the hub answered: whatever it said, it is there
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise WeightsError(
            f"cannot reach {endpoint}: {getattr(reason, 'strerror', None) or reason}; nothing was downloaded "
            f"(check the network, or the proxy in HTTPS_PROXY, then run `{command}` again)"
        ) from None


@contextmanager
def no_locks_left(to: Path | None) -> Iterator[None]:
    """On a failed download into `to`, the lock files the hub client made there are removed (their downloads
    are over); those that were there before are kept."""
    if to is None:
        yield
        return
    before = set(_download_locks(Path(to)))
    try:
        yield
    except BaseException:
        for lock in set(_download_locks(Path(to))) - before:
            lock.unlink(missing_ok=True)
        raise


def _download_locks(to: Path) -> Iterator[Path]:
    yield from (to / ".cache" / "huggingface").rglob("*.lock")


def download_command(to: Path | None = None, *, tae: bool = False) -> str:
    """The command that runs this download again: `--decoder tae` and `--to DIR` as given."""
    return DOWNLOAD_COMMAND + (" --decoder tae" if tae else "") + (f" --to {to}" if to is not None else "")


def _fetch(what: str, fetch: Callable[[], Any], command: str = DOWNLOAD_COMMAND) -> None:
    try:
        fetch()
    except (HfHubHTTPError, OSError) as err:  # LocalEntryNotFoundError (no network) is an OSError
        raise WeightsError(
            f"could not download {what}: {first_line(err)}; check the network (and HF_TOKEN if the repo needs one), "
            f"then run `{command}` again"
        ) from None


def first_line(error: BaseException) -> str:
    """The first line of a library's message (the hub client's run over several)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
