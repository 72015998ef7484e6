"""Shared fixtures: the tiny random CLIP (`madclip-tiny`) and paths to the shared real scans."""
from __future__ import annotations

from pathlib import Path

import pytest

import os

# ../shared beside the repository; MADCLIP_REALSCANS overrides it (e.g. from a git worktree elsewhere).
REALSCANS = Path(os.environ.get("MADCLIP_REALSCANS") or Path(__file__).resolve().parents[2] / "shared" / "data" / "realscans")


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


@pytest.fixture(scope="session")
def trained_tiny_run(tmp_path_factory):
    """A real madclip-tiny run (2 epochs, 2 + 2 shots) on generated demo data. Returns the run directory."""
    from madclip_train.demo import generate_demo
    from madclip_train.run import TrainRequest, train_run

    base = tmp_path_factory.mktemp("tiny_run")
    root = generate_demo(base / "data", n_valid=3, n_test=3, seed=11)
    out = base / "run"
    train_run(TrainRequest(data=str(root), out=str(out), shots=2, epochs=2, backbone="madclip-tiny",
                           pretrained="none", device="cpu"))
    return out


@pytest.fixture(scope="session")
def exported_tiny_bundle(trained_tiny_run, tmp_path_factory):
    """The trained tiny run exported with FP16, INT8 and Triton (max batch 4). Returns the bundle directory."""
    from madclip_export.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("tiny_bundle") / "b"
    export_bundle(ExportOptions(run=str(trained_tiny_run), out=str(out), fp16=True, int8=True, triton=True,
                                max_batch=4))
    return out
