"""Few-shot anomaly-detection methods behind one interface (`base.MethodModel`), registered by name.

Adding a method: a module here with a registered `MethodModel` subclass, and its name in `_MODULES`.
"""
from __future__ import annotations

import importlib

from .base import Batch, MethodModel
from .registry import DEFAULT_METHOD, METHODS, get_method, method_names, register

_MODULES = ("madclip", "mvfa", "mediclip", "aprilgan")


def load_all() -> None:
    """Import every method module (each registers itself). Idempotent."""
    for name in _MODULES:
        importlib.import_module(f"{__name__}.{name}")


__all__ = ["Batch", "DEFAULT_METHOD", "METHODS", "MethodModel", "get_method", "method_names", "register", "load_all"]
