"""Where the TAEHV weights file is, fetching it, and checking it.

`taew2_1.pth` comes from the hub repo `madebyollin/taehv` into the same Hugging Face cache as the model's
other files (or a folder given with `--to`). It is found, in this order: the file `--decoder-weights` names,
`taew2_1.pth` in the model's weights folder, the hub cache.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from ..loading import WeightsError, not_a_file
from ..weights.fetch import download_command, first_line, no_locks_left
from ..weights.locate import hub_cache_dir, hub_offline
from ..weights.verify import CheckResult
from .weights import TAE_DOWNLOAD_COMMAND, TAE_FILE, TAE_REPO, TAEW2_1_MIN_BYTES, checked_decoder_state, read_state

ROLE = "tae decoder"  # its name in `weights verify` reports


def find_tae_weights(weights: Path | None = None, model_folder: Path | None = None) -> Path | None:
    """The TAEHV file, or None where there is none (a named file that is missing is an error)."""
    if weights is not None:
        if not weights.expanduser().is_file():
            what = not_a_file(weights.expanduser()) or "no such file"
            raise WeightsError(f"--decoder-weights: {what}; run `{TAE_DOWNLOAD_COMMAND}` or give the path of "
                               f"{TAE_FILE}", weights)  # fmt: skip
        return weights.expanduser()
    if model_folder is not None and (model_folder / TAE_FILE).is_file():
        return model_folder / TAE_FILE
    try:
        return Path(hf_hub_download(TAE_REPO, TAE_FILE, cache_dir=hub_cache_dir(), local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def tae_weights(weights: Path | None = None, model_folder: Path | None = None) -> Path:
    """The TAEHV file; missing, a WeightsError that names the download command."""
    found = find_tae_weights(weights, model_folder)
    if found is None:
        where = f"neither in {model_folder} nor" if model_folder is not None else "not"
        raise WeightsError(
            f"the TAEHV decoder weights {TAE_FILE} are {where} in the Hugging Face cache ({hub_cache_dir()}): "
            f"run `{TAE_DOWNLOAD_COMMAND}`, or give --decoder-weights PATH"
        )
    return found


def download_tae(to: Path | None = None) -> Path:
    """Fetch `taew2_1.pth` into the hub cache, or into the folder `to`; under HF_HUB_OFFLINE only find it."""
    if hub_offline():
        found = find_tae_weights(None, to)
        if found is None:
            raise WeightsError(f"HF_HUB_OFFLINE is set, so {TAE_REPO}/{TAE_FILE} cannot be downloaded; unset it")
        return found
    again = download_command(to, tae=True)
    try:
        cache_dir = None if to is not None else hub_cache_dir()
        with no_locks_left(to):
            return Path(hf_hub_download(TAE_REPO, TAE_FILE, cache_dir=cache_dir, local_dir=to))
    except (HfHubHTTPError, OSError) as err:
        raise WeightsError(f"could not download {TAE_REPO}/{TAE_FILE}: {first_line(err)}; check the network, then "
                           f"run `{again}` again") from None  # fmt: skip


def verify_tae(path: Path) -> CheckResult:
    """Size (at least the decoder's float16 tensors), readable, and the taew2_1 decoder's keys and shapes."""
    size = path.stat().st_size if path.is_file() else 0
    if size < TAEW2_1_MIN_BYTES:
        detail = "missing" if not path.is_file() else f"{size} bytes, too small for the decoder's tensors"
        return CheckResult(ROLE, path, False, f"{detail}: re-run {TAE_DOWNLOAD_COMMAND}")
    try:
        state = checked_decoder_state(read_state(path), path)
    except WeightsError as err:
        return CheckResult(ROLE, path, False, str(err).removeprefix(f"{path}: "))
    values = sum(tensor.numel() for tensor in state.values())
    return CheckResult(ROLE, path, True, f"{size} bytes, taew2_1 decoder layout, {values:,} decoder values")
