"""FP8 linear layers for the transformer's blocks: e4m3 values with one float32 scale per row.

A weight is quantised once, one scale per output channel; an activation on the fly, one scale per token.
Each row's largest magnitude maps onto e4m3's largest value (448), so a row keeps 3 mantissa bits of
relative precision whatever its size. The matmul is torch's `_scaled_mm`, which multiplies the e4m3 values
with float32 accumulation and applies both scales (and the bias) in its epilogue; on an H200 it runs the
FFN's [4680 x 1536] x [1536 x 8960] product about 1.5 times as fast as bf16, with about 4% error on random
data. That changes the video slightly: it is opt-in (`--fp8`).

Quantising and dequantising are plain tensor functions with a float32 reference matmul beside them, so the
arithmetic is checked on any machine; `scaled_matmul` is the one call into the FP8 kernel.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..model.transformer import Kernels
from .linear import LinearGELU

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn value
# A row whose largest magnitude is below this is quantised as if it were this large: an all-zero row gets
# a finite scale and comes back as zeros instead of 0/0.
SMALLEST_ROW_MAX = 1e-12
# `_scaled_mm` needs the inner size and the output size to be multiples of 16
FP8_ALIGNMENT = 16
# A trial matmul on the device must come this close to the float32 reference (relative L2): bf16 rounding
# of the output gives about 2e-3, a kernel that reads a scale or an operand wrongly about 1.
FAITHFUL_FP8_MATMUL = 1e-2
NEEDS_GPU = "needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper or later)"


def quantise_with_scales(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x / scales as e4m3, saturated at +-448 (a plain cast would turn values past e4m3's range into NaN)."""
    return (x.float() / scales).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def row_scales(x: torch.Tensor) -> torch.Tensor:
    """The float32 scale [R, 1] that maps each row's largest magnitude of x [R, K] onto 448."""
    row_max = x.float().abs().amax(dim=-1, keepdim=True)
    return row_max.clamp(min=SMALLEST_ROW_MAX) / E4M3_MAX


def quantise_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] as e4m3 values [R, K] and float32 scales [R, 1]: row i is about values[i] * scales[i]."""
    scales = row_scales(x)
    return quantise_with_scales(x, scales), scales


def dequantise_rows(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 rows [R, K] that e4m3 `values` [R, K] with `scales` [R, 1] stand for."""
    return values.float() * scales


