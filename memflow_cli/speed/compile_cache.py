"""Compiled graphs kept across processes, and the choice, per run, of whether compiling pays off.

torch.compile's output (Inductor's FX graphs and autotuning results, Triton's kernels) is cached on disk;
by default torch keeps it in the temporary folder, which a reboot or a new machine empties. memflow keeps
it in the user's cache instead, one folder per GPU, torch, CUDA and memflow version (`CompileKey`), so a
second render on the same machine finds its kernels, and another torch never reads them:

    $MEMFLOW_CACHE_DIR, else $XDG_CACHE_HOME/memflow, else ~/.cache/memflow
        compile/<gpu>-torch<version>-cuda<version>-memflow<version>/
            inductor/  triton/  warm/<graphs>.json

A `warm/` marker is written once a compiled video of that shape finished: its graphs are then in the
cache. Compiling costs a render about a minute on a cold cache and ten seconds on a warm one, and saves
a fraction of a second on every chunk after the first, so `choose_compile` compiles only where the video
is long enough to win that back; a shorter one runs eager, which is never slower than `--no-compile`.
Deleting the folder is always safe: it only costs the next compiled render its warm-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..cache_dir import cache_root
from ..request import CompileMode

if TYPE_CHECKING:
    from ..settings import GenerationSettings

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
    """The folder of `key`'s compiled kernels in memflow's cache folder (`cache_dir.cache_root`)."""
    return cache_root(environ) / "compile" / key.folder_name


def device_cache_dir(device) -> Path:
    """The folder of the compiled kernels for `device` (a CUDA device) with the running torch."""
    return compile_cache_dir(CompileKey.current(device))


def compile_cache_env(folder: Path, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment that points torch's compile caches into `folder`; a cache folder the user set
    (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR) is left as it is."""
    wanted = {INDUCTOR_ENV: str(folder / "inductor"), TRITON_ENV: str(folder / "triton")}
    return {name: value for name, value in wanted.items() if not _set_by_user(name, environ)}


def _set_by_user(name: str, environ: Mapping[str, str]) -> bool:
    """Whether the user chose the folder of `name`. torch writes its own default into TORCHINDUCTOR_CACHE_DIR
    when dynamo is imported (diffusers imports it, before any model is built), so that value is torch's, not
    the user's."""
    value = environ.get(name)
    if not value:
        return False
    if name != INDUCTOR_ENV:
        return True
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # another torch: whatever is set stays
        return True
    return os.path.abspath(value) != os.path.abspath(default_cache_dir())


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

    GRAPHED = "graphed"  # eager kernels, repeated passes from CUDA graphs (the Python API: `CompileChoice.fixed(None)`)
    TRITON_GRAPHED = "triton-graphed"  # the graphed path with the blocks' glue in fused Triton kernels
    TRITON = "triton"  # the same without CUDA graphs (`CompileChoice.triton`)
    COMPILED_WARM = "compiled-warm"  # compiled, its kernels found in the cache
    COMPILED_COLD = "compiled-cold"  # compiled from scratch (--compile, or a video long enough to pay for it)
    COMPILED = "compiled"  # compiled, the cache not looked at (the Python API: `CompileChoice.fixed(True)`)
    EAGER = "eager"  # chosen: too short to win back the compile
    EAGER_ASKED = "eager (--no-compile)"
    EAGER_DEVICE = "eager (no compiled path on this device)"

    @property
    def triton(self) -> bool:
        """The blocks' glue runs in the fused Triton kernels on this path."""
        return self in (CompilePath.TRITON_GRAPHED, CompilePath.TRITON)


# What AUTO (neither --compile nor --no-compile) runs on CUDA where compiling does not pay. Measured on an
# H100 (issue #25): a steady chunk took 435 ms eager, 303 ms compiled and 283 ms with the fused Triton glue and
# CUDA graphs (the glue's kernels build in about 2 s on an empty Triton cache), so compiling never pays.
AUTO_UNCOMPILED = CompilePath.TRITON_GRAPHED


@dataclass(frozen=True)
class CompileCosts:
    """What compiling costs and saves a whole render process, in seconds.

    From the H200 measurements of issue #21 (832x480, 4 steps, FA3, the 40-chunk example, one process each):
    eager 48.4 s; compiled with warm caches 53.3 s, with empty caches 113.2 s. The chunks after the first
    took 23.9 s eager and 18.1 s compiled (0.149 s saved each), so the fixed cost of compiling is
    53.3 - 48.4 + 39 x 0.149 = 10.7 s warm (the first chunk's 5.2 s and the compiled engine's build and
    imports) and 70.6 s cold.
    """

    cold_s: float = 70.6
    warm_s: float = 10.7
    saved_per_chunk_s: float = 0.149  # against plain eager
    # against the fused Triton glue with CUDA graphs: on an H100 (issue #25) a steady chunk took 283 ms that
    # way and 303 ms compiled, so compiling loses time on every chunk
    saved_per_chunk_vs_triton_s: float = -0.020

    def saved_per_chunk(self, uncompiled: CompilePath) -> float:
        """Seconds a compiled chunk saves against the path AUTO runs otherwise."""
        return self.saved_per_chunk_vs_triton_s if uncompiled.triton else self.saved_per_chunk_s


