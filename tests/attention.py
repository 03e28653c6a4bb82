"""Attention stand-ins shared by the kernel, generator and GPU tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flash_layout_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA behind flash-attn's calling convention: [B, N, H, D] in, a new [B, N, H, D] tensor out."""
    assert q.dim() == k.dim() == v.dim() == 4 and q.shape[2:] == k.shape[2:] == v.shape[2:]  # heads third
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()
