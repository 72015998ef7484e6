"""The machine a measurement ran on (platform, CPU, cores, RAM, inference libraries) and this process's peak RSS.

Used by madclip-bench and the benchmark scripts alike; torch is never imported.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
from typing import Any

import numpy as np

from . import __version__


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def machine_description() -> dict[str, Any]:
    """Platform, CPU model, cores, RAM, Python and inference library versions (torch is never imported)."""
    desc: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "ram_gb": round(_ram_bytes() / 2**30, 2) if _ram_bytes() else None,
        "madclip": __version__,
        "numpy": np.__version__,
    }
    try:
        import onnxruntime as ort

        desc["onnxruntime"] = ort.__version__
        desc["onnxruntime_providers"] = list(ort.get_available_providers())
    except ImportError:
        desc["onnxruntime"] = None
    try:
        import importlib.util

        if importlib.util.find_spec("tensorrt") is not None:
            import tensorrt

            desc["tensorrt"] = tensorrt.__version__
    except Exception as exc:  # a broken tensorrt install is information, not a failure
        desc["tensorrt"] = f"unusable: {type(exc).__name__}"
    return desc


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
