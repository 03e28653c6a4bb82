"""Seeds as generators: models built with random weights draw from a `torch.Generator` of their own.

The demo and random models are built by their libraries' constructors (the tiny umT5, the Wan VAE, the
transformer), which draw their initial weights from torch's global RNG. `drawing_from(generator)` hands
every random draw made in its block the generator instead, call by call, in the order the constructors
make them: a CPU generator seeded with `seed` gives the very values `torch.manual_seed(seed)` gave before
the same construction, and the global RNG is neither read nor moved.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# The torch functions and tensor methods that draw random numbers and take a `generator`, by name: a library may
# put its own wrapper in `torch.nn.init` while it initialises (transformers does), which torch then dispatches
_DRAWS = frozenset({
    "rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial", "uniform_", "normal_", "random_",
    "bernoulli_", "exponential_", "cauchy_", "log_normal_", "geometric_", "trunc_normal_", "kaiming_uniform_",
    "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_", "sparse_",
})  # fmt: skip


class _DrawFrom(TorchFunctionMode):
    """A random draw that names no generator draws from `generator`."""

    def __init__(self, generator: torch.Generator):
        super().__init__()
        self.generator = generator

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if getattr(func, "__name__", None) in _DRAWS and kwargs.get("generator") is None:
            kwargs["generator"] = self.generator
        return func(*args, **kwargs)


@contextmanager
def drawing_from(generator: torch.Generator) -> Iterator[torch.Generator]:
    """Within the block, every random draw that names no generator draws from `generator` (CPU tensors)."""
    with _DrawFrom(generator):
        yield generator


def seeded(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed`: the stream `torch.manual_seed(seed)` starts the global RNG on."""
    return torch.Generator().manual_seed(seed)
