"""The engine's layering: no import cycle between its modules (lazy imports inside functions included), each
module opens with a comment saying what it holds, and the engine never imports the integration package."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lorarar_kernels"
PACKAGE = "lorarar_kernels"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Engine modules ``name`` imports anywhere in its file (the root package's re-exports aside)."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != PACKAGE and t != name:
                found.add(t)
    return found


def test_no_import_cycle_in_the_engine():
    modules = _modules()
    graph = {n: _imports(n, p, modules) for n, p in modules.items()}
    assert graph["lorarar_kernels.merge"] >= {
        "lorarar_kernels.rule",
        "lorarar_kernels.materialise",
    }  # it parses
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m) :] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])


def test_lora_layer_is_a_leaf_and_formats_never_import_lora():
    modules = _modules()
    assert _imports("lorarar_kernels.lora_layer", modules["lorarar_kernels.lora_layer"], modules) == {
        "lorarar_kernels.errors"
    }
    for name, path in modules.items():
        if name.startswith("lorarar_kernels.formats"):
            assert "lorarar_kernels.lora" not in _imports(name, path, modules), name


def test_every_module_says_what_it_holds_and_the_engine_never_imports_the_integration():
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        doc = ast.get_docstring(tree)
        assert doc and len(doc) > 20, f"{name} has no opening comment"
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in ("lorarar", "diffusers") for n in names), name
