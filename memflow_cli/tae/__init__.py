"""The TAEHV preview decoder (`--decoder tae`): the module (`model`), its released weights (`weights`) and the
streaming wrapper the engine runs (`stream`)."""

from .model import TAEW2_1, TaehvConfig, TaehvDecoder, TaeMemory, decode_video
from .stream import StreamingTaeDecoder
from .weights import (
    TAE_DOWNLOAD_COMMAND,
    TAE_FILE,
    TAE_REPO,
    load_taehv,
    random_released_state,
    random_taehv,
    read_state,
    released_shapes,
)

__all__ = [
    "TAEW2_1", "TAE_DOWNLOAD_COMMAND", "TAE_FILE", "TAE_REPO", "StreamingTaeDecoder", "TaeMemory", "TaehvConfig",
    "TaehvDecoder", "decode_video", "load_taehv", "random_released_state", "random_taehv", "read_state",
    "released_shapes",
]
