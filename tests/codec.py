"""Reading the codec fixtures (the official Wan VAE and umT5 encoder on tiny random weights)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from .parity import ROOT

CODEC_DIR = Path(os.environ.get("MEMFLOW_CODEC_DIR", ROOT.parent / "shared" / "parity" / "codec"))
REQUIRED = "MEMFLOW_CODEC_DIR" in os.environ or os.environ.get("CI", "").lower() in ("1", "true")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# on the GPU, a fast decode path's bf16 error to float32 may exceed the official-style bf16 path's by at most 10%
FAST_PATH_MARGIN = 1.1


def manifest() -> dict[str, Any]:
    path = CODEC_DIR / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def diffusers_config(path: Path) -> dict[str, Any]:
    """A diffusers config.json as constructor arguments (its `_class_name`, `_diffusers_version`... left out)."""
    return {key: value for key, value in json.loads(path.read_text()).items() if not key.startswith("_")}


def bar(man: dict[str, Any], dtype: str) -> dict[str, float]:
    """The manifest's bar for a dtype: float32 holds everywhere, bfloat16 on a matching CPU."""
    return man["bar"]["float32" if dtype == "float32" else "bfloat16_cpu"]


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def bfloat16_mismatch(environment: dict[str, Any]) -> str | None:
    """Why this machine's bf16 CPU kernels may round differently from the fixture's, or None where they match.

    The fixture's README: same torch minor version, same kernel capability, the same bf16 flags, no AMX.
    """
    wanted_torch = ".".join(environment["torch"].split("+")[0].split(".")[:2])
    ours_torch = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if ours_torch != wanted_torch:
        return f"torch {torch.__version__}, the bfloat16 expectations were made with {environment['torch']}"
    if platform.machine() != environment["machine"]:
        return f"a {platform.machine()} machine, the bfloat16 expectations were made on {environment['machine']}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != environment["cpu_capability"]:
        return f"CPU kernel capability {capability}, the bfloat16 expectations need {environment['cpu_capability']}"
    flags = cpu_flags()
    missing = sorted(set(environment["cpu_flags"]) - flags)
    if missing:
        return f"the CPU lacks {', '.join(missing)}, which the bfloat16 expectations were made with"
    amx = sorted(flag for flag in flags if flag.startswith("amx"))
    if amx:
        return f"the CPU has {', '.join(amx)} (AMX kernels round bfloat16 differently from the fixture's)"
    return None


def relative_l2(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return float((ours.double() - expected.double()).norm() / expected.double().norm())
