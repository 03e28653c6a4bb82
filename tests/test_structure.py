"""The package's shape, checked on its source: the request is typed below the commands, and imports point down.

Layers, top to bottom: commands -> plan -> engine -> model/speed/decode -> weights files, with the runners of
a plan (batch; render, live, bench) between commands and plan, and plain values (settings, script, request...)
at the bottom. Down to the engine a module imports only from layers below its own or from its own package;
below the engine, modules of one layer may use each other (a model's loader builds the model).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "memflow_cli"
MODEL_NAMES = {"demo", "random"}  # what `--model` may say besides a folder
RESOLVER = "memflow_cli.request"  # the one module that turns those words into a `ModelSource`

LAYERS: list[tuple[str, ...]] = [  # top first; a name is a module, or a package with everything in it
    ("memflow_cli.__main__",),
    ("memflow_cli.cli",),
    ("memflow_cli.commands",),
    ("memflow_cli.batch",),
    ("memflow_cli.render", "memflow_cli.live", "memflow_cli.bench"),
    ("memflow_cli.plan", "memflow_cli.distributed", "memflow_cli.update"),
    ("memflow_cli.engine",),
    (
        "memflow_cli.model", "memflow_cli.speed", "memflow_cli.decode", "memflow_cli.vae_stream", "memflow_cli.wan_vae",
        "memflow_cli.generator", "memflow_cli.sampler", "memflow_cli.overlap", "memflow_cli.handover",
        "memflow_cli.prompt_embeds", "memflow_cli.embed_cache", "memflow_cli.text_encoder", "memflow_cli.demo",
        "memflow_cli.random_model", "memflow_cli.record", "memflow_cli.output", "memflow_cli.mp4",
        "memflow_cli.checkpoint", "memflow_cli.merged_cache", "memflow_cli.tae", "memflow_cli.snapshots",
        "memflow_cli.resume",
        "memflow_cli.weights",  # the package and its loaders, which build models from the files
    ),  # fmt: skip
    (  # the files: where they are, fetching, checking, reading
        "memflow_cli.weights.locate", "memflow_cli.weights.fetch", "memflow_cli.weights.verify",
        "memflow_cli.weights.identity", "memflow_cli.loading",
    ),  # fmt: skip
    (
        "memflow_cli", "memflow_cli.settings", "memflow_cli.script", "memflow_cli.request", "memflow_cli.tokens",
        "memflow_cli.timing", "memflow_cli.cache_dir", "memflow_cli.report",
    ),  # fmt: skip
]


ENGINE = LAYERS.index(("memflow_cli.engine",))  # below it, modules of one layer may import each other


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> tuple[int, str]:
    """The module's layer (0 is the top) and the entry of `LAYERS` that places it (its package, or itself)."""
    best: tuple[int, str] | None = None
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (index, name)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def imported(module: str, tree: ast.AST) -> set[str]:
    """The package's modules that `module` imports, at the top or inside functions (not under TYPE_CHECKING)."""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []  # only for typing: not an import at run time
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("memflow_cli"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if not base.startswith("memflow_cli"):
                continue
            for alias in node.names:  # `from . import demo` names a module
                full = f"{base}.{alias.name}"
                names.add(full if full in MODULES else base)
    return {name for name in names if name != module}


def upward_or_sideways(module: str) -> list[str]:
    level, entry = layer_of(module)
    wrong = []
    for target in sorted(imported(module, ast.parse(MODULES[module].read_text(encoding="utf-8")))):
        target_level, target_entry = layer_of(target)
        if target_level < level or (target_level == level and target_entry != entry and level < ENGINE):
            wrong.append(target)
    return wrong


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module: str):
    assert upward_or_sideways(module) == []


def test_the_compile_cache_finds_its_folder_without_the_embedding_cache():
    assert "memflow_cli.embed_cache" not in imported(
        "memflow_cli.speed.compile_cache", ast.parse(MODULES["memflow_cli.speed.compile_cache"].read_text())
    )


def test_the_layering_check_sees_a_wrong_import():
    """The check itself: a plan that imports render, or a live session that does, is caught."""
    assert "memflow_cli.render" in imported("memflow_cli.plan", ast.parse("from .render import render_story"))
    level, _ = layer_of("memflow_cli.plan")
    assert layer_of("memflow_cli.render")[0] < level  # render is above plan: an upward import
    same = layer_of("memflow_cli.live.session")
    assert same[0] == layer_of("memflow_cli.render")[0] and same[1] != layer_of("memflow_cli.render")[1]


def model_name_comparisons(tree: ast.AST) -> list[str]:
    """Comparisons with 'demo' / 'random' (or a constant named DEMO / RANDOM): the request as a string."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for side in (node.left, *node.comparators):
            for leaf in ast.walk(side):
                constant = isinstance(leaf, ast.Constant) and leaf.value in MODEL_NAMES
                named = isinstance(leaf, ast.Name | ast.Attribute) and (
                    getattr(leaf, "id", None) or getattr(leaf, "attr", None)
                ) in {name.upper() for name in MODEL_NAMES}
                if constant or named:
                    found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("module", sorted(set(MODULES) - {RESOLVER}))
def test_nothing_below_the_edge_branches_on_the_model_names(module: str):
    assert model_name_comparisons(ast.parse(MODULES[module].read_text(encoding="utf-8"))) == []


def test_the_model_name_check_sees_a_comparison():
    assert model_name_comparisons(ast.parse('if model == "demo": pass'))
    assert model_name_comparisons(ast.parse("x = name in (DEMO, other)"))
    assert model_name_comparisons(ast.parse("x = engine.name == engine_module.RANDOM"))
    assert not model_name_comparisons(ast.parse('label = "demo"'))
