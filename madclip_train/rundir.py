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

    return {
        "madclip": madclip_runtime.__version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
    }


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
    validate_run_config(config, str(path))
    config.setdefault("method", DEFAULT_METHOD)  # runs written before methods were recorded are MadCLIP's
    return config


# key -> accepted types, for the `model` entry of config.json (what rebuilding the model reads).
_MODEL_KEYS: dict[str, tuple[type, ...]] = {
    "backbone": (str,),
    "pretrained": (str,),
    "image_size": (int,),
    "quick_gelu": (bool,),
    "causal_prompt_mask": (bool,),
    "objective": (str,),
    "n_ctx": (int,),
    "init_seed": (int,),
    "taps": (list,),
    "preprocess": (dict,),
    "options": (dict,),
    "method": (str,),
}
_REQUIRED_MODEL_KEYS = ("backbone", "pretrained", "objective")


def _type_ok(value: object, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def validate_run_config(config: object, where: str) -> None:
    """config.json must hold a `model` object with the keys the model is rebuilt from, of the right types:
    a missing or mistyped key is one line naming it, never a KeyError."""
    if not isinstance(config, dict):
        raise MadclipError(f"{where}: expected a JSON object")
    model = config.get("model")
    if not isinstance(model, dict):
        raise MadclipError(
            f"{where}: key 'model' is missing or not an object (not a madclip run, or edited by hand)"
        )
    for key in _REQUIRED_MODEL_KEYS:
        if key not in model:
            raise MadclipError(f"{where}: key 'model.{key}' is missing")
    for key, types in _MODEL_KEYS.items():
        if key in model and not _type_ok(model[key], types):
            raise MadclipError(
                f"{where}: 'model.{key}' must be {'/'.join(t.__name__ for t in types)}, got {model[key]!r}"
            )
    for key in ("train", "dataset"):
        if key in config and config[key] is not None and not isinstance(config[key], dict):
            raise MadclipError(f"{where}: key '{key}' must be an object")
    if "method" in config and not isinstance(config["method"], str):
        raise MadclipError(f"{where}: 'method' must be a string, got {config['method']!r}")
    try:
        ModelConfig.from_dict(model)
        TrainConfig.from_dict(config.get("train") or {})
    except (TypeError, ValueError) as exc:
        raise MadclipError(f"{where}: invalid model/train configuration ({exc})") from None


def check_finite_state(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a checkpoint holding NaN/inf (a diverged run): one line naming the first bad tensor."""
    bad = [k for k, v in sorted(state.items()) if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise MadclipError(
            f"{source}: {len(bad)} of {len(state)} tensors hold NaN or infinite values (e.g. {bad[0]}): "
            f"the run diverged; retrain it (e.g. with a lower --lr)"
        )


def model_config(config: dict) -> ModelConfig:
    """The run's ModelConfig, its method taken from config.json's top-level "method"."""
    return ModelConfig.from_dict({**config["model"], "method": config.get("method", DEFAULT_METHOD)})


def load_run(
    run_dir: str | Path, device: str | torch.device = "cpu", check_weights: bool = True
) -> tuple[MethodModel, dict]:
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
    check_finite_state(state, str(ckpt))
    model = build_model(mcfg, seed=TrainConfig.from_dict(config.get("train") or {}).seed)
    expected = config.get("backbone_fingerprint")
    if check_weights and expected:
        got = model.backbone.fingerprint()
        if got != expected:
            raise MadclipError(
                f"{run_dir}: backbone weights ({mcfg.backbone}, {mcfg.pretrained}) differ from those "
                f"the run was trained with (fingerprint {got[:12]} != {expected[:12]})"
            )
    model.load_trainable_state(state, str(ckpt))
    model.to(device).eval()
    return model, config


def read_shots(run_dir: str | Path, config: dict | None = None, data_root: str | None = None) -> list[Sample]:
    """The run's shot images as Samples (paths resolved against `data_root`, else the recorded root).

    A converted or hand-made run may list none: the caller says which option supplies images instead.
    """
    run_dir = Path(run_dir)
    path = run_dir / SHOTS
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MadclipError(f"{path}: invalid JSON ({exc})") from None
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("shots", []), list)
        or not all(
            isinstance(s, dict) and isinstance(s.get("path"), str) and s.get("label") in (0, 1)
            for s in record.get("shots", [])
        )
    ):
        raise MadclipError(
            f"{path}: expected {{'root': ..., 'shots': [{{'path': str, 'label': 0|1, 'mask': ...}}]}}"
        )
    config = config or {}
    root = Path(data_root or record.get("root") or (config.get("dataset") or {}).get("root") or "")
    shots = []
    for s in record.get("shots", []):
        image = root / s["path"] if not os.path.isabs(s["path"]) else Path(s["path"])
        mask = root / s["mask"] if s.get("mask") and not os.path.isabs(s["mask"]) else s.get("mask")
        if not image.is_file():
            raise MadclipError(
                f"{image}: shot image of the run not found (pass --data DATASET_ROOT if the dataset moved)"
            )
        shots.append(Sample(str(image), int(s["label"]), str(mask) if mask else None))
    return shots
