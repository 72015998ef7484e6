"""A training run end to end: dataset -> shots -> model -> fit -> run directory (written atomically).

RUN/config.json       everything needed to rebuild the model (ModelConfig, TrainConfig, dataset, fingerprint)
RUN/checkpoint.safetensors   adapters + prompt context + the derived t_n, t_ab
RUN/shots.json        the exact files used (and which were held out for model selection)
RUN/train_log.jsonl   one JSON object per epoch: losses, held-out figures, seconds
"""
from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from madclip_runtime.atomic import AtomicDirectory
from madclip_runtime.errors import MadclipError
from madclip_runtime.preprocess import PreprocessSpec

from .backbone import weights_fingerprint
from .checkpoint import CHECKPOINT, CONFIG, checkpoint_bytes, load_reference_checkpoint, load_trainable_state
from .config import ModelConfig, TrainConfig, dump_json, objective_for
from .data import load_arrays, load_split, sample_shots, shots_from_list, shots_record
from .model import build_model
from .precision import resolve_precision
from .train import ShotTensors, fit, resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainRequest:
    data: str
    out: str
    shots: int = 16
    seed: int = 111
    shot_list: str | None = None
    objective: str | None = None
    backbone: str = "ViT-L-14-336"
    pretrained: str = "openai"
    image_size: int = 240
    epochs: int = 60
    batch_size: int = 16
    lr: float = 1e-3
    device: str = "auto"
    select_on: str = "none"
    holdout_fraction: float = 0.25
    feature_cache: str = "memory"
    cache_dir: str | None = None
    augment: bool = True
    quick_gelu: bool = False
    causal_prompt_mask: bool = False
    normalize: str = "none"
    init_seed: int = 0
    force: bool = False
    precision: str = "auto"  # fp32 | fp16 | bf16 | auto (CUDA: the reference's fp16, CPU: fp32)


def versions() -> dict:
    import open_clip

    import madclip_runtime

    return {"madclip": madclip_runtime.__version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "python": platform.python_version()}


def backbone_identity(mcfg: ModelConfig, fingerprint: str, taps) -> dict:
    """What determines the tapped features (the feature-cache key and the export provenance)."""
    return {"backbone": mcfg.backbone, "fingerprint": fingerprint, "image_size": mcfg.image_size,
            "taps": list(taps), "quick_gelu": mcfg.quick_gelu}


def _check_request(req: TrainRequest) -> None:
    if req.shots < 1:
        raise MadclipError(f"--shots must be >= 1 (got {req.shots})")
    if req.epochs < 1 or req.batch_size < 1 or req.lr <= 0:
        raise MadclipError("--epochs and --batch-size must be >= 1 and --lr > 0")
    if req.image_size < 28:
        raise MadclipError(f"--image-size {req.image_size} is too small")
    if not 0 < req.holdout_fraction < 1:
        raise MadclipError(f"--holdout-fraction must be in (0, 1) (got {req.holdout_fraction})")


