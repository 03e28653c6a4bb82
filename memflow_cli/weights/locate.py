"""Where the model's files are: the Hugging Face cache, a weights folder, or a checkout of the official code.

The real model needs the files the official MemFlow inference loads:

- the MemFlow transformer checkpoints, `base.pt` and `lora.pt`, from the hub repo `KlingTeam/MemFlow`
  (parsed and merged by `checkpoint.py`, only located here);
- from `Wan-AI/Wan2.1-T2V-1.3B`: the umT5-XXL encoder `models_t5_umt5-xxl-enc-bf16.pth`, its tokenizer
  folder `google/umt5-xxl/`, the VAE `Wan2.1_VAE.pth` and the small `config.json` (never the transformer
  weights, which `base.pt` replaces).

They are found in the Hugging Face cache (`--model` not given), in a local folder in the layout
`download(to=...)` writes (`base.pt`, `lora.pt`, `Wan2.1-T2V-1.3B/`), or in a checkout of the official
MemFlow code (`checkpoints/`, `wan_models/Wan2.1-T2V-1.3B/`). Folders and caches in the layout of
`Wan-AI/Wan2.1-T2V-1.3B-Diffusers` (`text_encoder/`, `tokenizer/`, `vae/`: what memflow downloaded before)
load too; the official files win where both are present.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from ..loading import DOWNLOAD_COMMAND, TRUNCATED, WeightsError, not_a_file, read_json_file
from ..text import did_you_mean

MEMFLOW_REPO = "KlingTeam/MemFlow"
BASE_FILE = "base.pt"
LORA_FILE = "lora.pt"
MODEL_WORDS = ("demo", "random")  # what `--model` takes besides a folder

# the layout of the official MemFlow code
OFFICIAL_CHECKPOINTS_DIR = "checkpoints"
OFFICIAL_WAN_DIR = "wan_models/Wan2.1-T2V-1.3B"
OFFICIAL_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
OFFICIAL_VAE_FILE = "Wan2.1_VAE.pth"
OFFICIAL_TOKENIZER_DIR = "google/umt5-xxl"
OFFICIAL_CONFIG_FILE = "config.json"

WAN_REPO = "Wan-AI/Wan2.1-T2V-1.3B"  # the official release, what the official inference loads
WAN_DIR = "Wan2.1-T2V-1.3B"  # its folder inside a local weights folder
WAN_PATTERNS = (OFFICIAL_T5_FILE, OFFICIAL_VAE_FILE, OFFICIAL_CONFIG_FILE, f"{OFFICIAL_TOKENIZER_DIR}/*")

# The sizes in bytes of the released files of `Wan-AI/Wan2.1-T2V-1.3B` (revision 37ec5126, as the hub's file
# records list them), relative to its folder. base.pt and lora.pt have no published size: they are checked by
# reading their headers only.
RELEASE_BYTES: dict[str, int] = {
    OFFICIAL_T5_FILE: 11_361_920_418,
    OFFICIAL_VAE_FILE: 507_609_880,
    OFFICIAL_CONFIG_FILE: 249,
    f"{OFFICIAL_TOKENIZER_DIR}/spiece.model": 4_548_313,
    f"{OFFICIAL_TOKENIZER_DIR}/tokenizer.json": 16_837_417,
    f"{OFFICIAL_TOKENIZER_DIR}/tokenizer_config.json": 61_728,
    f"{OFFICIAL_TOKENIZER_DIR}/special_tokens_map.json": 6_623,
}

# the same components in the Diffusers layout, which memflow downloaded before 0.2 and still loads
WAN_DIFFUSERS_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
WAN_DIFFUSERS_DIR = "Wan2.1-T2V-1.3B-Diffusers"  # its folder inside a local weights folder
WAN_DIFFUSERS_PATTERNS = ("text_encoder/*", "tokenizer/*", "vae/*", "transformer/config.json")

# huggingface_hub >= 1.2 raises this for a cached snapshot that lacks some of the requested files; older
# versions hand the snapshot folder back as it is (its missing parts are checked after, either way).
_INCOMPLETE_SNAPSHOT: tuple[type[Exception], ...] = tuple(
    error for error in (getattr(hub_errors, "IncompleteSnapshotError", None),) if error is not None
)


@dataclass(frozen=True)
class ModelFiles:
    """Paths of everything the real model loads.

    `text_encoder_dir` and `vae` are diffusers folders (`text_encoder/`, `vae/`) or, in the official
    layout, the original single files (`models_t5_umt5-xxl-enc-bf16.pth`, `Wan2.1_VAE.pth`).
    """

    base: Path
    lora: Path
    text_encoder_dir: Path
    tokenizer_dir: Path
    vae: Path
    transformer_config: Path | None = None

    @property
    def layout(self) -> str:
        """'diffusers' (Wan2.1 Diffusers folders) or 'official' (the original Wan `.pth` files)."""
        return "official" if self.text_encoder_dir.suffix == ".pth" else "diffusers"

    def components(self) -> dict[str, Path]:
        """Role -> path, for every file or folder that is part of the model."""
        parts = {
            "base": self.base,
            "lora": self.lora,
            "transformer_config": self.transformer_config,
            "text_encoder": self.text_encoder_dir,
            "tokenizer": self.tokenizer_dir,
            "vae": self.vae,
        }
        return {role: path for role, path in parts.items() if path is not None}


# -- resolve ----------------------------------------------------------------------------------------------


def resolve_model(model: str | Path | None = None) -> ModelFiles:
    """Find the model's files: `None` = the Hugging Face cache, else a local weights folder.

    Raises WeightsError naming every missing file and the command that fetches them.
    """
    if model is None:
        return _resolve_cache()
    return _resolve_folder(Path(model).expanduser())


def hub_cache_dir() -> Path:
    """The hub cache, read from the environment at call time (HF_HUB_CACHE, then HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(hub_constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE forbids downloads (read at call time, as huggingface_hub parses it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"} or hub_constants.HF_HUB_OFFLINE


def _missing_error(missing: list[str], where: str, command: str = DOWNLOAD_COMMAND) -> WeightsError:
    """One line: what is missing where (`repo: file; repo: file`), and the command that fetches it."""
    offline = " (HF_HUB_OFFLINE is set: unset it to download)" if hub_offline() else ""
    listing = "; ".join(missing)
    return WeightsError(f"model files missing from {where}: {listing}; run `{command}` to fetch them{offline}")


def _resolve_cache() -> ModelFiles:
    cache_dir = hub_cache_dir()
    base = _cached_file(MEMFLOW_REPO, BASE_FILE, cache_dir)
    lora = _cached_file(MEMFLOW_REPO, LORA_FILE, cache_dir)
    missing = [f"{MEMFLOW_REPO}: {name}" for name, path in ((BASE_FILE, base), (LORA_FILE, lora)) if path is None]
    wan_root = _cached_snapshot(WAN_REPO, WAN_PATTERNS, cache_dir)
    wan_missing = list(WAN_PATTERNS) if wan_root is None else _official_missing(wan_root)
    diffusers_root = _cached_snapshot(WAN_DIFFUSERS_REPO, WAN_DIFFUSERS_PATTERNS, cache_dir) if wan_missing else None
    if diffusers_root is not None and not _diffusers_missing(diffusers_root):
        wan_missing = []  # an earlier download in the Diffusers layout serves as well
    missing += [f"{WAN_REPO}: {item}" for item in wan_missing]
    if missing or base is None or lora is None:
        raise _missing_error(missing, f"the Hugging Face cache ({cache_dir})")
    if wan_root is not None and not _official_missing(wan_root):
        return _official_files(base, lora, wan_root)
    assert diffusers_root is not None
    return _diffusers_files(base, lora, diffusers_root)


def _cached_file(repo: str, name: str, cache_dir: Path) -> Path | None:
    try:
        return Path(hf_hub_download(repo, name, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def _cached_snapshot(repo: str, patterns: tuple[str, ...], cache_dir: Path) -> Path | None:
    """The cached snapshot folder of `repo`, even an incomplete one (its missing parts are checked after)."""
    try:
        folder = snapshot_download(repo, allow_patterns=list(patterns), cache_dir=cache_dir, local_files_only=True)
        return Path(folder)
    except _INCOMPLETE_SNAPSHOT as err:
        snapshot_path = getattr(err, "snapshot_path", None)
        return Path(snapshot_path) if snapshot_path else None
    except LocalEntryNotFoundError:
        return None


def _resolve_folder(root: Path) -> ModelFiles:
    if root.is_file():
        raise WeightsError(f"{root}: a file, not a weights folder; give the folder that holds {BASE_FILE}, "
                           f"{LORA_FILE} and {WAN_DIR}/")  # fmt: skip
    if not root.is_dir():
        found = not_a_file(root)  # "a named pipe (FIFO), not a file"...: what is there, instead of a folder
        what = f"{found.removesuffix(', not a file')}, not a weights folder" if found else "no such weights folder"
        raise WeightsError(f"{root}: {what}; {did_you_mean(str(root), MODEL_WORDS, '--model ')}"
                           f"run `{DOWNLOAD_COMMAND}` or pass an existing folder")  # fmt: skip
    checkpoints = root / OFFICIAL_CHECKPOINTS_DIR if (root / OFFICIAL_CHECKPOINTS_DIR).is_dir() else root
    base, lora = checkpoints / BASE_FILE, checkpoints / LORA_FILE
    missing = [_named(p) for p in (base, lora) if not p.is_file()]
    layout, wan_root = _find_wan_root(root)
    parts_missing = _diffusers_missing(wan_root) if layout == "diffusers" else _official_missing(wan_root)
    missing += [str(wan_root / item) for item in parts_missing]
    if missing:
        raise _missing_error(missing, str(root), f"{DOWNLOAD_COMMAND} --to {root}")
    if layout == "diffusers":
        return _diffusers_files(base, lora, wan_root)
    return _official_files(base, lora, wan_root)


def _named(path: Path) -> str:
    """A missing file's path, with what is there instead where something is (`a folder, not a file`)."""
    kind = not_a_file(path)
    return f"{path} ({kind})" if kind else str(path)


def _find_wan_root(root: Path) -> tuple[str, Path]:
    """Which Wan2.1 layout the folder holds, and where: the official files first, then the Diffusers folders;
    the official folder `download(to=root)` writes when there is neither."""
    for candidate in (root / WAN_DIR, root / OFFICIAL_WAN_DIR):
        if candidate.is_dir():
            return "official", candidate
    for candidate in (root / WAN_DIFFUSERS_DIR, root / "wan_models" / WAN_DIFFUSERS_DIR, root):
        if (candidate / "text_encoder").is_dir() or (candidate / "vae").is_dir():
            return "diffusers", candidate
    return "official", root / WAN_DIR


def _diffusers_missing(wan_root: Path) -> list[str]:
    """Required parts of a Wan2.1 Diffusers folder that are absent, relative to it."""
    missing = tokenizer_missing(wan_root, "tokenizer")
    missing += _model_dir_missing(wan_root, "text_encoder", "model")
    missing += _model_dir_missing(wan_root, "vae", "diffusion_pytorch_model")
    return missing


def _official_missing(wan_dir: Path) -> list[str]:
    missing = [name for name in (OFFICIAL_T5_FILE, OFFICIAL_VAE_FILE) if not (wan_dir / name).is_file()]
    return missing + tokenizer_missing(wan_dir, OFFICIAL_TOKENIZER_DIR)


def tokenizer_missing(root: Path, folder: str) -> list[str]:
    vocab = [root / folder / name for name in ("tokenizer.json", "spiece.model")]
    missing = [] if any(p.is_file() for p in vocab) else [f"{folder}/tokenizer.json (or spiece.model)"]
    if not (root / folder / "tokenizer_config.json").is_file():
        missing.append(f"{folder}/tokenizer_config.json")
    return missing


def _model_dir_missing(root: Path, folder: str, stem: str) -> list[str]:
    """A transformers/diffusers model folder: config.json and one safetensors file or an index and its shards."""
    missing = [] if (root / folder / "config.json").is_file() else [f"{folder}/config.json"]
    try:
        weights = weight_files(root / folder, stem)
    except WeightsError:
        return missing  # an unreadable index is reported by verify()
    if not weights:
        missing.append(f"{folder}/{stem}.safetensors")
    missing += [f"{folder}/{p.name}" for p in weights if not p.is_file()]
    return missing


def weight_files(folder: Path, stem: str) -> list[Path]:
    """The safetensors files of a model folder: the single file, or the shards its index lists."""
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return [single]
    if not index.is_file():
        return []
    content = read_json_file(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise WeightsError(f"no `weight_map` of tensor names to shard files: {TRUNCATED}", index)
    shards = sorted(set(weight_map.values()))
    if any(Path(name).name != name or name in ("", ".", "..") for name in shards):
        raise WeightsError(f"a shard named outside its folder: {TRUNCATED}", index)
    return [index] + [folder / name for name in shards]


def _diffusers_files(base: Path, lora: Path, wan_root: Path) -> ModelFiles:
    config = wan_root / "transformer" / "config.json"
    return ModelFiles(
        base=base,
        lora=lora,
        text_encoder_dir=wan_root / "text_encoder",
        tokenizer_dir=wan_root / "tokenizer",
        vae=wan_root / "vae",
        transformer_config=_given(config),
    )


def _official_files(base: Path, lora: Path, wan_dir: Path) -> ModelFiles:
    config = wan_dir / OFFICIAL_CONFIG_FILE
    return ModelFiles(
        base=base,
        lora=lora,
        text_encoder_dir=wan_dir / OFFICIAL_T5_FILE,
        tokenizer_dir=wan_dir / OFFICIAL_TOKENIZER_DIR,
        vae=wan_dir / OFFICIAL_VAE_FILE,
        transformer_config=_given(config),
    )


def _given(config: Path) -> Path | None:
    """The transformer's config.json where something is at its place (read and refused there if it is no JSON
    file: a FIFO, a device, a folder or a link to nothing are not taken as no config); None where nothing is."""
    return config if config.is_file() or not_a_file(config) else None
