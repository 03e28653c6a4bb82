"""The model's files, by job: where they are (`locate`), fetching them (`fetch`), checking them
(`verify`), naming them in a video's sidecar (`identity`) and loading the text encoder and VAE (`load`;
the VAE as memflow's own `wan_vae.WanVAE`).

The transformer's own checkpoints are parsed by `checkpoint.py`; every file is read through
`loading.read_torch_file`, and every problem is a `WeightsError`.
"""

from ..loading import DOWNLOAD_COMMAND, TRUNCATED, WeightsError
from .fetch import download
from .identity import file_fingerprint, weights_identity
from .load import (
    WAN21_VAE_CONFIG,
    convert_key,
    convert_wan_t5_to_umt5,
    converted_vae_file,
    load_text_encoder,
    load_vae,
    load_wan_t5,
    umt5_config_from_wan_t5,
    vae_needs_converter,
)
from .locate import (
    BASE_FILE,
    LORA_FILE,
    MEMFLOW_REPO,
    OFFICIAL_T5_FILE,
    OFFICIAL_VAE_FILE,
    RELEASE_BYTES,
    WAN_DIFFUSERS_DIR,
    WAN_DIFFUSERS_REPO,
    WAN_DIR,
    WAN_REPO,
    ModelFiles,
    hub_cache_dir,
    hub_offline,
    resolve_model,
)
from .verify import CheckResult, verify

__all__ = [
    "BASE_FILE", "CheckResult", "DOWNLOAD_COMMAND", "LORA_FILE", "MEMFLOW_REPO", "ModelFiles", "OFFICIAL_T5_FILE",
    "OFFICIAL_VAE_FILE", "RELEASE_BYTES", "TRUNCATED", "WAN21_VAE_CONFIG", "WAN_DIFFUSERS_DIR",
    "WAN_DIFFUSERS_REPO", "WAN_DIR", "WAN_REPO", "WeightsError", "convert_key", "convert_wan_t5_to_umt5",
    "converted_vae_file", "download",
    "file_fingerprint", "hub_cache_dir", "hub_offline", "load_text_encoder", "load_vae", "load_wan_t5",
    "resolve_model", "umt5_config_from_wan_t5", "vae_needs_converter", "verify", "weights_identity",
]
