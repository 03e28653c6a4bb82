"""CUDA graphs of the transformer's passes: one video's repeated passes replayed instead of launched."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch

from ..model.transformer import PassFunction, PassState


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor  # static input latents
    rope: tuple[torch.Tensor, torch.Tensor]  # static cos/sin tables
    out: torch.Tensor  # static output, overwritten by the next replay


class GraphedPasses:
    """The transformer's passes for one video, replayed from CUDA graphs once they repeat.

    `run_pass` computes one pass (the model, whose blocks run eager or compiled steps as it was built). A
    pass is fixed by its input shape, its timestep, its cache layout, bank view and SMA setting; the cache
    and text buffers of one video never move. The first `eager_runs` passes of each kind run normally
    (allocating their workspaces, compiling and autotuning where compiled), the next one is captured, and
    every later one is a single graph replay: thousands of kernel launches become one, and the GPU no
    longer waits between kernels. Passes that never repeat
    (the cache filling up, a prompt switch's re-cache) stay eager. A pass's output is valid until the next
    pass: the graphs share one memory pool, so any later replay may overwrite it. A capture synchronises
    the device once; replays never do.
    """

    def __init__(self, run_pass: PassFunction, eager_runs: int = 1):
        self.run_pass = run_pass
        self.eager_runs = eager_runs
        self.graphs: dict[tuple, _Graph] = {}
        self.runs: dict[tuple, int] = {}
        self.uncapturable: set[tuple] = set()
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, x: torch.Tensor, timestep: float, state: PassState) -> torch.Tensor:
        key = (tuple(x.shape), float(timestep), state.plan.layout, state.bank_view, state.sma_top_k)
        graph = self.graphs.get(key)
        if graph is None:
            self.runs[key] = self.runs.get(key, 0) + 1
            if self.runs[key] <= self.eager_runs or key in self.uncapturable:
                return self.run_pass(x, timestep, state)
            try:
                graph = self.graphs[key] = self._capture(x, timestep, state)
            except RuntimeError as error:  # this torch/GPU cannot capture the pass: it stays eager, still correct
                warnings.warn(f"CUDA graph capture failed, running this pass eagerly: {error}", stacklevel=2)
                self.uncapturable.add(key)
                return self.run_pass(x, timestep, state)
        graph.x.copy_(x)
        for static, table in zip(graph.rope, state.rope, strict=True):
            static.copy_(table)
        graph.graph.replay()
        return graph.out

    def _capture(self, x: torch.Tensor, timestep: float, state: PassState) -> _Graph:
        static_x = x.clone()
        rope = (state.rope[0].clone(), state.rope[1].clone())
        graph = torch.cuda.CUDAGraph()
        # thread-local: the decode worker keeps launching on its own stream while this thread captures
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self.run_pass(static_x, timestep, replace(state, rope=rope))
        return _Graph(graph, static_x, rope, out)
