"""The layer map of docs/architecture.md, enforced: which folder of ``ser_ray`` may import what.

Every import is read from the source (also those inside functions), so a lazy import cannot
hide an upward dependency or a Ray import in a pure layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ser_ray"
#: Lowest first; a module may import its own layer and the layers before it, never later ones.
LAYERS = (
    "common",
    "corpus",
    "features",
    "models",
    "training",
    "distributed",
    "sweeps",
    "study",
    "app",  # the modules at the top of the package: cli, predict
)
#: The layers that make up the pure core: no Ray, so they run and test without a cluster.
PURE = ("common", "corpus", "features", "models", "training")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()):
        return parts[1]
    return "app"


def _imports(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in ``path``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # ``from ser_ray.corpus import folds`` imports the module ser_ray.corpus.folds
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _own_imports() -> dict[str, set[str]]:
    modules = _modules()
    modules.pop("ser_ray")  # the package's own __init__ is empty; every import names it
    return {name: {m for m in _imports(path) if m in modules} for name, path in modules.items()}


def test_every_folder_of_the_package_is_a_known_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(LAYERS) - {"app"}


@pytest.mark.parametrize("layer", PURE)
def test_pure_layers_import_no_ray(layer):
    offenders = {
        name: sorted(m for m in _imports(path) if m == "ray" or m.startswith("ray."))
        for name, path in _modules().items()
        if _layer(name) == layer
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{name} ({_layer(name)}) imports {other} ({_layer(other)})"
        for name, imported in _own_imports().items()
        for other in imported
        if LAYERS.index(_layer(other)) > LAYERS.index(_layer(name))
    ]
    assert upward == []


def test_the_import_graph_has_no_cycles():
    graph = {
        k: {m for m in v if m != k and not k.startswith(m + ".")} for k, v in _own_imports().items()
    }
    # a package's __init__ is imported by every module under it; it imports none of them here
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(trail[trail.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_layer_checks_can_fail():
    """The checks read what they should: a known upward import and a known Ray import exist
    one layer up (the study imports the sweeps; the distributed layer imports Ray)."""
    imports = _own_imports()
    assert "ser_ray.sweeps.svm" in imports["ser_ray.study.svm_runs"]
    ray_users = [n for n, p in _modules().items() if "ray" in _imports(p)]
    assert ray_users and all(_layer(n) not in PURE for n in ray_users)
