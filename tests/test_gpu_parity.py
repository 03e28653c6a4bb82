"""bf16 on the GPU stays faithful: the parity scenarios within relative L2 2e-2 of the float32 expectation."""

from __future__ import annotations

import pytest
import torch

from . import parity

BF16_BAR = 2e-2
MANIFEST = parity.manifest()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not MANIFEST["scenarios"], reason=f"no parity fixtures at {parity.PARITY_DIR}"),
]


# `compile` and `glue` of each path (`choose_fast_path`)
PATHS = {
    "eager": (False, False),
    "graphed": (None, False),
    "compiled": (True, False),
    "triton-graphed": (None, True),
    "triton": (False, True),
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("name", sorted(MANIFEST["scenarios"]))
def test_bf16_gpu_close_to_float32_expectation(name, path):
    compile, glue = PATHS[path]
    error, model = parity.fast_path_error(name, torch.device("cuda"), torch.bfloat16, compile=compile, glue=glue)
    assert model.blocks[0].glue.name == ("triton" if glue else "pytorch")  # no fallback to the PyTorch glue
    print(f"{name} ({path}): bf16 relative L2 {error:.3e}")
    assert error <= BF16_BAR