def train_run(req: TrainRequest, progress=None) -> dict:
    """Train and write the run directory. Nothing is left behind if anything fails."""
    _check_request(req)
    t_start = time.perf_counter()
    split = load_split(req.data, "valid")
    samples = shots_from_list(split, req.shot_list) if req.shot_list else sample_shots(split, req.shots, req.seed)
    objective = req.objective or objective_for(Path(req.data).resolve().name)
    spec = PreprocessSpec(image_size=req.image_size, normalize=req.normalize)
    mcfg = ModelConfig(backbone=req.backbone, pretrained=req.pretrained, image_size=req.image_size,
                       quick_gelu=req.quick_gelu, causal_prompt_mask=req.causal_prompt_mask, objective=objective,
                       init_seed=req.init_seed, preprocess=spec)
    tcfg = TrainConfig(shots=req.shots if not req.shot_list else len(samples) // 2, seed=req.seed, epochs=req.epochs,
                       batch_size=req.batch_size, lr=req.lr, augment=req.augment, select_on=req.select_on,
                       holdout_fraction=req.holdout_fraction, feature_cache=req.feature_cache)
    device = resolve_device(req.device)
    tcfg = replace(tcfg, precision=resolve_precision(req.precision, device))
    with AtomicDirectory(req.out, force=req.force) as tmp:
        tmp = Path(tmp)
        # augmentation works on [0, 1] images: load un-normalised, `fit` normalises after augmenting
        images, masks, labels = load_arrays(samples, replace(spec, normalize="none"))
        shots = ShotTensors(torch.from_numpy(images), torch.from_numpy(masks), torch.from_numpy(labels))
        torch.manual_seed(req.seed)
        model = build_model(mcfg, seed=req.seed)
        fingerprint = weights_fingerprint(model.backbone.visual)
        mcfg = ModelConfig.from_dict({**mcfg.to_dict(), "taps": list(model.backbone.taps)})
        model.cfg = mcfg
        log.info("training %s (%s) on %d shots of %s, objective %r, device %s", mcfg.backbone, mcfg.pretrained,
                 len(samples), req.data, objective, device)
        with open(tmp / "train_log.jsonl", "w") as log_file:
            summary = fit(model, shots, split.has_masks, tcfg, device,
                          backbone_identity(mcfg, fingerprint, model.backbone.taps),
                          cache_dir=Path(req.cache_dir) if req.cache_dir else None, progress=progress,
                          log_file=log_file)
        model.cpu()
        held = set(summary["holdout_index"])
        record = shots_record(samples)
        record["held_out"] = [s.path for i, s in enumerate(samples) if i in held]
        record["seed"], record["shot_list"] = req.seed, req.shot_list
        config = {
            "model": mcfg.to_dict(), "train": tcfg.to_dict(), "backbone_fingerprint": fingerprint,
            "dataset": {"root": str(Path(req.data).resolve()), "name": Path(req.data).resolve().name,
                        "has_masks": split.has_masks, "n_shots": len(samples)},
            "selected_epoch": summary["selected_epoch"], "selection": req.select_on,
            "cache": summary["cache"], "versions": versions(), "device": str(device),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / CHECKPOINT).write_bytes(checkpoint_bytes(model, {"format": "madclip-run-1"}))
        (tmp / CONFIG).write_text(dump_json(config) + "\n")
        (tmp / "shots.json").write_text(dump_json(record) + "\n")
    summary["run_dir"] = str(req.out)
    summary["seconds"] = time.perf_counter() - t_start
    return summary


def convert_reference_run(checkpoint: str, out: str, objective: str, backbone: str = "ViT-L-14-336",
                          pretrained: str = "openai", image_size: int = 240, force: bool = False) -> str:
    """Write a run directory from an authors' released checkpoint (weights_only load, no code executed)."""
    state = load_reference_checkpoint(checkpoint)
    mcfg = ModelConfig(backbone=backbone, pretrained=pretrained, image_size=image_size, objective=objective,
                       preprocess=PreprocessSpec(image_size=image_size))
    with AtomicDirectory(out, force=force) as tmp:
        tmp = Path(tmp)
        model = build_model(mcfg)
        load_trainable_state(model, state, checkpoint)
        mcfg = ModelConfig.from_dict({**mcfg.to_dict(), "taps": list(model.backbone.taps)})
        config = {"model": mcfg.to_dict(), "train": TrainConfig().to_dict(),
                  "backbone_fingerprint": weights_fingerprint(model.backbone.visual),
                  "converted_from": str(Path(checkpoint).resolve()), "versions": versions(),
                  "dataset": {"has_masks": None}, "selection": "reference (authors' released checkpoint)",
                  "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / CHECKPOINT).write_bytes(checkpoint_bytes(model, {"format": "madclip-run-1"}))
        (tmp / CONFIG).write_text(dump_json(config) + "\n")
        (tmp / "shots.json").write_text(json.dumps({"note": "shots of the authors' run are unknown"}) + "\n")
    return out
