"""The architecture's import rules, checked on the source: dependencies point one way
(madclip_runtime <- madclip_train <- madclip_export), the runtime never imports torch, and no import cycles.

Every import statement counts, including those inside functions (a lazy import is still a dependency).
Importing a package's own `__init__` (e.g. `from . import INTENDED_USE`) is not an edge between modules.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"madclip_runtime": 0, "madclip_train": 1, "madclip_export": 2}
TORCH = ("torch", "torchvision", "open_clip")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in LAYERS:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of everything `name` imports (relative imports resolved)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = base[: len(base) - (node.level - 1)]
                mod = ".".join(prefix + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for imp in _imports(name, path):
            if imp in modules and imp != name and not (modules[imp].name == "__init__.py" and name.startswith(imp)):
                edges.add(imp)
        graph[name] = edges
    return graph


def test_dependencies_point_one_way_and_runtime_has_no_torch():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        layer = LAYERS[name.split(".")[0]]
        for imp in _imports(name, path):
            top = imp.split(".")[0]
            if top in LAYERS and LAYERS[top] > layer:
                bad.append(f"{name} imports {imp} (upward)")
            if layer == 0 and top in TORCH:
                bad.append(f"{name} imports {imp} (the runtime never imports torch)")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_rules_catch_what_they_claim(tmp_path, monkeypatch):
    """The walker sees lazy, relative and `from . import x` imports (so the two tests above can fail)."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    import torch\n    from ..madclip_export import export\n    from .bundles import bundle\n")
    found = _imports("madclip_runtime.m", src)
    assert {"torch", "madclip_export.export", "madclip_runtime.bundles.bundle"} <= found


def test_importing_every_runtime_module_loads_no_torch():
    """At run time too: importing the whole runtime pulls in no torch, and PIL keeps refusing truncated images."""
    names = sorted(n for n in _modules() if n.startswith("madclip_runtime"))
    code = ("import importlib, sys\n"
            f"for n in {names!r}:\n"
            "    try:\n        importlib.import_module(n)\n"
            "    except ImportError as exc:\n        print('optional', n, exc)\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {TORCH!r} + ('madclip_train', 'madclip_export'))\n"
            "assert not bad, bad\n"
            "from PIL import ImageFile\nassert ImageFile.LOAD_TRUNCATED_IMAGES is False\nprint('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "ok"
