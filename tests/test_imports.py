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
            if (
                imp in modules
                and imp != name
                and not (modules[imp].name == "__init__.py" and name.startswith(imp))
            ):
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
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
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
    src.write_text(
        "def f():\n    import torch\n    from ..madclip_export import export\n    from .bundles import bundle\n"
    )
    found = _imports("madclip_runtime.m", src)
    assert {"torch", "madclip_export.export", "madclip_runtime.bundles.bundle"} <= found


def test_importing_every_runtime_module_loads_no_torch():
    """At run time too: importing the whole runtime pulls in no torch, and PIL keeps refusing truncated images."""
    names = sorted(n for n in _modules() if n.startswith("madclip_runtime"))
    code = (
        "import importlib, sys\n"
        f"for n in {names!r}:\n"
        "    try:\n        importlib.import_module(n)\n"
        "    except ImportError as exc:\n        print('optional', n, exc)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {TORCH!r} + ('madclip_train', 'madclip_export'))\n"
        "assert not bad, bad\n"
        "from PIL import ImageFile\nassert ImageFile.LOAD_TRUNCATED_IMAGES is False\nprint('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "ok"


# ---- madclip_train's methods: one package per method, imports pointing down ----------------------------------
METHODS_PKG = "madclip_train.methods"
METHODS_CORE = {METHODS_PKG, f"{METHODS_PKG}.base", f"{METHODS_PKG}.registry"}


def _method_package(module: str) -> str | None:
    """`madclip_train.methods.mvfa.bank` -> `madclip_train.methods.mvfa`; None outside a method package."""
    parts = module.split(".")
    if module.startswith(METHODS_PKG + ".") and ".".join(parts[:3]) not in METHODS_CORE:
        return ".".join(parts[:3])
    return None


def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _method_violations(graph: dict[str, set[str]]) -> list[str]:
    """The direction inside madclip_train: a method package imports its own modules, `methods.base` and shared
    modules (those that import no `madclip_train.methods` module at all, not even lazily); a shared module never
    imports a method package; only `methods.registry` names the method packages (as strings, imported lazily)."""
    bad = []
    for name, edges in graph.items():
        if not name.startswith("madclip_train"):
            continue
        own = _method_package(name)
        for imp in edges:
            if not imp.startswith("madclip_train"):
                continue
            target = _method_package(imp)
            if own is not None:
                if target == own or imp == f"{METHODS_PKG}.base":
                    continue
                if target is not None:
                    bad.append(f"{name} imports {imp} (another method)")
                elif imp.startswith(METHODS_PKG) or any(
                    m.startswith(METHODS_PKG) for m in _closure(graph, imp)
                ):
                    bad.append(f"{name} imports {imp}, which imports madclip_train.methods (runs back up)")
            elif target is not None:
                bad.append(f"{name} imports {imp} (only methods/registry.py may name a method)")
    return sorted(bad)


def test_method_packages_import_down_only():
    assert not (bad := _method_violations(_graph())), "\n".join(bad)


def test_method_rule_catches_what_it_claims():
    graph = {
        "madclip_train.methods.mvfa.reference": {"madclip_train.rundir", "madclip_train.methods.base"},
        "madclip_train.rundir": {"madclip_train.methods"},
        "madclip_train.methods": {"madclip_train.methods.base"},
        "madclip_train.methods.mediclip.losses": {"madclip_train.methods.madclip.losses"},
        "madclip_train.methods.madclip.losses": set(),
        "madclip_train.cli": {"madclip_train.methods.mvfa.reference"},
    }
    bad = "\n".join(_method_violations(graph))
    assert "mvfa.reference imports madclip_train.rundir" in bad
    assert "another method" in bad and "only methods/registry.py" in bad


def test_every_method_package_is_registered_once():
    from madclip_train.methods import registry

    on_disk = {
        p.name for p in (ROOT / "madclip_train" / "methods").iterdir() if (p / "__init__.py").is_file()
    }
    assert set(registry._PACKAGES) == on_disk
    assert all(path == f"{METHODS_PKG}.{name}" for name, path in registry._PACKAGES.items())


# ---- no module imports another module's underscore-private names (issue 22.4) ------------------------------
def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_imports(name: str, path: Path, modules: set[str]) -> list[tuple[int, str]]:
    """(line, what) for each private name this module takes from another: `from m import _x`, `import m._x`,
    and `m._x` where `m` was imported as a project module (`import pkg.m as m`, `from pkg import m`)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    tree = ast.parse(path.read_text(), str(path))
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if any(_is_private(p) for p in a.name.split(".")):
                    found.append((node.lineno, a.name))
                if a.name in modules:
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            mod = (
                ".".join(base[: len(base) - (node.level - 1)] + ([node.module] if node.module else []))
                if node.level
                else (node.module or "")
            )
            for a in node.names:
                if _is_private(a.name):
                    found.append((node.lineno, a.name))
                elif f"{mod}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{mod}.{a.name}"
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and _is_private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
        ):
            found.append((node.lineno, f"{aliases[node.value.id]}.{node.attr}"))
    return sorted(set(found))


def _private_import_offences() -> list[str]:
    modules = _modules()
    bad = []
    for name, path in sorted(modules.items()):
        rel = path.relative_to(ROOT).as_posix()
        for line, what in _private_imports(name, path, set(modules)):
            bad.append(f"{rel}:{line}: imports the private name {what} (make it public where defined)")
    return bad


def test_no_module_imports_another_modules_private_names():
    assert not (bad := _private_import_offences()), "\n".join(bad)


def test_private_import_rule_catches_what_it_claims(tmp_path):
    pkg = tmp_path / "madclip_train"
    pkg.mkdir()
    src = pkg / "m.py"
    src.write_text(
        "import madclip_train.data as data\nfrom .augment import _warp, public\n"
        "from .. import _x\n"
        "from madclip_train import rundir\nimport os._hidden\n"
        "def f():\n    return data._list_images, rundir._type_ok, os.path, data.__name__\n"
    )
    found = [
        what
        for _, what in _private_imports(
            "madclip_train.m", src, {"madclip_train.data", "madclip_train.rundir"}
        )
    ]
    assert found == [
        "_warp",
        "_x",
        "os._hidden",
        "madclip_train.data._list_images",
        "madclip_train.rundir._type_ok",
    ]
