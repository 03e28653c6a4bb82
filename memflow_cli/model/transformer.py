"""The causal Wan2.1 text-to-video transformer, run one chunk of latent frames at a time.

Parameter names follow the original Wan checkpoints (`blocks.0.self_attn.q`, ...),
so MemFlow's `base.pt` loads without renaming. The module is plain eager
PyTorch; caching lives in `cache.py` and the chunk loop in `generator.py`.
Faster kernels come from outside through one declared hook, the `Kernels` the model
is built with (`memflow_cli.speed` chooses them); the model never changes after it
is built. A model built with kernels whose layers hold their weights in another form
(q/k/v fused, FP8) is given its weights in that form by `model/build.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..settings import TransformerConfig
from .cache import KVMemory, TextCache
from .glue import PLAIN_GLUE, Glue, layer_norm, rms_norm
from .memory import CachePlan, sma_key_set

# q, k, v [B, H, N, D] -> [B, H, N, D]
AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# SMA's keys and values of one layer: `memory.sma_key_set`'s signature
KeySet = Callable[..., tuple[torch.Tensor, torch.Tensor]]
# (in features, out features) -> a layer that computes a Linear's output (an `nn.Linear`, or a faster form)
LinearFactory = Callable[[int, int], nn.Module]
# a block's pure step -> what runs it (e.g. a compiled copy)
StepWrapper = Callable[[Callable[..., Any]], Callable[..., Any]]


@dataclass(frozen=True)
class Kernels:
    """What computes the parts of a block that have other, faster forms; plain PyTorch by default.

    The model is built with them and never changes them (the fast path's choice: `speed.FastPath.kernels`).
    A layer made by `linear` or `linear_gelu` whose class has `state_from_linear(weight, bias)` holds its
    weights in its own form: `model.build.final_state` converts a checkpoint's Linear into it.
    """

    attention: AttentionKernel = F.scaled_dot_product_attention  # self-attention (cross-attention stays SDPA)
    sma_key_set: KeySet = sma_key_set  # SMA's per-head keys and values (`memory.sma_key_set` or a compiled copy)
    # the Linears every token of every pass goes through: self-attention's q, k, v (or qkv) and o,
    # cross-attention's q and o, the FFN's last (cross-attention's k and v, once per prompt, stay `nn.Linear`)
    linear: LinearFactory = nn.Linear
    linear_gelu: LinearFactory | None = None  # the FFN's first Linear and its tanh GELU as one; None: two modules
    fused_qkv: bool = False  # self-attention's q, k and v as one [3*dim, dim] Linear `qkv`: one matmul, not three
    block_step: StepWrapper | None = None  # what runs each block's two pure steps (None: the methods themselves)
    glue: Glue = PLAIN_GLUE  # the blocks' norms, modulation, rotary embedding and residuals (`glue.py`)


PLAIN_KERNELS = Kernels()


@dataclass
class PassState:
    """What every block of one pass needs besides the hidden states."""

    plan: CachePlan
    memory: KVMemory
    text: TextCache
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin: [N, 1, D/2]
    bank_view: int
    sma_top_k: int | None  # None: SMA off


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def timestep_sinusoid(dim: int, timesteps: torch.Tensor) -> torch.Tensor:
    """[cos | sin] embedding of float timesteps, computed in float64: [N, dim]."""
    half = dim // 2
    position = timesteps.double()
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=timesteps.device).div(half))
    angles = torch.outer(position, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Rotary pairs given to (time, height, width): 22/21/21 of 64 for head dim 128."""
    third = head_dim // 6
    return (head_dim - 4 * third) // 2, third, third


def rope_angles(config: TransformerConfig, frame0: int, frames: int, height: int, width: int, device) -> torch.Tensor:
    """Rotation angle of every (token, pair) for tokens of frames frame0.., in float64: [N, D/2].

    Frame positions are absolute latent-frame indices; they never re-base when the cache rolls.
    """
    pairs_t, pairs_h, pairs_w = rope_split(config.head_dim)

    def inv_freq(pairs: int) -> torch.Tensor:
        dim = 2 * pairs
        return 1.0 / torch.pow(10000, torch.arange(0, dim, 2, dtype=torch.float64, device=device).div(dim))

    f = torch.arange(frame0, frame0 + frames, dtype=torch.float64, device=device)
    h = torch.arange(height, dtype=torch.float64, device=device)
    w = torch.arange(width, dtype=torch.float64, device=device)
    angles_f = torch.outer(f, inv_freq(pairs_t))[:, None, None].expand(frames, height, width, pairs_t)
    angles_h = torch.outer(h, inv_freq(pairs_h))[None, :, None].expand(frames, height, width, pairs_h)
    angles_w = torch.outer(w, inv_freq(pairs_w))[None, None, :].expand(frames, height, width, pairs_w)
    return torch.cat([angles_f, angles_h, angles_w], dim=-1).reshape(frames * height * width, -1)


def rope_tables(angles: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [N, 1, D/2] in `dtype` (float64 for exact parity, float32 for speed)."""
    return torch.cos(angles).to(dtype)[:, None], torch.sin(angles).to(dtype)[:, None]


class AttentionProjections(nn.Module):
    """q/k/v/o projections with RMS-normalised queries and keys (named as in Wan checkpoints).

    `key_value` makes the k and v projections (the per-token `kernels.linear`, or a plain Linear for text);
    with `fused`, q, k and v are one Linear `qkv` [3*dim, dim], its rows q's, k's, then v's.
    """

    def __init__(self, config: TransformerConfig, kernels: Kernels, key_value: LinearFactory, fused: bool = False):
        super().__init__()
        dim = config.dim
        self.heads = config.num_heads
        if fused:
            self.qkv = kernels.linear(dim, 3 * dim)
        else:
            self.q, self.k, self.v = kernels.linear(dim, dim), key_value(dim, dim), key_value(dim, dim)
        self.o = kernels.linear(dim, dim)
        self.norm_q = RMSNorm(dim, config.eps)
        self.norm_k = RMSNorm(dim, config.eps)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, dim] -> [B, N, H, D]."""
        return x.unflatten(-1, (self.heads, -1))


class SelfAttention(AttentionProjections):
    """With `kernels.fused_qkv`, q, k and v are one projection, which fills a GPU better than three."""

    def __init__(self, config: TransformerConfig, kernels: Kernels = PLAIN_KERNELS):
        super().__init__(config, kernels, kernels.linear, fused=kernels.fused_qkv)
        self.fused_qkv = kernels.fused_qkv
        self.attention = kernels.attention
        self.glue = kernels.glue
        self.sma_key_set = kernels.sma_key_set

    def project(self, u: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """Rotary-embedded queries and keys, and values, each [B, H, N, D], from u [B, N, dim]."""
        if self.fused_qkv:
            q, k, v = self.qkv(u).chunk(3, dim=-1)
        else:
            q, k, v = self.q(u), self.k(u), self.v(u)
        q = self.glue.rms_norm_rope(q, self.norm_q.weight, self.norm_q.eps, rope)
        k = self.glue.rms_norm_rope(k, self.norm_k.weight, self.norm_k.eps, rope)
        v = self.split_heads(v).transpose(1, 2)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, state: PassState) -> torch.Tensor:
        """Write this pass's keys/values into the memory, attend over sink, window and bank: [B, N, dim]."""
        memory = state.memory
        memory.write(layer, state.plan, k, v)
        if state.sma_top_k is None:
            keys, values = memory.attention_kv(layer, state.plan, state.bank_view)
        else:
            keys, values = memory.sparse_attention_kv(
                layer, state.plan, state.bank_view, q, state.sma_top_k, key_set=self.sma_key_set
            )
        return self.attention(q, keys, values).transpose(1, 2).flatten(2)


class CrossAttention(AttentionProjections):
    def __init__(self, config: TransformerConfig, kernels: Kernels = PLAIN_KERNELS):
        super().__init__(config, kernels, nn.Linear)
        self.glue = kernels.glue

    def fill(self, context: torch.Tensor, layer: int, text: TextCache) -> None:
        """Compute this layer's text keys/values [B, H, T, D] into the text cache."""
        text.k[layer] = self.split_heads(self.norm_k(self.k(context))).transpose(1, 2)
        text.v[layer] = self.split_heads(self.v(context)).transpose(1, 2)

    def forward(self, x: torch.Tensor, text_k: torch.Tensor, text_v: torch.Tensor) -> torch.Tensor:
        q = self.split_heads(self.glue.rms_norm(self.q(x), self.norm_q.weight, self.norm_q.eps)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, text_k, text_v)
        return self.o(out.transpose(1, 2).flatten(2))


class BlockSteps(NamedTuple):
    """A block's two pure steps around its attention, as it runs them: its own methods, or compiled copies."""

    attention_inputs: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    after_attention: Callable[..., torch.Tensor]


def feed_forward(config: TransformerConfig, kernels: Kernels) -> nn.Sequential:
    """Linear, tanh GELU, Linear (indices 0 and 2 hold the checkpoint's weights, in either form)."""
    if kernels.linear_gelu is None:
        first, activation = kernels.linear(config.dim, config.ffn_dim), nn.GELU(approximate="tanh")
    else:
        first, activation = kernels.linear_gelu(config.dim, config.ffn_dim), nn.Identity()
    return nn.Sequential(first, activation, kernels.linear(config.ffn_dim, config.dim))


def modulation_parameter(rows: int, dim: int) -> nn.Parameter:
    """A learned modulation [1, rows, dim], initialised randn / sqrt(dim) as Wan does; left uninitialised where
    the model is built on the meta device (the checkpoint gives its values), because arithmetic on meta tensors
    loads torch's Python decompositions and dynamo, about a second of every process's load."""
    if torch.get_default_device().type == "meta":
        return nn.Parameter(torch.empty(1, rows, dim))
    return nn.Parameter(torch.randn(1, rows, dim) / dim**0.5)


class Block(nn.Module):
    def __init__(self, config: TransformerConfig, kernels: Kernels = PLAIN_KERNELS):
        super().__init__()
        self.eps = config.eps
        self.self_attn = SelfAttention(config, kernels)
        self.cross_attn = CrossAttention(config, kernels)
        self.norm3 = nn.LayerNorm(config.dim, eps=config.eps) if config.cross_attn_norm else nn.Identity()
        self.ffn = feed_forward(config, kernels)
        self.modulation = modulation_parameter(6, config.dim)
        self.glue = kernels.glue
        run = kernels.block_step or _as_is
        self.steps = BlockSteps(run(self.attention_inputs), run(self.after_attention))

    def attention_inputs(self, x: torch.Tensor, e0: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """Modulated, normalised input projected to q, k, v. x: [B, F, P, dim]; e0: [B, F, 6, dim]."""
        shift, scale = (self.modulation[:, None, :2] + e0[:, :, :2]).chunk(2, dim=2)  # [B, F, 1, dim] each
        u = self.glue.modulated_norm(x, shift, scale, self.eps)
        return self.self_attn.project(u.flatten(1, 2), rope)

    def after_attention(
        self, x: torch.Tensor, attn: torch.Tensor, e0: torch.Tensor, text_k: torch.Tensor, text_v: torch.Tensor
    ) -> torch.Tensor:
        """Gated self-attention output, cross-attention to the text, gated FFN. attn: [B, F*P, dim]."""
        gate1, shift2, scale2, gate2 = (self.modulation[:, None, 2:] + e0[:, :, 2:]).chunk(4, dim=2)
        frames = x.shape[1]
        x = self.glue.gated_residual(x, self.self_attn.o(attn).unflatten(1, (frames, -1)), gate1)
        crossed = self.cross_attn(self.norm3(x.flatten(1, 2)), text_k, text_v).unflatten(1, (frames, -1))
        x, ffn_input = self.glue.residual_norm(x, crossed, shift2, scale2, self.eps)
        return self.glue.gated_residual(x, self.ffn(ffn_input), gate2)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, layer: int, state: PassState) -> torch.Tensor:
        """One block: its first step, the attention over the memory, its second step."""
        q, k, v = self.steps.attention_inputs(x, e0, state.rope)
        attn = self.self_attn.attend(q, k, v, layer, state)
        return self.steps.after_attention(x, attn, e0, state.text.k[layer], state.text.v[layer])


def _as_is(step: Callable[..., Any]) -> Callable[..., Any]:
    return step


class Head(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.eps = config.eps
        self.head = nn.Linear(config.dim, config.out_dim * math.prod(config.patch_size))
        self.modulation = modulation_parameter(2, config.dim)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        # x: [B, F, P, dim]; e: [B, F, dim]
        shift, scale = (self.modulation[:, None] + e[:, :, None]).chunk(2, dim=2)
        return self.head(layer_norm(x, self.eps) * (1 + scale) + shift)


class CausalWanTransformer(nn.Module):
    """Wan2.1 T2V DiT whose self-attention reads and writes a `KVMemory`; its blocks are built with `kernels`."""

    def __init__(self, config: TransformerConfig, kernels: Kernels = PLAIN_KERNELS):
        super().__init__()
        self.config = config
        self.kernels = kernels
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(Block(config, kernels) for _ in range(config.num_layers))
        self.head = Head(config)

    def embed_text(self, context: torch.Tensor, text: TextCache) -> None:
        """Fill every layer's cross-attention cache from prompt embeddings [B, T, text_dim]."""
        embedded = self.text_embedding(context.to(self.patch_embedding.weight.dtype))
        for layer, block in enumerate(self.blocks):
            block.cross_attn.fill(embedded, layer, text)
        text.valid = True

    def forward(self, x: torch.Tensor, timestep: float, state: PassState) -> torch.Tensor:
        """Flow prediction for latents x [B, F, C, h, w] at one shared timestep."""
        b, frames, _, h, w = x.shape
        pt, ph, pw = self.config.patch_size
        dtype = self.patch_embedding.weight.dtype
        tokens = self.patch_embedding(x.transpose(1, 2).to(dtype))  # [B, dim, F, h/2, w/2]
        grid = tokens.shape[2:]
        tokens = tokens.flatten(2).transpose(1, 2).unflatten(1, (frames, -1))  # [B, F, P, dim]

        t = torch.full((b * frames,), timestep, dtype=torch.float64, device=x.device)
        e = self.time_embedding(timestep_sinusoid(self.config.freq_dim, t).to(dtype))  # [B*F, dim]
        e0 = self.time_projection(e).unflatten(1, (6, -1)).unflatten(0, (b, frames))  # [B, F, 6, dim]

        for layer, block in enumerate(self.blocks):
            tokens = block(tokens, e0, layer, state)

        out = self.head(tokens, e.unflatten(0, (b, frames)))  # [B, F, P, C*pt*ph*pw]
        # unpatchify: token (f, i, j), channel (a*pw + c_)*C + ch  ->  latent [B, F, C, i*ph + a, j*pw + c_]
        out = out.reshape(b, frames, grid[1], grid[2], pt, ph, pw, -1)
        out = out.permute(0, 1, 4, 7, 2, 5, 3, 6).reshape(b, frames * pt, -1, grid[1] * ph, grid[2] * pw)
        return out


# Computes one pass in place of `model(x, timestep, state)` (the model itself, or a CUDA graph replay of it).
PassFunction = Callable[[torch.Tensor, float, PassState], torch.Tensor]
