"""Compiled graphs kept across processes, and the choice, per run, of whether compiling pays off.

torch.compile's output (Inductor's FX graphs and autotuning results, Triton's kernels) is cached on disk;
by default torch keeps it in the temporary folder, which a reboot or a new machine empties. memflow keeps
it in the user's cache instead, one folder per GPU, torch, CUDA and memflow version (`CompileKey`), so a
second render on the same machine finds its kernels, and another torch never reads them:

    $MEMFLOW_CACHE_DIR, else $XDG_CACHE_HOME/memflow, else ~/.cache/memflow
        compile/<gpu>-torch<version>-cuda<version>-memflow<version>/
            inductor/  triton/  warm/<graphs>.json

A `warm/` marker is written once a compiled video of that shape finished: its graphs are then in the
cache. Compiling costs a render about a minute on a cold cache and ten seconds on a warm one, so it is
never the default: `choose_compile` picks the graphed path (the eager kernels with q/k/v fused and the
FFN's GELU in the matmul, each repeated pass replayed from a CUDA graph, captured in seconds) unless
`--compile` or `--no-compile` says otherwise. Deleting the folder is always safe: it only costs the next
compiled render its warm-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from .. import __version__
from ..embed_cache import cache_root

INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"
TRITON_ENV = "TRITON_CACHE_DIR"


@dataclass(frozen=True)
class CompileKey:
    """What compiled kernels depend on beyond the graphs themselves: the GPU and the software versions."""

    gpu: str  # e.g. "NVIDIA H200"
    torch: str  # e.g. "2.11.0+cu130"
    cuda: str  # the CUDA torch was built with, e.g. "13.0"
    memflow: str = __version__

    @classmethod
    def current(cls, device) -> CompileKey:
        """The key of `device` (a CUDA device) with the running torch."""
        import torch

        return cls(torch.cuda.get_device_name(device), torch.__version__, torch.version.cuda or "none")

    @property
    def folder_name(self) -> str:
        """A readable folder name, one path component (no spaces, no separators)."""
        name = f"{self.gpu}-torch{self.torch}-cuda{self.cuda}-memflow{self.memflow}"
        return re.sub(r"[^A-Za-z0-9._+-]+", "_", name)


def compile_cache_dir(key: CompileKey, environ: Mapping[str, str] = os.environ) -> Path:
    """The folder of `key`'s compiled kernels in memflow's cache folder (`embed_cache.cache_root`)."""
    return cache_root(environ) / "compile" / key.folder_name


def device_cache_dir(device) -> Path:
    """The folder of the compiled kernels for `device` (a CUDA device) with the running torch."""
    return compile_cache_dir(CompileKey.current(device))


def compile_cache_env(folder: Path, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment that points torch's compile caches into `folder`; a cache folder the user set
    (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR) is left as it is."""
    wanted = {INDUCTOR_ENV: str(folder / "inductor"), TRITON_ENV: str(folder / "triton")}
    return {name: value for name, value in wanted.items() if not environ.get(name)}


def graphs_signature(description: dict[str, Any]) -> str:
    """A short stable name for the set of graphs a description (model, geometry, settings...) compiles."""
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def warm_marker(folder: Path, signature: str) -> Path:
    return folder / "warm" / f"{signature}.json"


def is_warm(folder: Path, signature: str) -> bool:
    """Whether a compiled video of these graphs finished with this cache folder (its kernels are there)."""
    return warm_marker(folder, signature).is_file()


def mark_warm(folder: Path, signature: str, description: dict[str, Any]) -> None:
    """Record that these graphs are compiled in `folder`; a cache that cannot be written is left alone."""
    marker = warm_marker(folder, signature)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        temporary = marker.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(description, sort_keys=True, default=str), encoding="utf-8")
        temporary.replace(marker)
    except OSError:
        pass  # only the next run's choice is affected: it compiles as if cold


class CompilePath(str, Enum):
    """Which way a run's model ran, as the sidecar and bench report it."""

    GRAPHED = "graphed"  # the default on CUDA: eager kernels, repeated passes replayed from CUDA graphs
    COMPILED_WARM = "compiled-warm"  # --compile, its kernels found in the cache
    COMPILED_COLD = "compiled-cold"  # --compile, compiled from scratch
    EAGER_ASKED = "eager (--no-compile)"
    EAGER_DEVICE = "eager (no compiled path on this device)"


@dataclass(frozen=True)
class CompileChoice:
    compile: bool | None  # what the engine is asked for (`load_engine`): True compiled, None graphed, False eager
    path: CompilePath
    reason: str  # one line, for the sidecar and the log


def choose_compile(asked: bool | None, chunks: int, *, cuda: bool, warm: bool) -> CompileChoice:
    """The fast path for a run of `chunks` chunks in all (every story of a batch shares the compile).

    `asked`: True (`--compile`) compiles with Inductor (a minute on a cold cache, `warm` says which), False
    (`--no-compile`) runs plain eager kernels, None the graphed path: compiled speed from the first
    repeated pass, with nothing to compile.
    """
    if not cuda:
        return CompileChoice(False, CompilePath.EAGER_DEVICE, "the compiled and graphed paths run on CUDA only")
    if asked is False:
        return CompileChoice(False, CompilePath.EAGER_ASKED, "--no-compile")
    if asked:
        cache = "warm" if warm else "cold"
        compiled = CompilePath.COMPILED_WARM if warm else CompilePath.COMPILED_COLD
        return CompileChoice(True, compiled, f"--compile (compile cache {cache})")
    return CompileChoice(None, CompilePath.GRAPHED, f"default: {chunks} chunks, repeated passes from CUDA graphs")
