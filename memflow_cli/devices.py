"""Device names as the options take them, checked before torch is imported or anything loads.

memflow runs on `cpu` and on CUDA GPUs (`cuda`, `cuda:N`); torch knows more names (`mps`, `meta`, `xpu`,
`cpu:7`...), which would load the weights for seconds and then fail, or run somewhere else than asked.
Whether the GPU named is there is checked later, with torch (`plan.checked_device`).
"""

from __future__ import annotations

import re

from .text import one_line

_DEVICE_RE = re.compile(r"(?P<type>[a-z]+)(?::(?P<index>[0-9]+))?\Z", re.ASCII)
DEVICE_HINT = "use cpu, cuda or cuda:N (memflow runs on the CPU and on CUDA GPUs)"


def device_problem(device: str, option: str = "--device") -> tuple[str, str] | None:
    """Why `device` is not a device memflow runs on (a message and a hint), or None if its name is fine."""
    match = _DEVICE_RE.match(device)
    shown = one_line(device)
    if match is None:
        return f"{option} {shown}: not a device name", DEVICE_HINT
    kind, index = match["type"], match["index"]
    if kind == "cpu" and index is not None and int(index) != 0:
        return f"{option} {shown}: there is one CPU device, cpu (its threads are all used)", "use --device cpu"
    if kind not in ("cpu", "cuda"):
        return f"{option} {shown}: memflow does not run on {kind} devices", DEVICE_HINT
    return None
