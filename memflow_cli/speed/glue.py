"""A block's elementwise glue as fused Triton kernels: `TritonGlue`, the same contracts as `model.glue.Glue`.

Eager PyTorch runs each norm, modulation, rotary embedding and residual as several kernels, each reading
and writing the whole [tokens, dim] activation; Inductor fuses them, at the price of a compile. These
kernels fuse them by hand: one program per token row (dim 1536, one block of 2048 lanes), float32 math,
rounded to the model's dtype where eager PyTorch rounds (`.to(dtype).to(tl.float32)`, written out: Triton's
interpreter cannot call a helper when Triton was imported before it was turned on), so that the result is
eager's up to the order of float32 sums. Launch configurations are fixed (no autotuning), and `warm_up`
compiles every kernel at the model's sizes on tiny tensors, so the JIT's cost (Triton keeps the binaries in
its disk cache) shows in the load, never in the middle of a render. Importing this module needs Triton, not
a GPU.
"""

from __future__ import annotations

import time

import torch
import triton
import triton.language as tl

from ..model.glue import Glue

WARPS = 4  # per program: a 2048-lane row is 16 values a thread
# integer arguments that change with the video (tokens per frame, tokens per pass): never specialised on, so
# the kernels compiled by `warm_up` on tiny tensors are the ones a render runs
VARYING = ["tokens_per_frame", "tokens"]


