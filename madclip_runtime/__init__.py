"""madclip_runtime: torch-free serving of MadCLIP bundles. Research use, not for clinical decisions.

`madclip_runtime.load(bundle, backend="auto", precision="fp32")` returns a Predictor (see
`madclip_runtime.predictor`); it is imported lazily so `import madclip_runtime` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
INTENDED_USE = "research use, not for clinical decisions"

_LAZY = {"load": "predictor", "Predictor": "predictor", "Prediction": "predictor"}

__all__ = ["__version__", "INTENDED_USE", *_LAZY]


def __getattr__(name: str) -> Any:
    """Lazy exports: `load`, `Predictor`, `Prediction` (onnxruntime is only imported when a bundle loads)."""
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
