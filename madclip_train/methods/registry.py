"""The method registry: name -> MethodModel subclass (`madclip-train --method NAME`)."""
from __future__ import annotations

from madclip_runtime.errors import MadclipError

METHODS: dict[str, type] = {}
DEFAULT_METHOD = "madclip"


def register(cls):
    """Class decorator: make a MethodModel subclass available under its `name`."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str | None):
    """The MethodModel subclass registered as `name` (None = the default method)."""
    from . import load_all

    load_all()
    name = name or DEFAULT_METHOD
    if name not in METHODS:
        raise MadclipError(f"unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def method_names() -> list[str]:
    from . import load_all

    load_all()
    return sorted(METHODS)
