"""Build any registered method's model from a ModelConfig (`cfg.method`, default MadCLIP)."""

from __future__ import annotations

from .config import ModelConfig
from .methods import MethodModel, get_method


def build_model(cfg: ModelConfig, seed: int = 0) -> MethodModel:
    """Create the frozen CLIP (weights per cfg.pretrained, never substituted) and the method's fresh trainables."""
    return get_method(cfg.method).build(cfg, seed=seed)
