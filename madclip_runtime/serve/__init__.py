"""Serving and scale-out on Ray: `madclip-serve` (Ray Serve HTTP endpoint) and `madclip-batch` (Ray Data).

Ray is the optional `serve` extra (`pip install 'madclip[serve]'`). Only `app`, `cli` and `batch` import it,
and only when used; `decode` (request bytes -> scans), `limits` (upload limits), `options` (validated
options), `replica` (verified load, wire parameters) and `client` (`madclip-infer --server URL`) need no
Ray at all, so a client machine installs the runtime alone. Research use, not for clinical decisions.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import MadclipError

INSTALL_HINT = "pip install 'madclip[serve]'"


def require_ray(component: str = "serve") -> ModuleType:
    """Import `ray.<component>` (serve or data), or raise one clear line saying how to install it."""
    try:
        return importlib.import_module(f"ray.{component}")
    except ImportError as exc:
        raise MadclipError(f"ray[{component}] is not installed ({exc.name or exc}); {INSTALL_HINT}") from None
