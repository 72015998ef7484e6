"""Few-shot anomaly-detection methods behind one interface (`base.MethodModel`), one package per method.

    methods/base.py        the interface (and the option schema, backbone and training-source protocols)
    methods/registry.py    the one list of methods: name -> package
    methods/<name>/        one method: model.py (the MethodModel), its text/prompts, losses, export.py,
                           reference.py (the authors' checkpoints), options.py

Adding a method: a package `methods/<name>/` whose `METHOD` is its MethodModel subclass, and one line in
`registry._PACKAGES`. Method packages import shared modules of madclip_train and `methods.base` only.
"""

from __future__ import annotations

from .base import Batch, MethodModel, Option, OptionSchema
from .registry import DEFAULT_METHOD, all_methods, get_method, method_names

__all__ = [
    "Batch",
    "DEFAULT_METHOD",
    "MethodModel",
    "Option",
    "OptionSchema",
    "all_methods",
    "get_method",
    "method_names",
]
