"""The method registry: the one place that lists the methods (`madclip-train --method NAME`).

Each entry names a package `methods/<name>/` whose `METHOD` is its `MethodModel` subclass; the package is
imported when the method is first asked for. A new method is its own package plus one line here.
"""

from __future__ import annotations

import importlib

from madclip_runtime.errors import MadclipError

from .base import MethodModel, OptionSchema

DEFAULT_METHOD = "madclip"
_PACKAGES: dict[str, str] = {
    "madclip": f"{__package__}.madclip",
    "mvfa": f"{__package__}.mvfa",
    "mediclip": f"{__package__}.mediclip",
    "aprilgan": f"{__package__}.aprilgan",
}
_loaded: dict[str, type[MethodModel]] = {}


def check_method(name: str, cls: object) -> type[MethodModel]:
    """A registered package's METHOD must be a MethodModel subclass that declares what the interface needs."""
    if not (isinstance(cls, type) and issubclass(cls, MethodModel)) or cls.name != name:
        raise TypeError(f"method package {name!r}: METHOD must be a MethodModel subclass named {name!r}")
    if (
        not cls.title
        or not cls.fp32_island_constants
        or not isinstance(getattr(cls, "option_schema", None), OptionSchema)
    ):
        raise TypeError(f"method {name!r} must declare title, fp32_island_constants and option_schema")
    if cls.option_schema.method != name:
        raise TypeError(f"method {name!r}: its option_schema is named {cls.option_schema.method!r}")
    return cls


def get_method(name: str | None) -> type[MethodModel]:
    """The MethodModel subclass registered as `name` (None = the default method)."""
    name = name or DEFAULT_METHOD
    if name not in _PACKAGES:
        raise MadclipError(f"unknown method {name!r} (known: {', '.join(sorted(_PACKAGES))})")
    if name not in _loaded:
        _loaded[name] = check_method(name, importlib.import_module(_PACKAGES[name]).METHOD)
    return _loaded[name]


def method_names() -> list[str]:
    return sorted(_PACKAGES)


def all_methods() -> list[type[MethodModel]]:
    """Every registered method's class, by name."""
    return [get_method(n) for n in method_names()]
