"""The run directory: its file names, how it is written and how it is read back (trainer, converter, exporter).

    RUN/config.json              everything needed to rebuild the model: "method", ModelConfig ("model"),
                                 TrainConfig ("train"), dataset, backbone fingerprint, versions
    RUN/checkpoint.safetensors   the method's `trainable_state()` (no pickle): for MadCLIP the adapters, the prompt
                                 context vectors and the derived text embeddings t_n, t_ab
    RUN/shots.json               the exact files used ("root" + relative paths), and which were held out
    RUN/train_log.jsonl          one JSON object per epoch: losses, held-out figures, seconds

The frozen backbone is rebuilt from config.json (open_clip name + weights); its fingerprint is checked so a run
is never served on other weights. Loading executes no code (safetensors + JSON only).
"""
from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path

import torch

from madclip_runtime.errors import MadclipError

from .config import ModelConfig, TrainConfig, dump_json
from .data import Sample
from .methods import DEFAULT_METHOD, MethodModel
from .model import build_model

log = logging.getLogger(__name__)

CONFIG = "config.json"
CHECKPOINT = "checkpoint.safetensors"
SHOTS = "shots.json"
TRAIN_LOG = "train_log.jsonl"
CHECKPOINT_FORMAT = "madclip-run-1"


def versions() -> dict:
    import open_clip

    import madclip_runtime

    return {"madclip": madclip_runtime.__version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "python": platform.python_version()}


def checkpoint_bytes(model: MethodModel) -> bytes:
    from safetensors.torch import save

    return save(model.trainable_state(), metadata={"format": CHECKPOINT_FORMAT, "method": model.name})


def write_run(directory: str | os.PathLike, model: MethodModel, config: dict, shots: dict) -> None:
    """Write checkpoint, config.json (with "method") and shots.json into `directory` (a temporary sibling that
    `AtomicDirectory` renames into place)."""
    directory = Path(directory)
    (directory / CHECKPOINT).write_bytes(checkpoint_bytes(model))
    (directory / CONFIG).write_text(dump_json({"method": model.name, **config}) + "\n")
    (directory / SHOTS).write_text(dump_json(shots) + "\n")


def read_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / CONFIG
    if not Path(run_dir).is_dir():
        raise MadclipError(f"{run_dir}: run directory not found")
    if not path.is_file():
        raise MadclipError(f"{path}: missing (not a madclip run directory)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MadclipError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise MadclipError(f"{path}: expected a JSON object")
    for key in ("model",):
        if not isinstance(config.get(key), dict):
            raise MadclipError(f"{path}: '{key}' is missing or not an object (not a madclip run, or edited by hand)")
    config.setdefault("method", DEFAULT_METHOD)  # runs written before methods were recorded are MadCLIP's
    return config


def model_config(config: dict) -> ModelConfig:
    """The run's ModelConfig, its method taken from config.json's top-level "method"."""
    return ModelConfig.from_dict({**config["model"], "method": config.get("method", DEFAULT_METHOD)})


def load_run(run_dir: str | Path, device: str | torch.device = "cpu",
             check_weights: bool = True) -> tuple[MethodModel, dict]:
    """Rebuild the trained model of a run directory. Loading executes no code (safetensors + JSON only)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    mcfg = model_config(config)
    ckpt = run_dir / CHECKPOINT
    if not ckpt.is_file():
        raise MadclipError(f"{ckpt}: missing")
    try:
        state = load_file(str(ckpt))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MadclipError(f"{ckpt}: unreadable safetensors file ({exc})") from None
    model = build_model(mcfg, seed=TrainConfig.from_dict(config.get("train", {})).seed)
    expected = config.get("backbone_fingerprint")
    if check_weights and expected:
        got = model.backbone.fingerprint()
        if got != expected:
            raise MadclipError(f"{run_dir}: backbone weights ({mcfg.backbone}, {mcfg.pretrained}) differ from those "
                               f"the run was trained with (fingerprint {got[:12]} != {expected[:12]})")
    model.load_trainable_state(state, str(ckpt))
    model.to(device).eval()
    return model, config


def read_shots(run_dir: str | Path, config: dict | None = None, data_root: str | None = None) -> list[Sample]:
    """The run's shot images as Samples (paths resolved against `data_root`, else the recorded root).

    A converted or hand-made run may list none: the caller says which option supplies images instead.
    """
    run_dir = Path(run_dir)
    path = run_dir / SHOTS
    record = json.loads(path.read_text()) if path.is_file() else {}
    config = config or {}
    root = Path(data_root or record.get("root") or config.get("dataset", {}).get("root") or "")
    shots = []
    for s in record.get("shots", []):
        image = root / s["path"] if not os.path.isabs(s["path"]) else Path(s["path"])
        mask = root / s["mask"] if s.get("mask") and not os.path.isabs(s["mask"]) else s.get("mask")
        if not image.is_file():
            raise MadclipError(f"{image}: shot image of the run not found (pass --data DATASET_ROOT if the dataset "
                               f"moved)")
        shots.append(Sample(str(image), int(s["label"]), str(mask) if mask else None))
    return shots
