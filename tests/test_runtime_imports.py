"""The volume modules import neither torch nor the medical libraries until a file needs them (the import
rules and the absence of cycles, the imageio <-> medical one included, are tests/test_imports.py's)."""

from __future__ import annotations

import subprocess
import sys


def test_volume_modules_import_without_torch():
    code = (
        "import sys\n"
        "import madclip_runtime.scans.volume, madclip_runtime.scans.volume_output, madclip_runtime.scans.dicom_seg, "
        "madclip_runtime.scans.prepare, madclip_runtime.cli.prepare, madclip_runtime.cli.volume\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'madclip_train', "
        "'madclip_export', 'pydicom', 'nibabel', 'highdicom'))\n"
        "assert not bad, bad\nprint('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
