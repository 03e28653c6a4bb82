"""How the fused Triton glue path is asked for and reported (no Triton needed: nothing here runs a kernel)."""

from __future__ import annotations

import pytest
import torch

from memflow_cli.model.glue import Glue
from memflow_cli.model.transformer import Kernels
from memflow_cli.request import CompileMode
from memflow_cli.settings import WAN_1_3B
from memflow_cli.speed import EAGER, FastPath, choose_fast_path, compile_cache
from memflow_cli.speed.compile_cache import CompileChoice, CompilePath, choose_compile
from memflow_cli.speed.graphs import GraphedPasses


class NamedGlue(Glue):
    name = "triton"  # what `speed.glue.TritonGlue` calls itself; the reports read only the name


def path_with(glue: Glue, graphs: type[GraphedPasses] | None) -> FastPath:
    return FastPath(False, EAGER.self_attention, Kernels(glue=glue), EAGER.decoder_kernels, graphed_passes=graphs)


def test_the_paths_names_and_the_flags_that_choose_them_again():
    triton = NamedGlue()
    assert (path_with(triton, GraphedPasses).name, path_with(triton, None).name) == ("triton-graphed", "triton")
    assert (path_with(Glue(), GraphedPasses).name, path_with(Glue(), None).name) == ("graphed", "eager")
    assert path_with(NamedGlue(), None).asked is None and path_with(Glue(), None).asked is False
    assert EAGER.name == "eager" and not EAGER.glue


def test_asking_for_the_triton_glue():
    graphed, launched = CompileChoice.triton(), CompileChoice.triton(graphs=False)
    assert (graphed.compile, graphed.path.value, graphed.glue) == (None, "triton-graphed", True)
    assert (launched.compile, launched.path.value, launched.glue) == (False, "triton", True)
    assert not CompileChoice.fixed(None).glue and not CompileChoice.fixed(False).glue
    # the CPU runs plain PyTorch whatever was asked; Inductor and the hand-fused glue exclude each other
    assert choose_fast_path(WAN_1_3B, torch.device("cpu"), torch.float32, glue=True).name == "eager"
    with pytest.raises(ValueError, match="ask for one of them"):
        choose_fast_path(WAN_1_3B, torch.device("cpu"), torch.float32, compile=True, glue=True)


@pytest.mark.parametrize("uncompiled", [CompilePath.TRITON_GRAPHED, CompilePath.TRITON, CompilePath.EAGER])
def test_auto_runs_what_the_one_constant_names_where_compiling_does_not_pay(monkeypatch, uncompiled):
    monkeypatch.setattr(compile_cache, "AUTO_UNCOMPILED", uncompiled)
    short = choose_compile(CompileMode.AUTO, 40, cuda=True, warm=True)
    assert short.path is uncompiled and short.glue == (uncompiled is not CompilePath.EAGER)
    if uncompiled is CompilePath.EAGER:  # compiled code beats eager: a long enough video wins the compile back
        assert "40 chunks save" in short.reason
        assert choose_compile(CompileMode.AUTO, 4000, cuda=True, warm=True).path is CompilePath.COMPILED_WARM
    else:  # the Triton glue beats compiled code: AUTO never compiles, however long the video
        assert short.reason == f"{uncompiled.value} runs a chunk faster than compiled code"
        assert choose_compile(CompileMode.AUTO, 40_000, cuda=True, warm=True).path is uncompiled
    assert choose_compile(CompileMode.NEVER, 40, cuda=True, warm=True).path is CompilePath.EAGER_ASKED  # reference
    assert choose_compile(CompileMode.ALWAYS, 2, cuda=True, warm=False).path is CompilePath.COMPILED_COLD
    assert choose_compile(CompileMode.AUTO, 40, cuda=False, warm=False).path is CompilePath.EAGER_DEVICE


def test_the_default_is_the_measured_fastest_path_the_triton_glue_with_graphs():
    assert compile_cache.AUTO_UNCOMPILED is CompilePath.TRITON_GRAPHED


CHOICES = [CompileChoice.triton(), CompileChoice.triton(graphs=False), CompileChoice.fixed(None)]


@pytest.mark.parametrize("choice", CHOICES, ids=lambda choice: choice.path.value)
def test_load_engine_passes_the_choice_on_to_the_fast_path(monkeypatch, choice):
    from memflow_cli import engine as engine_module

    asked: list[dict] = []

    def recording(*args, **kwargs):
        asked.append(kwargs)
        return choose_fast_path(*args, **kwargs)

    monkeypatch.setattr(engine_module, "choose_fast_path", recording)
    with engine_module.load_engine("demo", "cpu", compile=choice, embed_cache=False) as engine:
        assert engine.fast.name == "eager" and engine.compile_path == choice.path.value  # the CPU runs plain PyTorch
    assert [(kwargs["compile"], kwargs["glue"]) for kwargs in asked] == [(choice.compile, choice.glue)]
