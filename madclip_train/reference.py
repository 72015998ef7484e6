"""The authors' released checkpoints: read without executing code, converted into a run directory."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from madclip_runtime.atomic import AtomicDirectory
from madclip_runtime.errors import MadclipError

from .config import ModelConfig, TrainConfig
from .methods import get_method
from .model import build_model
from .rundir import versions, write_run


def load_reference_checkpoint(path: str | Path) -> dict:
    """Read a released .pth with torch.load(weights_only=True): tensors and plain containers only, never code."""
    try:
        ref = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MadclipError(f"{path}: no such file") from None
    except Exception as exc:  # pickle with code objects is refused by weights_only
        raise MadclipError(f"{path}: not a loadable weights-only checkpoint ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    if not isinstance(ref, dict):
        raise MadclipError(f"{path}: expected a dict of state dicts, got {type(ref).__name__}")
    return ref


def convert_reference_run(checkpoint: str, out: str, mcfg: ModelConfig, force: bool = False) -> str:
    """Write a run directory from an authors' released checkpoint of `mcfg.method` (no code executed)."""
    cls = get_method(mcfg.method)
    state = cls.convert_reference(load_reference_checkpoint(checkpoint))
    with AtomicDirectory(out, force=force) as tmp:
        model = build_model(mcfg)
        model.load_trainable_state(state, checkpoint)
        mcfg = ModelConfig.from_dict({**mcfg.to_dict(), "taps": list(model.backbone.taps)})
        model.cfg = mcfg
        config = {"model": mcfg.to_dict(), "train": TrainConfig().to_dict(),
                  "backbone_fingerprint": model.backbone.fingerprint(),
                  "converted_from": str(Path(checkpoint).resolve()), "versions": versions(),
                  "dataset": {"has_masks": None}, "selection": "reference (authors' released checkpoint)",
                  "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_run(tmp, model, config, {"note": "shots of the authors' run are unknown"})
    return out
