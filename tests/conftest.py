"""Shared fixtures: the tiny random CLIP (`madclip-tiny`) and paths to the shared real scans."""
from __future__ import annotations

from pathlib import Path

import pytest

REALSCANS = Path(__file__).resolve().parents[2] / "shared" / "data" / "realscans"


def realscans_or_skip(name: str = "") -> Path:
    path = REALSCANS / name if name else REALSCANS
    if not path.exists():
        pytest.skip(f"real scans not available at {path} (CI and the dev machine have ../shared beside the repo)")
    return path


@pytest.fixture(scope="session")
def tiny_cfg():
    from madclip_train.config import ModelConfig

    return ModelConfig(backbone="madclip-tiny", pretrained="none", objective="Brain")


@pytest.fixture()
def tiny_model(tiny_cfg):
    from madclip_train.model import build_model

    return build_model(tiny_cfg, seed=0)
