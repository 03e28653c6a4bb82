"""The linear layers of the transformer's blocks on the fast path.

This is where a block's Linear layers get other kernels: `FastPath.kernels` names the classes the blocks
are built with (`Kernels.linear`, `Kernels.linear_gelu`), each keeping `nn.Linear`'s parameter names so
checkpoints load into it unchanged. FP8 (`fp8.py`, `FastPath.fp8`) is applied to the loaded weights
instead: a quantised layer holds e4m3 values, not the checkpoint's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearGELU(nn.Linear):
    """A Linear layer and the tanh-GELU after it as one matmul whose epilogue adds the bias and applies GELU.

    On CUDA, where cuBLASLt takes the call (bf16 and float32 at the transformer's shapes), that is its GELU
    epilogue (the tanh form) applied to the float32 accumulator before the single rounding to the output
    dtype: faster than a matmul plus a separate GELU pass, and slightly closer to float32. Elsewhere it is
    the plain Linear and GELU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:  # the CPU kernel of `_addmm_activation` applies the exact (erf) GELU: not ours
            return F.gelu(F.linear(x, self.weight, self.bias), approximate="tanh")
        flat = torch._addmm_activation(self.bias, x.flatten(0, -2), self.weight.t(), use_gelu=True)
        return flat.unflatten(0, x.shape[:-1])
