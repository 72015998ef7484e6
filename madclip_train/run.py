"""A training run end to end: dataset -> shots -> model -> fit -> run directory (written atomically).

A `TrainRequest` holds what the user asked for; every field left None takes its default from one place: the
method's `model_defaults` / `train_defaults` (what its reference uses), else the ModelConfig, PreprocessSpec
and TrainConfig dataclasses. The run directory's files are `rundir`'s.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from madclip_runtime.atomic import AtomicDirectory
from madclip_runtime.errors import MadclipError
from madclip_runtime.preprocess import PreprocessSpec

from .augment import AUGMENT_VARIANTS
from .config import ModelConfig, TrainConfig, objective_for
from .data import load_arrays, load_split, sample_shots, shots_from_list, shots_record
from .methods import DEFAULT_METHOD, get_method
from .model import build_model
from .precision import resolve_precision
from .rundir import TRAIN_LOG, versions, write_run
from .train import ShotTensors, fit, resolve_device

log = logging.getLogger(__name__)

_PREPROCESS_KEYS = ("image_size", "normalize", "interpolation")


@dataclass(frozen=True)
class TrainRequest:
    """What the user asked for (CLI arguments or API). None = the method's / configs' default."""

    data: str
    out: str
    method: str = DEFAULT_METHOD
    shot_list: str | None = None
    objective: str | None = None
    device: str = "auto"
    cache_dir: str | None = None
    force: bool = False
    # ModelConfig / PreprocessSpec
    backbone: str | None = None
    pretrained: str | None = None
    image_size: int | None = None
    quick_gelu: bool | None = None
    causal_prompt_mask: bool | None = None
    normalize: str | None = None
    init_seed: int | None = None
    options: dict = field(default_factory=dict)
    # TrainConfig
    shots: int | None = None
    seed: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    select_on: str | None = None
    holdout_fraction: float | None = None
    feature_cache: str | None = None
    augment: bool | None = None
    augment_variant: str | None = None
    precision: str | None = (
        None  # fp32 | fp16 | bf16 | auto (None = auto: CUDA the reference's fp16, CPU fp32)
    )


def _given(req: TrainRequest, names) -> dict:
    return {k: getattr(req, k) for k in names if getattr(req, k, None) is not None}


def resolve_configs(
    req: TrainRequest, objective: str, n_shots: int | None = None
) -> tuple[ModelConfig, TrainConfig]:
    """(ModelConfig, TrainConfig) from the request over the method's defaults over the dataclasses' defaults."""
    cls = get_method(req.method)
    model_keys = {f.name for f in fields(ModelConfig)} - {
        "method",
        "objective",
        "preprocess",
        "options",
        "taps",
    }
    m = {**cls.model_defaults, **_given(req, model_keys | set(_PREPROCESS_KEYS))}
    spec = PreprocessSpec(**{k: m.pop(k) for k in _PREPROCESS_KEYS if k in m})
    mcfg = ModelConfig(method=cls.name, objective=objective, preprocess=spec, options=dict(req.options), **m)
    t = {**cls.train_defaults, **_given(req, {f.name for f in fields(TrainConfig)})}
    if n_shots is not None:
        t["shots"] = n_shots
    return mcfg, TrainConfig(**t)


def _check_configs(mcfg: ModelConfig, tcfg: TrainConfig) -> None:
    """The API's checks (the CLI's argparse types refuse the same values earlier): NaN and inf included."""
    if tcfg.shots < 1:
        raise MadclipError(f"--shots must be >= 1 (got {tcfg.shots})")
    if tcfg.epochs < 1 or tcfg.batch_size < 1:
        raise MadclipError(
            f"--epochs and --batch-size must be >= 1 (got {tcfg.epochs} and {tcfg.batch_size})"
        )
    if not (math.isfinite(tcfg.lr) and tcfg.lr > 0):
        raise MadclipError(f"--lr must be a finite number > 0 (got {tcfg.lr})")
    if tcfg.augment_variant not in AUGMENT_VARIANTS:
        raise MadclipError(
            f"--augment-variant must be one of {', '.join(AUGMENT_VARIANTS)} (got {tcfg.augment_variant!r})"
        )
    if mcfg.image_size < 28:
        raise MadclipError(f"--image-size {mcfg.image_size} is too small")
    if not (math.isfinite(tcfg.holdout_fraction) and 0 < tcfg.holdout_fraction < 1):
        raise MadclipError(f"--holdout-fraction must be in (0, 1) (got {tcfg.holdout_fraction})")


def train_run(req: TrainRequest, progress=None) -> dict:
    """Train and write the run directory. Nothing is left behind if anything fails."""
    t_start = time.perf_counter()
    objective = req.objective or objective_for(Path(req.data).resolve().name)
    mcfg, tcfg = resolve_configs(req, objective)
    _check_configs(mcfg, tcfg)
    if get_method(req.method).needs_abnormal:
        split = load_split(req.data, "valid")
        samples = (
            shots_from_list(split, req.shot_list)
            if req.shot_list
            else sample_shots(split, tcfg.shots, tcfg.seed)
        )
        has_masks = split.has_masks
    else:  # normal shots only (a dataset root or a plain folder of normal scans); the method makes its own masks
        from .synthesis.io import normal_samples

        samples, has_masks = normal_samples(req.data, tcfg.shots, tcfg.seed, req.shot_list), True
        tcfg = replace(tcfg, shots=len(samples))  # all of them when the folder had fewer (recorded as used)
    if req.shot_list:
        tcfg = replace(tcfg, shots=sum(1 for s in samples if s.label == 0))
    device = resolve_device(req.device)
    tcfg = replace(tcfg, precision=resolve_precision(req.precision or "auto", device))
    with AtomicDirectory(req.out, force=req.force) as tmp:
        tmp = Path(tmp)
        # augmentation works on [0, 1] images: load un-normalised, the training source normalises after augmenting
        images, masks, labels = load_arrays(samples, replace(mcfg.preprocess, normalize="none"))
        shots = ShotTensors(torch.from_numpy(images), torch.from_numpy(masks), torch.from_numpy(labels))
        torch.manual_seed(tcfg.seed)
        model = build_model(mcfg, seed=tcfg.seed)
        mcfg = ModelConfig.from_dict({**mcfg.to_dict(), "taps": list(model.backbone.taps)})
        model.cfg = mcfg
        log.info(
            "training %s: %s (%s) on %d shots of %s, objective %r, device %s",
            mcfg.method,
            mcfg.backbone,
            mcfg.pretrained,
            len(samples),
            req.data,
            objective,
            device,
        )
        with open(tmp / TRAIN_LOG, "w") as log_file:
            summary = fit(
                model,
                shots,
                has_masks,
                tcfg,
                device,
                cache_dir=Path(req.cache_dir) if req.cache_dir else None,
                progress=progress,
                log_file=log_file,
            )
        model.cpu()
        held = set(summary["holdout_index"])
        record = shots_record(samples)
        record["held_out"] = [s.path for i, s in enumerate(samples) if i in held]
        record["seed"], record["shot_list"] = tcfg.seed, req.shot_list
        config = {
            "model": mcfg.to_dict(),
            "train": tcfg.to_dict(),
            "backbone_fingerprint": model.backbone.fingerprint(),
            "dataset": {
                "root": str(Path(req.data).resolve()),
                "name": Path(req.data).resolve().name,
                "has_masks": has_masks,
                "n_shots": len(samples),
            },
            "selected_epoch": summary["selected_epoch"],
            "selection": tcfg.select_on,
            "cache": summary["cache"],
            "finalize": summary["finalize"],
            "versions": versions(),
            "device": str(device),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_run(tmp, model, config, record)
    summary["run_dir"] = str(req.out)
    summary["seconds"] = time.perf_counter() - t_start
    return summary
