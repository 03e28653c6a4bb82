"""A block's attention-input step stores the pass's rotary keys and values into their cache slots."""

from __future__ import annotations

import pytest
import torch

from memflow_cli.model.cache import KVMemory
from memflow_cli.model.transformer import Block, apply_rope, layer_norm, rope_angles, rope_tables
from memflow_cli.settings import MemorySettings, TransformerConfig

CONFIG = TransformerConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_len=3)  # head dim 32
GRID = (2, 3)  # latent grid of one frame after patching
P = GRID[0] * GRID[1]  # tokens per frame
SENTINEL = 7.0  # what the cache holds before a pass


def make_block(fused: bool) -> Block:
    torch.manual_seed(0)
    block = Block(CONFIG).eval().requires_grad_(False)
    block.modulation.zero_()  # with e0 = 0 the modulated input is the plain layer norm
    if fused:  # as on the fast path: v is a slice of the one q/k/v matmul's output
        block.self_attn.fuse_qkv()
    return block


def make_memory() -> KVMemory:
    memory = KVMemory(CONFIG, MemorySettings(window=4, sink=1, bank_size=2), P, 1, "cpu", torch.float32)
    memory.kv.fill_(SENTINEL)
    return memory


def expected_qkv(block: Block, x: torch.Tensor, rope) -> tuple[torch.Tensor, ...]:
    """Rotary q, k and plain v [B, H, N, D] of x [B, F, P, dim], from the block's projections."""
    attn = block.self_attn
    u = layer_norm(x, CONFIG.eps).flatten(1, 2)  # [B, N, dim]
    q = apply_rope(attn.split_heads(attn.norm_q(attn.q(u))), rope)
    k = apply_rope(attn.split_heads(attn.norm_k(attn.k(u))), rope)
    return q.transpose(1, 2), k.transpose(1, 2), attn.split_heads(attn.v(u)).transpose(1, 2)


def run_step(block: Block, memory: KVMemory, plan, layer: int, frame0: int, frames: int):
    """The attention-input step of one pass over frames frame0..; returns its queries and the expected q, k, v."""
    torch.manual_seed(frame0)
    x = torch.randn(1, frames, P, CONFIG.dim)
    e0 = torch.zeros(1, frames, 6, CONFIG.dim)
    rope = rope_tables(rope_angles(CONFIG, frame0, frames, *GRID, "cpu"), torch.float64)
    q = block.attention_inputs(x, e0, rope, memory.slots(layer, plan), plan.write_offset)
    return q, *expected_qkv(block, x, rope)


def assert_only_written(memory: KVMemory, layer: int, written: slice) -> None:
    untouched = torch.ones_like(memory.kv, dtype=torch.bool)
    untouched[:, layer, :, :, written] = False
    assert (memory.kv[untouched] == SENTINEL).all()


FUSED = pytest.mark.parametrize("fused", [False, True], ids=["qkv", "fused-qkv"])


@FUSED
def test_pass_stores_its_keys_and_values_at_its_slots(fused):
    block, memory = make_block(fused), make_memory()
    plan = memory.plan(0, 2 * P)  # chunk 0 of 2 frames: tokens [0, 2P)
    q, q_ref, k_ref, v_ref = run_step(block, memory, plan, 1, 0, 2)
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(memory.kv[0, 1, :, :, : 2 * P], k_ref)
    torch.testing.assert_close(memory.kv[1, 1, :, :, : 2 * P], v_ref)
    assert_only_written(memory, 1, slice(0, 2 * P))  # the other layer and the rest of this one untouched


@FUSED
def test_recompute_pass_stores_only_its_written_part_and_keeps_the_sink(fused):
    block, memory = make_block(fused), make_memory()
    for chunk in range(3):  # frames 0..5 committed (positions only): cache [0, 3, 4, 5]
        plan = memory.plan(chunk * 2 * P, 2 * P)
        memory.begin(plan)
        memory.commit(plan, stage=False, record_interval=1, chunk_tokens=2 * P)
    plan = memory.plan(2 * P, 4 * P)  # re-cache of frames 2..5; frame 2 would land in the sink
    assert plan.is_recompute and (plan.write_start, plan.write_offset, plan.end) == (P, P, 4 * P)
    memory.begin(plan)
    memory.kv.fill_(SENTINEL)
    q, q_ref, k_ref, v_ref = run_step(block, memory, plan, 0, 2, 4)
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(memory.kv[0, 0, :, :, P : 4 * P], k_ref[:, :, P:])  # frames 3..5
    torch.testing.assert_close(memory.kv[1, 0, :, :, P : 4 * P], v_ref[:, :, P:])
    assert_only_written(memory, 0, slice(P, 4 * P))  # the sink [0, P) keeps what it held