H200_COSTS = CompileCosts()


@dataclass(frozen=True)
class CompileChoice:
    """Whether a run compiles, which way it runs and why: from the option to the engine and the sidecar."""

    compile: bool | None  # what the engine is asked for (`load_engine`): True compiled, None graphed, False eager
    path: CompilePath
    reason: str  # one line, for the sidecar and the log

    @property
    def glue(self) -> bool:
        """The blocks' glue runs in fused Triton kernels (`speed.glue`): `choose_fast_path(glue=True)`."""
        return self.path.triton

    @classmethod
    def triton(cls, graphs: bool = True, reason: str = "asked") -> CompileChoice:
        """The graphed path's layers with the fused Triton glue, its repeated passes replayed from CUDA graphs
        or (`graphs` False) launched one by one; nothing compiled by Inductor."""
        return cls(None, CompilePath.TRITON_GRAPHED, reason) if graphs else cls(False, CompilePath.TRITON, reason)

    @classmethod
    def uncompiled(cls, reason: str) -> CompileChoice:
        """What AUTO runs on CUDA where it does not compile: `AUTO_UNCOMPILED`."""
        if AUTO_UNCOMPILED.triton:
            return cls.triton(AUTO_UNCOMPILED is CompilePath.TRITON_GRAPHED, reason)
        return cls(False, CompilePath.EAGER, reason)

    @classmethod
    def fixed(cls, compile: bool | None, reason: str = "asked") -> CompileChoice:
        """As asked, the cache not looked at: compiled (True), graphed (None) or eager (False)."""
        path = {True: CompilePath.COMPILED, None: CompilePath.GRAPHED, False: CompilePath.EAGER_ASKED}[compile]
        return cls(compile, path, reason)


def choose_compile(
    asked: CompileMode, chunks: int, *, cuda: bool, warm: bool, costs: CompileCosts = H200_COSTS
) -> CompileChoice:
    """The fast path for a run of `chunks` chunks in all (every story of a batch shares the compile).

    `asked`: ALWAYS (`--compile`) always compiles with Inductor, NEVER (`--no-compile`) runs plain eager
    kernels, AUTO lets the video's length decide: compiled where the chunks after the first win back the
    compile on this cache (`warm`), else `AUTO_UNCOMPILED`. That is the fused Triton glue with CUDA graphs,
    which runs a chunk faster than compiled code, so AUTO never compiles. (The graphed path, eager kernels
    replayed from CUDA graphs, ran no faster than eager on an H100: `CompileChoice.fixed(None)` asks for it.)
    """
    if not cuda:
        return CompileChoice(False, CompilePath.EAGER_DEVICE, "the compiled and graphed paths run on CUDA only")
    if asked is CompileMode.NEVER:
        return CompileChoice(False, CompilePath.EAGER_ASKED, "--no-compile")
    cost = costs.warm_s if warm else costs.cold_s
    per_chunk = costs.saved_per_chunk(AUTO_UNCOMPILED)
    saved = max(0, chunks - 1) * per_chunk
    compiled = CompilePath.COMPILED_WARM if warm else CompilePath.COMPILED_COLD
    cache = "warm" if warm else "cold"
    if asked is CompileMode.ALWAYS:
        return CompileChoice(True, compiled, f"--compile (compile cache {cache})")
    if per_chunk <= 0:
        return CompileChoice.uncompiled(f"{AUTO_UNCOMPILED.value} runs a chunk faster than compiled code")
    balance = f"{chunks} chunks save {saved:.1f} s, compiling costs {cost:.1f} s (compile cache {cache})"
    if saved > cost:
        return CompileChoice(True, compiled, balance)
    return CompileChoice.uncompiled(balance)


# -- the videos of one run ----------------------------------------------------------------------------------


def graphs_description(architecture: str, settings: GenerationSettings, fp8: bool) -> dict[str, Any]:
    """What decides the graphs a run compiles: the transformer's shape (`ModelSource.architecture`), the
    generation settings and FP8."""
    return {"model": architecture, "settings": settings.as_dict(), "fp8": fp8}


def choose_for_videos(
    asked: CompileMode, device, architecture: str, fp8: bool, videos: Sequence[tuple[int, GenerationSettings]]
) -> CompileChoice:
    """Compile or not for these videos together (each its chunks and settings), from the chunks they make in
    all and whether their graphs are in the compile cache of `device` (a torch device)."""
    if device.type != "cuda":
        return choose_compile(asked, 0, cuda=False, warm=False)
    folder = device_cache_dir(device)
    chunks = sum(video_chunks for video_chunks, _ in videos)
    signatures = [graphs_signature(graphs_description(architecture, settings, fp8)) for _, settings in videos]
    return choose_compile(asked, chunks, cuda=True, warm=all(is_warm(folder, s) for s in signatures))


def remember_compiled(device, architecture: str, settings: GenerationSettings, fp8: bool) -> None:
    """A compiled video of these graphs finished on `device`: the next run finds them warm."""
    description = graphs_description(architecture, settings, fp8)
    mark_warm(device_cache_dir(device), graphs_signature(description), description)
