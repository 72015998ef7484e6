"""The authors' released checkpoints of any method: read without executing code, converted into a run directory."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from madclip_runtime.atomic import AtomicDirectory
from madclip_runtime.errors import MadclipError

from .config import ModelConfig, TrainConfig
from .data import load_arrays, load_split, sample_shots, shots_from_list, shots_record
from .methods import get_method
from .methods.base import ReferenceShots
from .model import build_model
from .rundir import versions, write_run


def load_reference_checkpoint(path: str | Path) -> dict:
    """Read a released .pth with torch.load(weights_only=True): tensors and plain containers only, never code."""
    try:
        ref = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MadclipError(f"{path}: no such file") from None
    except Exception as exc:  # pickle with code objects is refused by weights_only
        raise MadclipError(
            f"{path}: not a loadable weights-only checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''})"
        ) from None
    if not isinstance(ref, dict):
        raise MadclipError(f"{path}: expected a dict of state dicts, got {type(ref).__name__}")
    return ref


def convert_reference_run(
    checkpoint: str,
    out: str,
    mcfg: ModelConfig,
    force: bool = False,
    data: str | None = None,
    shot_list: str | None = None,
    shots: int = 4,
    seed: int = 111,
    progress=None,
) -> str:
    """Write a run directory from an authors' released checkpoint of `mcfg.method` (no code executed).

    A method whose release lacks state (`reference_needs_shots`, e.g. MVFA's memory bank) rebuilds it from the
    shots of `data` (`shot_list` for the authors' exact shots, else `shots` per class sampled with `seed`),
    never from the test split; with `reference_shots_optional` it also converts without `data` (shots=None)."""
    cls = get_method(mcfg.method)
    if cls.reference_needs_shots and not data and not cls.reference_shots_optional:
        raise MadclipError(f"--method {cls.name} needs --data: {cls.reference_needs_shots}")
    state = cls.convert_reference(load_reference_checkpoint(checkpoint))
    samples, ref_shots = None, None
    if cls.reference_needs_shots and data:
        split = load_split(data, "valid")
        samples = shots_from_list(split, shot_list) if shot_list else sample_shots(split, shots, seed)
    with AtomicDirectory(out, force=force) as tmp:
        model = build_model(mcfg, seed=seed if samples is not None else 0)
        if samples is not None:
            images, masks, labels = load_arrays(samples, replace(mcfg.preprocess, normalize="none"))
            ref_shots = ReferenceShots(
                torch.from_numpy(images), torch.from_numpy(masks), torch.from_numpy(labels), split.has_masks
            )
        mcfg = ModelConfig.from_dict({**mcfg.to_dict(), "taps": list(model.backbone.taps)})
        model.cfg = mcfg
        info = model.load_reference(state, checkpoint, ref_shots)
        config = {
            "model": mcfg.to_dict(),
            "train": TrainConfig().to_dict(),
            "backbone_fingerprint": model.backbone.fingerprint(),
            "converted_from": str(Path(checkpoint).resolve()),
            "versions": versions(),
            "dataset": {"has_masks": None},
            "selection": "reference (authors' released checkpoint)",
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        record: dict = {"note": "shots of the authors' run are unknown"}
        if samples is not None:
            record = shots_record(samples)
            record["seed"], record["shot_list"] = seed, shot_list
            n_normal = sum(1 for s in samples if s.label == 0)
            config["train"] = TrainConfig(shots=n_normal, seed=seed).to_dict()
            config["dataset"] = {
                "root": str(Path(data).resolve()),
                "name": Path(data).resolve().name,
                "has_masks": split.has_masks,
                "n_shots": len(samples),
            }
            config["finalize"] = info
        write_run(tmp, model, config, record)
    return out
