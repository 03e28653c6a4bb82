"""The transformer built in its final form: its kernels chosen, its weights already in their layers' form.

A checkpoint names Wan's tensors (`blocks.0.self_attn.q.weight`, ...). A model built with faster kernels may
hold some of them in another form: q, k and v as one `qkv` Linear (`Kernels.fused_qkv`), or a Linear as
FP8 values and scales (a layer class with `state_from_linear`, e.g. `speed.fp8.Fp8Linear`). `final_state`
turns the checkpoint's state dict into the model's; `build_transformer` builds the model (on the meta
device, no memory) and gives it that state. Nothing is replaced or converted after that.
"""

from __future__ import annotations

import torch

from ..settings import TransformerConfig
from .transformer import PLAIN_KERNELS, CausalWanTransformer, Kernels

QKV = ("q", "k", "v")


def build_transformer(
    config: TransformerConfig, state: dict[str, torch.Tensor], kernels: Kernels = PLAIN_KERNELS
) -> CausalWanTransformer:
    """The transformer of `config` built with `kernels`, holding the checkpoint-named `state` (its tensors on
    the device and in the dtype the model runs; the dict is taken over: converted tensors leave it)."""
    with torch.device("meta"):
        model = CausalWanTransformer(config, kernels)
    model.load_state_dict(final_state(model, state), assign=True)
    return model.eval().requires_grad_(False)


def final_state(model: CausalWanTransformer, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's `state` (Wan names) in the form of `model`'s layers: q/k/v concatenated where they are
    one projection, each Linear whose layer holds another form converted by `state_from_linear`."""
    for index, block in enumerate(model.blocks):
        if block.self_attn.fused_qkv:
            prefix = f"blocks.{index}.self_attn."
            for part in ("weight", "bias"):
                state[f"{prefix}qkv.{part}"] = torch.cat([state.pop(f"{prefix}{name}.{part}") for name in QKV])
    for name, module in model.named_modules():
        convert = getattr(module, "state_from_linear", None)
        if convert is not None:
            weight, bias = state.pop(f"{name}.weight"), state.pop(f"{name}.bias")
            state.update({f"{name}.{key}": tensor for key, tensor in convert(weight, bias).items()})
    return state
