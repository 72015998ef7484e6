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


def fake_reference_checkpoint(width=64, embed=32, ctx_dim=64) -> dict:
    """A synthetic checkpoint in the authors' key format for the madclip-tiny geometry (random tensors)."""
    import torch

    g = torch.Generator().manual_seed(0)
    ref = {}
    for branch in ("normal", "abnormal"):
        ref[f"{branch}_det_adapters"] = {f"{j}.fc{n}.0.weight": torch.randn(width if n == 1 else embed, width, generator=g)
                                         for j in range(4) for n in (1, 2, 3)}
        ref[f"prompt_maker_{branch}"] = {f"prompt_learner.ctx.{c}_{p}": torch.randn(7, 8, ctx_dim, generator=g)
                                         for c in ("normal", "abnormal") for p in ("end", "front", "middle")}
        ref[f"prompt_maker_{branch}"]["text_encoder.ln_final.weight"] = torch.ones(ctx_dim)
    return ref


def copy_tree(src, dst):
    """A private copy of a (session-scoped) bundle or run directory that a test may edit."""
    import shutil

    shutil.copytree(src, dst)
    return Path(dst)


def cli_error_lines(err: str) -> list[str]:
    """The non-empty lines of a CLI's stderr."""
    return [line for line in err.splitlines() if line.strip()]
