"""The imageio <-> medical cycle stays broken (both import scan.py; lazy in-function imports count), and the
volume modules import without torch or the optional medical libraries."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import madclip_runtime

PKG = Path(madclip_runtime.__file__).resolve().parent


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for f in sorted(PKG.glob("*.py")):
        mod = f.stem
        deps: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("madclip_runtime."):
                deps.add(node.module.split(".")[1])
        graph[mod] = {d for d in deps if (PKG / f"{d}.py").exists() and d != mod}
    return graph


def test_medical_and_imageio_share_scan_not_each_other():
    """The former cycle: medical must not import imageio (tests/test_imports.py checks the whole graph)."""
    graph = _graph()
    assert "imageio" not in graph["medical"] and "scan" in graph["medical"] and "scan" in graph["imageio"]
    assert "imageio" not in graph["scan"] and "medical" not in graph["scan"]


def test_volume_modules_import_without_torch():
    code = ("import sys\n"
            "import madclip_runtime.volume, madclip_runtime.volume_output, madclip_runtime.dicom_seg, "
            "madclip_runtime.prepare, madclip_runtime.cli_prepare, madclip_runtime.cli_volume\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'madclip_train', "
            "'madclip_export', 'pydicom', 'nibabel', 'highdicom'))\n"
            "assert not bad, bad\nprint('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
