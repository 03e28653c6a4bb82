"""The elementwise glue of a transformer block, between its matmuls and attentions, in plain PyTorch.

`Glue` is what a block calls for its norms, modulation, rotary embedding and residuals; the model is built
with one (`Kernels.glue`). This one is the reference: each method is the PyTorch op sequence the official
model runs, rounding to the model's dtype after every op as eager PyTorch does. A faster one (fused
Triton kernels, `speed.glue.TritonGlue`) keeps the same contracts.

Shapes: x, y [B, F, P, dim] (P tokens per frame), shift/scale/gate [B, F, 1, dim] (one per frame), rope
tables [N, 1, D/2] (cos, sin per token and rotary pair), where a head has D = 2 * (D/2) dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Non-affine LayerNorm in the input dtype (the kernel accumulates in float32)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation in float32, rounded to x's dtype, then scaled by `weight`."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)).type_as(x) * weight


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate consecutive pairs of x [B, N, H, D] by the table's angles; computed in the table's dtype."""
    cos, sin = rope
    pairs = x.to(cos.dtype).unflatten(-1, (-1, 2))  # [B, N, H, D/2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


class Glue:
    """A block's elementwise steps, each the plain PyTorch sequence (the reference path)."""

    name = "pytorch"

    def modulated_norm(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        """LayerNorm(x) * (1 + scale) + shift."""
        return layer_norm(x, eps) * (1 + scale) + shift

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """`rms_norm` of x [..., dim]."""
        return rms_norm(x, weight, eps)

    def rms_norm_rope(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """x [B, N, dim] RMS-normalised, split into heads and rotated: [B, H, N, D] (a view of [B, N, H, D])."""
        head_dim = 2 * rope[0].shape[-1]
        return apply_rope(rms_norm(x, weight, eps).unflatten(-1, (-1, head_dim)), rope).transpose(1, 2)

    def gated_residual(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """x + y * gate."""
        return x + y * gate

    def residual_norm(
        self, x: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual x + y, and its `modulated_norm` (the FFN's input)."""
        x = x + y
        return x, self.modulated_norm(x, shift, scale, eps)


PLAIN_GLUE = Glue()