@triton.jit(do_not_specialize=VARYING)
def _modulated_norm_kernel(
    x_ptr, y_ptr, shift_ptr, scale_ptr, sum_ptr, out_ptr,
    x_stride, y_stride, mod_stride, tokens_per_frame, eps,
    DIM: tl.constexpr, BLOCK: tl.constexpr, RESIDUAL: tl.constexpr,
):  # fmt: skip
    """out = LayerNorm(x) * (1 + scale) + shift, each op rounded (RESIDUAL: of x + y, which is stored in sum)."""
    row = tl.program_id(0)
    frame = row // tokens_per_frame
    cols = tl.arange(0, BLOCK)
    mask = cols < DIM
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        y = tl.load(y_ptr + row * y_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + y).to(dtype).to(tl.float32)
        tl.store(sum_ptr + row * DIM + cols, x.to(dtype), mask=mask)
    mean = tl.sum(x, axis=0) / DIM
    centred = tl.where(mask, x - mean, 0.0)
    normed = (centred * tl.rsqrt(tl.sum(centred * centred, axis=0) / DIM + eps)).to(dtype).to(tl.float32)
    scale = tl.load(scale_ptr + frame * mod_stride + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + frame * mod_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = (normed * (1.0 + scale).to(dtype).to(tl.float32)).to(dtype).to(tl.float32) + shift
    tl.store(out_ptr + row * DIM + cols, u.to(dtype), mask=mask)


@triton.jit(do_not_specialize=VARYING)
def _gated_residual_kernel(
    x_ptr, y_ptr, gate_ptr, out_ptr, x_stride, y_stride, gate_stride, tokens_per_frame,
    DIM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """out = x + y * gate, the product rounded first."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < DIM
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * y_stride + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + (row // tokens_per_frame) * gate_stride + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * DIM + cols, (x + (y * gate).to(dtype).to(tl.float32)).to(dtype), mask=mask)


@triton.jit(do_not_specialize=VARYING)
def _rms_norm_kernel(
    x_ptr, weight_ptr, cos_ptr, sin_ptr, out_ptr, x_stride, tokens, eps,
    DIM: tl.constexpr, BLOCK: tl.constexpr, ROPE: tl.constexpr, HALF_HEAD: tl.constexpr,
):  # fmt: skip
    """out = RMSNorm(x) * weight (ROPE: then each head's consecutive pairs rotated by the row's angles,
    in the tables' dtype)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < DIM
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    normed = (x * tl.rsqrt(tl.sum(x * x, axis=0) / DIM + eps)).to(dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    scaled = (normed * weight).to(dtype).to(tl.float32)
    if ROPE:
        even, odd = tl.split(tl.reshape(scaled, (BLOCK // 2, 2)))
        pair = (row % tokens) * HALF_HEAD + tl.arange(0, BLOCK // 2) % HALF_HEAD
        cos = tl.load(cos_ptr + pair)
        sin = tl.load(sin_ptr + pair)
        even, odd = even.to(cos.dtype), odd.to(cos.dtype)
        scaled = tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (BLOCK,))
    tl.store(out_ptr + row * DIM + cols, scaled.to(dtype), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, dim] with unit stride along dim and one stride between rows (a view where it can be)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _per_frame(mod: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A modulation [B, F, 1, dim] for x [B, F, P, dim] as [B*F, dim] rows."""
    if mod.shape[:-2] != x.shape[:-2] or mod.shape[-2:] != (1, x.shape[-1]):
        raise ValueError(f"a modulation of shape {tuple(mod.shape)} does not fit tokens {tuple(x.shape)}")
    return _rows(mod)


def _block(dim: int) -> int:
    return triton.next_power_of_2(dim)


class TritonGlue(Glue):
    """`Glue` whose every step is one fused Triton kernel (CUDA tensors; the interpreter runs them on the CPU)."""

    name = "triton"

    def __init__(self):
        self.warm_up_s: float | None = None  # how long `warm_up` took (the kernels' JIT, or reading its cache)

    def modulated_norm(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        return self._modulated(x, None, shift, scale, eps)[1]

    def residual_norm(
        self, x: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._modulated(x, y, shift, scale, eps)

    def gated_residual(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        rows, ys, gates = _rows(x), _rows(y), _per_frame(gate, x)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dim = x.shape[-1]
        _gated_residual_kernel[(rows.shape[0],)](
            rows, ys, gates, out, rows.stride(0), ys.stride(0), gates.stride(0), x.shape[-2],
            DIM=dim, BLOCK=_block(dim), num_warps=WARPS,
        )  # fmt: skip
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self._rms_norm(x, weight, eps, None)

    def rms_norm_rope(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        head_dim = 2 * rope[0].shape[-1]
        return self._rms_norm(x, weight, eps, rope).unflatten(-1, (-1, head_dim)).transpose(1, 2)

    def _modulated(
        self, x: torch.Tensor, y: torch.Tensor | None, shift: torch.Tensor, scale: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + y, its modulated norm), or with y None (x, x's modulated norm)."""
        rows, shifts, scales = _rows(x), _per_frame(shift, x), _per_frame(scale, x)
        if shifts.stride(0) != scales.stride(0):
            shifts, scales = shifts.contiguous(), scales.contiguous()
        ys = rows if y is None else _rows(y)
        total = x if y is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dim = x.shape[-1]
        _modulated_norm_kernel[(rows.shape[0],)](
            rows, ys, shifts, scales, total, out, rows.stride(0), ys.stride(0), shifts.stride(0), x.shape[-2], eps,
            DIM=dim, BLOCK=_block(dim), RESIDUAL=y is not None, num_warps=WARPS,
        )  # fmt: skip
        return total, out

    def _rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        """x [..., dim] RMS-normalised and scaled; with `rope` (tables [N, 1, D/2], x [B, N, dim]) rotated."""
        rows = _rows(x)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dim = x.shape[-1]
        if rope is None:
            cos = sin = weight  # not read
            tokens, half_head = 1, 1
        else:
            cos, sin = rope[0].contiguous(), rope[1].contiguous()
            tokens, half_head = x.shape[-2], cos.shape[-1]
            if cos.shape[0] != tokens or dim % (2 * half_head):
                raise ValueError(f"rotary tables {tuple(cos.shape)} do not fit tokens {tuple(x.shape)}")
        _rms_norm_kernel[(rows.shape[0],)](
            rows, weight, cos, sin, out, rows.stride(0), tokens, eps,
            DIM=dim, BLOCK=_block(dim), ROPE=rope is not None, HALF_HEAD=half_head, num_warps=WARPS,
        )  # fmt: skip
        return out

    def warm_up(self, dim: int, head_dim: int, device: torch.device, dtype: torch.dtype) -> None:
        """Compile every kernel for rows of `dim` in `dtype` on `device` (heads of `head_dim`), with the
        layouts a block hands them: contiguous tokens, q and k as views of one fused qkv, modulations as
        views of one [B, F, n, dim] tensor, rotary tables in the dtype the generator makes them."""
        started = time.perf_counter()
        rope_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else torch.float64  # as the generator
        zeros = torch.zeros((1, 1, 2, dim), dtype=dtype, device=device)
        shift, scale = torch.zeros((1, 1, 2, dim), dtype=dtype, device=device).chunk(2, dim=2)
        gate = torch.zeros((1, 1, 4, dim), dtype=dtype, device=device).chunk(4, dim=2)[0]
        q, k, _ = torch.zeros((1, 2, 3 * dim), dtype=dtype, device=device).chunk(3, dim=-1)
        rope = tuple(torch.zeros((2, 1, head_dim // 2), dtype=rope_dtype, device=device) for _ in range(2))
        weight = torch.ones(dim, dtype=dtype, device=device)
        self.modulated_norm(zeros, shift, scale, 1e-6)
        self.residual_norm(zeros, zeros, shift, scale, 1e-6)
        self.gated_residual(zeros, zeros, gate)
        self.rms_norm(q, weight, 1e-6)
        self.rms_norm_rope(q, weight, 1e-6, rope)
        self.rms_norm_rope(k, weight, 1e-6, rope)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.warm_up_s = time.perf_counter() - started


def triton_glue(dim: int, head_dim: int, device: torch.device, dtype: torch.dtype) -> TritonGlue:
    """Fused glue for a model of `dim` and `head_dim` in `dtype` on `device`, its kernels compiled."""
    glue = TritonGlue()
    glue.warm_up(dim, head_dim, device, dtype)
    return glue
