"""The import graph of medvox: no cycle among its modules (function-level imports included) and no module of
a lower stage importing one of a later stage; function-level imports say why they are there."""

from __future__ import annotations

import ast
from pathlib import Path

import medvox

SRC = Path(medvox.__file__).parent

# the stages, lowest first: a module may import its own stage and those before it, never a later one
STAGES = (
    ("medvox.metrics",),
    ("medvox.errors", "medvox.config", "medvox.machine", "medvox._version", "medvox.logs"),
    ("medvox.data", "medvox.models", "medvox.transforms", "medvox.losses", "medvox.plots"),
    ("medvox.run",),
    ("medvox.engine", "medvox.recipe"),
    ("medvox.descriptors",),
    ("medvox.inference",),
    ("medvox.cv",),
    ("medvox.reporting",),
    ("medvox.api", "medvox.demo", "medvox.cli", "medvox.__main__", "medvox"),
)


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> list[tuple[str, bool, bool]]:
    """(imported medvox module, at function level, under TYPE_CHECKING) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node, in_function: bool, type_only: bool):
        for child in ast.iter_child_nodes(node):
            fn = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            tc = type_only or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.startswith("medvox"):
                        found.append((_resolve(a.name), in_function, type_only))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + ([base] if base else []))
                if base.startswith("medvox"):
                    for a in child.names:
                        target = f"{base}.{a.name}"
                        found.append((target if target in MODULES else _resolve(base), in_function, type_only))
            visit(child, fn, tc)

    visit(tree, False, False)
    return [(m, f, t) for m, f, t in found if m is not None and m != module]


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _stage(module: str) -> int:
    best = None
    for i, prefixes in enumerate(STAGES):
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    assert best is not None, f"{module} is in no stage of STAGES: add it"
    return best[0]


def test_no_cycles_among_medvox_modules():
    edges = {m: sorted({t for t, _, tc in deps if not tc}) for m, deps in GRAPH.items()}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def strong(v):  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, []):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            strong(v)
    assert cycles == []


def test_a_lower_stage_never_imports_a_later_one():
    bad = [f"{m} -> {t}" for m, deps in GRAPH.items() for t, _, tc in deps
           if not tc and _stage(t) > _stage(m) and m != "medvox"]
    assert bad == []


def test_every_module_is_in_a_stage():
    for m in MODULES:
        _stage(m)


def test_the_graph_sees_function_level_imports():
    deps = dict((t, f) for t, f, _ in GRAPH["medvox.cv.summary"])
    assert deps.get("medvox.inference.predictor") is True and deps.get("medvox.run") is False
