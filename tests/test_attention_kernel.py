"""Choosing the self-attention kernel: flash-attn 3 where installed and faithful, torch SDPA otherwise.

flash-attn 3 is built for Hopper GPUs only, so these tests stand a CPU kernel with flash-attn's calling
convention ([B, N, H, D] in and out, any strides with a contiguous last dimension) in for it, and check
what our side does: the layout it hands over, the check before a kernel is trusted, and the fallback.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from memflow_cli.speed import attention as fast

from .attention import flash_layout_sdpa


def _problem(heads: int = 3, head_dim: int = 16, queries: int = 10, keys: int = 24):
    """Queries as the model makes them ([B, N, H, D] memory seen as [B, H, N, D]) and cache-slice keys/values."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn((1, queries, heads, head_dim), generator=generator).transpose(1, 2)
    cache = torch.randn((2, 1, heads, keys + 8, head_dim), generator=generator)
    return q, cache[0, :, :, :keys], cache[1, :, :, :keys]


def test_a_flash_attn_kernel_computes_sdpa_in_sdpa_layout():
    q, k, v = _problem()
    out = fast.heads_last(flash_layout_sdpa)(q, k, v)
    assert out.shape == (1, 3, 10, 16)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-6, atol=1e-6)


def test_builds_that_also_return_the_log_sum_exp_are_accepted():
    q, k, v = _problem()

    def with_lse(q, k, v):
        return flash_layout_sdpa(q, k, v), torch.zeros(q.shape[0], q.shape[2], q.shape[1])

    torch.testing.assert_close(fast.heads_last(with_lse)(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_a_faithful_kernel_is_kept():
    attention = fast.heads_last(flash_layout_sdpa)
    assert fast.attention_error(attention, 4, 32, torch.device("cpu"), torch.float32) < 1e-6
    assert fast.checked_attention("flash-attn 3", attention, 4, 32, torch.device("cpu"), torch.float32) is attention


def test_a_kernel_that_mixes_up_heads_and_tokens_is_refused():
    def heads_first(q, k, v):  # answers in [B, H, N, D] memory, read back as [B, N, H, D]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.contiguous().view(q.shape)

    with pytest.warns(UserWarning, match=r"flash-attn 3 differs from torch SDPA by .* self-attention stays on"):
        kept = fast.checked_attention(
            "flash-attn 3", fast.heads_last(heads_first), 4, 32, torch.device("cpu"), torch.float32
        )
    assert kept is None


def test_a_kernel_that_fails_is_refused():
    def unsupported(q, k, v):
        raise RuntimeError("FlashAttention only supports head dimensions up to 256")

    with pytest.warns(UserWarning, match=r"flash-attn 3 failed on a test call \(FlashAttention only supports"):
        kept = fast.checked_attention(
            "flash-attn 3", fast.heads_last(unsupported), 4, 32, torch.device("cpu"), torch.float32
        )
    assert kept is None


def fa3_fwd_flash_attn_func(
    q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None,
    window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False,
    sm_margin=0, return_attn_probs=False,
):  # fmt: skip
    """`fa3_fwd_interface.flash_attn_func` of the `fa3-fwd` 0.0.3 wheel: [B, N, H, D] in, the output tensor
    alone out unless `return_attn_probs` (then with the log-sum-exp)."""
    assert softmax_scale is None and not causal and not return_attn_probs  # memflow relies on the defaults
    return flash_layout_sdpa(q, k, v)


def not_installed(monkeypatch, *names: str) -> None:
    for name in names or fast.FLASH_ATTENTION_3_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import fails as not installed


def test_flash_attn_3_is_found_under_its_package_its_flat_module_or_the_fa3_fwd_wheel(monkeypatch):
    packaged, flat = SimpleNamespace(flash_attn_func=lambda *a: 1), SimpleNamespace(flash_attn_func=lambda *a: 2)
    wheel = SimpleNamespace(flash_attn_func=fa3_fwd_flash_attn_func)
    not_installed(monkeypatch)
    assert fast.flash_attention_3() is None
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", wheel)
    assert fast.flash_attention_3() == ("fa3_fwd_interface", fa3_fwd_flash_attn_func)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", flat)
    assert fast.flash_attention_3() == ("flash_attn_interface", flat.flash_attn_func)
    monkeypatch.setitem(sys.modules, "flash_attn_3.flash_attn_interface", packaged)
    assert fast.flash_attention_3() == ("flash_attn_3.flash_attn_interface", packaged.flash_attn_func)


def test_a_flash_attn_3_that_does_not_load_is_reported(monkeypatch):
    def broken(name):
        raise ImportError(f"{name}: undefined symbol: _ZN3c104cuda9SetDevice")

    monkeypatch.setattr(fast.importlib, "import_module", broken)
    with pytest.warns(UserWarning) as warned:
        assert fast.flash_attention_3() is None
    assert [str(w.message) for w in warned] == [
        f"flash-attn 3 ({name}) is installed but does not load ({name}: undefined symbol: _ZN3c104cuda9SetDevice);"
        " it is not used"
        for name in fast.FLASH_ATTENTION_3_MODULES
    ]


def test_a_broken_build_does_not_hide_the_fa3_fwd_wheel(monkeypatch):
    """A module that is there but misses one of its own imports is reported; the next one is still tried."""
    real_import = fast.importlib.import_module

    def import_module(name):
        if name == "flash_attn_interface":
            raise ModuleNotFoundError("No module named 'einops'", name="einops")
        return real_import(name)

    not_installed(monkeypatch, "flash_attn_3.flash_attn_interface")
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", SimpleNamespace(flash_attn_func=fa3_fwd_flash_attn_func))
    monkeypatch.setattr(fast.importlib, "import_module", import_module)
    with pytest.warns(UserWarning, match=r"flash-attn 3 \(flash_attn_interface\) is installed but does not load"):
        assert fast.flash_attention_3() == ("fa3_fwd_interface", fa3_fwd_flash_attn_func)


def test_the_fa3_fwd_wheel_is_chosen_and_named_once_it_agrees_with_sdpa(monkeypatch):
    """With the Hopper guard passed (a CPU stand-in runs the check in float32), the wheel's kernel is
    selected, computes SDPA in SDPA's layout, and the bench names the module it came from."""
    not_installed(monkeypatch)
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", SimpleNamespace(flash_attn_func=fa3_fwd_flash_attn_func))
    monkeypatch.setattr(fast, "flash_attention_3_may_run", lambda device, dtype: True)
    name, attention = fast.self_attention_kernel(torch.device("cpu"), 3, 16, torch.float32)
    assert name == "flash-attn 3 (fa3_fwd_interface)"
    q, k, v = _problem()
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=1e-6, atol=1e-6)


def test_an_fa3_fwd_kernel_that_disagrees_is_refused_with_its_module_named(monkeypatch):
    def scrambled(q, k, v, **_):
        return flash_layout_sdpa(q, k, v).flip(1)  # tokens in the wrong order

    not_installed(monkeypatch)
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", SimpleNamespace(flash_attn_func=scrambled))
    monkeypatch.setattr(fast, "flash_attention_3_may_run", lambda device, dtype: True)
    with pytest.warns(UserWarning, match=r"flash-attn 3 \(fa3_fwd_interface\) differs from torch SDPA"):
        name, attention = fast.self_attention_kernel(torch.device("cpu"), 3, 16, torch.float32)
    assert name == fast.SDPA and attention is F.scaled_dot_product_attention


def test_flash_attn_3_never_runs_on_the_cpu():
    assert not fast.flash_attention_3_may_run(torch.device("cpu"), torch.bfloat16)


def test_the_cpu_keeps_sdpa_even_with_flash_attn_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn_interface", SimpleNamespace(flash_attn_func=flash_layout_sdpa))
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", SimpleNamespace(flash_attn_func=fa3_fwd_flash_attn_func))
    name, attention = fast.self_attention_kernel(torch.device("cpu"), 2, 16, torch.float32)
    assert name == fast.SDPA and attention is F.scaled_dot_product_attention
