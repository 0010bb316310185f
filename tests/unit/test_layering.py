"""The architecture, checked: every import in llamapro (module level and inside functions) points
down the layer list of docs/architecture.md, no package or module imports another in a cycle, the
core packages never import ray or deepspeed, and no file is over 600 lines."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "llamapro"
MAX_LINES = 600

# Bottom to top: a module may import only modules of its own layer or below.
FOUNDATION = ("errors", "jsonl", "artifacts", "tensors", "storage", "runtime", "loading", "demo", "config")
LAYERS = [FOUNDATION, ("expansion",), ("data",), ("training",), ("eval",), ("report",), ("publish",),
          ("serve",), ("pipeline",), ("tune",), ("cli",)]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}
API_LAYER = len(LAYERS)  # llamapro/__init__.py: the user Python API, on top of everything
CORE = set(FOUNDATION) | {"expansion", "report", "publish"}
# The one module allowed to import ray in the core: it is where Ray is started (ensure_ray).
RAY_HOME = {"llamapro.runtime"}
FORBIDDEN_IN_CORE = ("ray", "deepspeed")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _unit(module: str) -> str:
    """The package (or top-level module) a llamapro module belongs to: llamapro.data.tokens -> data."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(module: str) -> int:
    unit = _unit(module)
    if unit == "":
        return API_LAYER
    if unit not in LAYER_OF:
        raise AssertionError(f"{module}: not in any layer; add it to LAYERS here and to docs/architecture.md")
    return LAYER_OF[unit]


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _target(name: str) -> str:
    """The llamapro module an imported dotted name lives in (llamapro.x.f -> llamapro.x)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str, path: Path):
    """(imported dotted name, line, inside a function?) for every import statement."""
    tree = ast.parse(path.read_text(), str(path))
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)

    def walk(node, in_func):
        for child in ast.iter_child_nodes(node):
            inner = in_func or isinstance(child, funcs)
            if isinstance(child, ast.Import):
                for a in child.names:
                    yield a.name, child.lineno, inner
            elif isinstance(child, ast.ImportFrom):
                src = _resolve(module, path.name == "__init__.py", child)
                for a in child.names:  # a submodule when it is one, else the module it is in
                    sub = f"{src}.{a.name}"
                    yield (sub if sub in MODULES else src), child.lineno, inner
            yield from walk(child, inner)

    yield from walk(tree, False)


def _edges():
    """(importer, imported llamapro module, line, in function) for every internal import."""
    out = set()
    for mod, path in MODULES.items():
        for name, line, in_func in _imports(mod, path):
            if name == "llamapro" or name.startswith("llamapro."):
                tgt = _target(name)
                if tgt and tgt != mod:
                    out.add((mod, tgt, line, in_func))
    return sorted(out)


def _third_party(mod: str):
    for name, line, _ in _imports(mod, MODULES[mod]):
        yield name.split(".")[0], line


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _where(mod: str, line: int) -> str:
    return f"{MODULES[mod].relative_to(ROOT)}:{line}"


def test_every_module_is_in_a_layer():
    for mod in MODULES:
        _layer(mod)


def test_imports_point_down_the_layers():
    bad = [f"{_where(a, line)}: {a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
           + (" inside a function" if in_func else "")
           for a, b, line, in_func in _edges() if _layer(b) > _layer(a)]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for a, b, _, _ in _edges():
        if _unit(a) != _unit(b):
            graph.setdefault(_unit(a), set()).add(_unit(b))
    assert not _cycles(graph), f"package cycles: {_cycles(graph)}"


def test_no_cycle_between_modules():
    graph: dict[str, set[str]] = {}
    for a, b, _, _ in _edges():
        graph.setdefault(a, set()).add(b)
    cycles = _cycles(graph)
    detail = [f"{' <-> '.join(c)}: " + "; ".join(
        f"{_where(a, line)} imports {b}" for a, b, line, _ in _edges() if a in c and b in c)
        for c in cycles]
    assert not cycles, "module cycles (a function-local import is still a cycle):\n" + "\n".join(detail)


def test_core_packages_import_neither_ray_nor_deepspeed_anywhere():
    bad = [f"{_where(mod, line)}: {mod} imports {top}"
           for mod in MODULES if _unit(mod) in CORE and mod not in RAY_HOME
           for top, line in _third_party(mod) if top in FORBIDDEN_IN_CORE]
    assert not bad, "core modules importing ray/deepspeed (even inside functions):\n" + "\n".join(bad)


def test_no_module_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("source", ["import llamapro.data.x", "from llamapro.data import x",
                                    "from . import x", "from .x import f"])
def test_the_checker_sees_imports(tmp_path, source):
    """The parser itself: every import form resolves to a llamapro module."""
    p = tmp_path / "m.py"
    p.write_text(f"def f():\n    {source}\n")
    got = [n for n, _, inner in _imports("llamapro.data.m", p) if inner]
    assert any(n.startswith("llamapro.data") for n in got), got


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_expansion_core_imports_neither_ray_nor_deepspeed():
    code = (
        "import sys\n"
        "import llamapro.config, llamapro.expansion.strategies, llamapro.expansion.families, llamapro.tensors, "
        "llamapro.artifacts, llamapro.expansion.streaming, "
        "llamapro.expansion.surgery, llamapro.expansion.api, llamapro.cli\n"
        "bad = [m for m in ('ray', 'deepspeed') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_config_and_strategies_import_no_torch():
    code = ("import sys, llamapro.config, llamapro.expansion.strategies, llamapro.expansion.families, "
            "llamapro.tensors, llamapro.artifacts, llamapro.expansion.streaming\n"
            "assert 'torch' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
