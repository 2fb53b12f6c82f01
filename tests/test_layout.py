"""The layout the code promises, checked over the `ast` of every module (nothing is imported):
the engine core runs on a bare GPU machine, so it imports neither the SGLang-facing processes,
the HTTP front, the disaggregation transport nor sglang itself; and modules form no import cycle.

Run alone: `python -m pytest -q tests/test_layout.py`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "crosspool_sgl"
CORE = ("core", "mem", "models", "layers")
FORBIDDEN_IN_CORE = ("crosspool_sgl.managers", "crosspool_sgl.entrypoints", "crosspool_sgl.disagg", "sglang")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its body (lazy imports count too)."""
    found: set[str] = set()
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("package", CORE)
def test_engine_core_imports_no_front_end(package):
    offenders = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for name in imports_of(path):
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN_IN_CORE):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_kernels_import_no_front_end():
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        bad = [n for n in imports_of(path) if n.startswith(("crosspool_sgl.", "sglang"))]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_no_import_cycles_between_modules():
    """Module-level graph (a lazy import inside a function counts: it is still a dependency)."""
    mods = modules()
    graph = {
        name: {m for m in (imports_of(path)) if m in mods and m != name and not name.startswith(m + ".")}
        for name, path in mods.items()
    }
    cycles = _cycles(graph)
    assert not cycles, f"import cycles: {cycles}"


def test_no_import_cycles_between_packages():
    """crosspool_sgl's packages (core, mem, models, layers, managers, ...) form layers too: layers/
    must not import models/ while models/ imports layers/, even through modules that form no cycle."""
    mods = modules()

    def package_of(name: str) -> str:
        return ".".join(name.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = {package_of(m) for m in imports_of(path) if m in mods}
        graph.setdefault(package_of(name), set()).update(deps - {package_of(name)})
    cycles = _cycles(graph)
    assert not cycles, f"import cycles between packages: {cycles}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of two or more nodes."""
    # Tarjan's strongly connected components; any component with two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in graph:
        if name not in index:
            visit(name)
    return cycles


def test_parsing_a_model_config_imports_no_torch():
    """The launcher checks every model's config before it starts anything; importing torch there
    costs ~2 s of start-up on this box (it happened once, through a dataclass's module)."""
    import subprocess
    import sys

    code = "import sys, crosspool_sgl.models.config as c; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)