def reference_matmul(
    x_values: torch.Tensor,
    x_scales: torch.Tensor,
    w_values: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """What `scaled_matmul` computes, in float32 from the dequantised operands: [M, N]."""
    out = dequantise_rows(x_values, x_scales) @ dequantise_rows(w_values, w_scales).T
    return out if bias is None else out + bias.float()


def scaled_matmul(
    x_values: torch.Tensor,
    x_scales: torch.Tensor,
    w_values: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """x [M, K] times w [N, K] transposed, both e4m3 with row scales ([M, 1], [N, 1]), plus bias: [M, N].

    The FP8 kernel takes its second operand column-major ([K, N] as a view of w [N, K]) and its scales as
    [M, 1] and [1, N]; the bias must have the output's dtype (bf16 or fp16 on CUDA).
    """
    return torch._scaled_mm(
        x_values, w_values.t(), scale_a=x_scales, scale_b=w_scales.view(1, -1), bias=bias, out_dtype=out_dtype
    )


class Fp8Linear(nn.Module):
    """A Linear layer whose matmul runs in FP8: the weight quantised once per output channel (at load, by
    `state_from_linear`), the input per token at every call. With `gelu`, the tanh GELU follows (in place of
    `LinearGELU`'s fused epilogue).

    Holds no parameter: `weight` is the e4m3 values [out, in], `weight_scale` their float32 scales [out, 1],
    `bias` is in the model's dtype. The model is built with it (`fp8_kernels`); its state comes from a
    checkpoint's Linear through `model.build.final_state`.
    """

    def __init__(self, in_features: int, out_features: int, gelu: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.gelu = gelu
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=E4M3))
        self.register_buffer("weight_scale", torch.empty(out_features, 1, dtype=torch.float32))
        self.register_buffer("bias", torch.empty(out_features))

    @staticmethod
    def state_from_linear(weight: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
        """This layer's state for a Linear's `weight` [out, in] and `bias` [out] (in the model's dtype)."""
        values, scales = quantise_rows(weight)
        return {"weight": values, "weight_scale": scales, "bias": bias}

    @classmethod
    def from_linear(cls, linear: nn.Linear, gelu: bool = False) -> Fp8Linear:
        """A new FP8 layer that computes `linear` (with `gelu`, and its GELU), its weight quantised."""
        with torch.device(linear.weight.device):
            layer = cls(linear.in_features, linear.out_features, gelu)
        layer.load_state_dict(cls.state_from_linear(linear.weight.detach(), linear.bias.detach()), assign=True)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_values, x_scales = quantise_rows(x.flatten(0, -2))  # [tokens, in]
        out = scaled_matmul(x_values, x_scales, self.weight, self.weight_scale, self.bias, x.dtype)
        if self.gelu:
            out = F.gelu(out, approximate="tanh")
        return out.unflatten(0, x.shape[:-1])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, gelu={self.gelu}"


def fp8_sizes(in_features: int, out_features: int) -> bool:
    """Whether the FP8 kernel takes a Linear of these sizes."""
    return in_features % FP8_ALIGNMENT == 0 and out_features % FP8_ALIGNMENT == 0


def fp8_linear(in_features: int, out_features: int) -> nn.Module:
    """An FP8 Linear where the kernel takes its sizes, else a plain one (`Kernels.linear`)."""
    if fp8_sizes(in_features, out_features):
        return Fp8Linear(in_features, out_features)
    return nn.Linear(in_features, out_features)


def fp8_linear_gelu(in_features: int, out_features: int) -> nn.Module:
    """An FP8 Linear and its GELU where the kernel takes its sizes, else `LinearGELU` (`Kernels.linear_gelu`)."""
    if fp8_sizes(in_features, out_features):
        return Fp8Linear(in_features, out_features, gelu=True)
    return LinearGELU(in_features, out_features)


def fp8_kernels(kernels: Kernels) -> Kernels:
    """`kernels` with the Linears that see every token of every pass in FP8.

    In each block: self-attention's q, k, v (or qkv) and output projections, cross-attention's query and
    output projections and both FFN layers. The rest stays in the model's dtype: cross-attention's keys and
    values (computed once per prompt from 512 text tokens, then read by every chunk), the embeddings, the
    head, the norms and the modulation, which together are a small share of the matmul time.
    """
    linear_gelu = None if kernels.linear_gelu is None else fp8_linear_gelu
    return replace(kernels, linear=fp8_linear, linear_gelu=linear_gelu)


def fp8_unsupported_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why FP8 linear layers cannot run for a `dtype` model on `device` (one line for the user), else None.

    Beyond the GPU, torch and dtype, a small trial matmul must run and agree with the float32 reference:
    some builds of torch lack the row-wise kernel for some GPUs.
    """
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return f"needs torch's FP8 matmul (torch._scaled_mm), which torch {torch.__version__} does not have"
    if device.type != "cuda":
        return f"{NEEDS_GPU}; this run uses {device}"
    if not torch.cuda.is_available():
        return f"{NEEDS_GPU}; no CUDA GPU is available to this torch ({torch.__version__})"
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"{NEEDS_GPU}; there is no {device} (this machine has {torch.cuda.device_count()} CUDA GPU(s))"
    name = torch.cuda.get_device_name(device)
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return f"{NEEDS_GPU}; {name} is {capability[0]}.{capability[1]}"
    if dtype != torch.bfloat16:
        return f"runs bf16 models only; this one is {str(dtype).removeprefix('torch.')}"
    return _trial_matmul_failure(device, name)


def _trial_matmul_failure(device: torch.device, gpu: str) -> str | None:
    """None where a row-wise scaled FP8 matmul runs on `device` and agrees with the reference."""
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn((40, 64), generator=generator, device=device)
    w = torch.randn((48, 64), generator=generator, device=device)
    bias = torch.randn(48, generator=generator, device=device).bfloat16()
    (x_values, x_scales), (w_values, w_scales) = quantise_rows(x), quantise_rows(w)
    failed = f"failed a test call on {gpu}: torch {torch.__version__}"
    try:
        out = scaled_matmul(x_values, x_scales, w_values, w_scales, bias, torch.bfloat16)
    except RuntimeError as error:
        first_line = (str(error).strip() or type(error).__name__).splitlines()[0]
        return f"{failed} has no row-wise scaled FP8 matmul for it ({first_line})"
    expected = reference_matmul(x_values, x_scales, w_values, w_scales, bias)
    error = ((out.float() - expected).norm() / expected.norm()).item()
    if not error <= FAITHFUL_FP8_MATMUL:  # NaN included
        return f"{failed} computes its FP8 matmul {error:.1e} away from float32 (relative L2)"
    return None
