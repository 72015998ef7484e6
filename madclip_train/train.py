"""The MadCLIP trainer (METHOD.md section 7) on cached backbone features.

Flow: shots -> offline x16 augmentation -> tapped features computed once (fp16 cache) -> epochs that run only
the 8 adapters and the prompt learner (text tower included, frozen) -> checkpoint. Model selection never sees
the test split: a fixed epoch budget by default (`select_on="none"`, the last epoch is kept), or
`select_on="valid"`: a part of the shots (per class, `holdout_fraction`, at least one image) is held out of
training and the epoch with the lowest held-out loss is kept.
"""
from __future__ import annotations

import copy
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from madclip_runtime.preprocess import PreprocessSpec, normalize_array

from .augment import augment_x16
from .cache import DTYPES, load_or_extract
from .config import TrainConfig
from .losses import madclip_loss
from .metrics import image_auroc
from .model import MadCLIP
from .precision import Precision
from .device import gather_to_device, place_on_device

log = logging.getLogger(__name__)


@dataclass
class ShotTensors:
    images: torch.Tensor  # [N, 3, S, S] float32 in the preprocessed range
    masks: torch.Tensor  # [N, S, S] bool (all False for normal images)
    labels: torch.Tensor  # [N] int64, 1 = abnormal

    def subset(self, index: torch.Tensor) -> "ShotTensors":
        return ShotTensors(self.images[index], self.masks[index], self.labels[index])

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from madclip_runtime.errors import MadclipError

        raise MadclipError("--device cuda requested but no CUDA GPU is visible to torch")
    return torch.device(name)


def holdout_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, held out): per class round(fraction * n) images, at least 1, leaving at least 1 to train."""
    from madclip_runtime.errors import MadclipError

    rng = random.Random(seed)
    train, held = [], []
    for cls in (0, 1):
        idx = [int(i) for i in torch.nonzero(labels == cls).flatten()]
        if len(idx) < 2:
            raise MadclipError(f"--select-on valid needs at least 2 shots per class (got {len(idx)}); use more "
                               f"--shots or the fixed epoch budget (--select-on none)")
        rng.shuffle(idx)
        n_held = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        held += idx[:n_held]
        train += idx[n_held:]
    return torch.tensor(sorted(train)), torch.tensor(sorted(held))


def _augment(shots: ShotTensors, seed: int) -> ShotTensors:
    images, masks, index = augment_x16(shots.images, shots.masks, seed=seed)
    return ShotTensors(images, masks, shots.labels[index])


def _normalize(shots: ShotTensors, spec: PreprocessSpec) -> ShotTensors:
    """[0, 1] images -> model input range (the shared preprocessing's normalisation step)."""
    if spec.normalize == "none":
        return shots
    return ShotTensors(torch.from_numpy(normalize_array(shots.images.numpy(), spec)), shots.masks, shots.labels)


class _FeatureSource:
    """Tapped features for a set of images: from the cache, or (cache "off") by running the backbone each time."""

    def __init__(self, model: MadCLIP, data: ShotTensors, tcfg: TrainConfig, device: torch.device,
                 backbone_id: dict, cache_dir: Path | None, progress=None, label: str = "features"):
        self.model, self.data, self.device, self.dtype = model, data, device, tcfg.cache_dtype
        self.feats = None
        self.info: dict = {"mode": tcfg.feature_cache}
        if tcfg.feature_cache != "off" and len(data):
            task = progress.add_task(f"backbone {label}", total=len(data)) if progress else None
            t0 = time.perf_counter()
            self.feats, self.info = load_or_extract(
                model.backbone, data.images, backbone_id, tcfg.feature_cache, tcfg.cache_dtype,
                batch_size=tcfg.batch_size, device=device, cache_dir=cache_dir,
                advance=(lambda n: progress.advance(task, n)) if progress else None)
            self.info["seconds"] = time.perf_counter() - t0
            self.info["bytes"] = self.feats.numel() * self.feats.element_size()
            self.feats, self.info["placement"] = place_on_device(self.feats, device)  # GPU if it fits, else pinned

    def targets(self, index: torch.Tensor, has_masks: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """labels [b] and masks [b, S, S] (or None) of data[index] on the device; copied there once."""
        if not hasattr(self, "_targets"):
            self._targets = (place_on_device(self.data.labels, self.device)[0],
                             place_on_device(self.data.masks, self.device)[0] if has_masks else None)
        labels, masks = self._targets
        return (gather_to_device(labels, index, self.device, dim=0),
                gather_to_device(masks, index, self.device, dim=0) if masks is not None else None)

    def get(self, index: torch.Tensor) -> list[torch.Tensor]:
        """Features of data[index] as L x [b, P, W] float32 on the device (rounded through the cache dtype)."""
        if self.feats is not None:
            f = gather_to_device(self.feats, index, self.device).float()
        else:
            with torch.no_grad():
                f = torch.stack(self.model.backbone(self.data.images[index].to(self.device)))
                f = f.to(DTYPES[self.dtype]).float()
        return list(f.unbind(0))


def _batch_loss(model: MadCLIP, source: _FeatureSource, index: torch.Tensor, has_masks: bool,
                precision: Precision | None = None) -> dict:
    precision = precision or Precision.create("fp32", source.device)
    with precision.autocast():
        t_n, t_ab = model.text_embeddings()
        logits = model.branch_logits(source.get(index), t_ab - t_n)
    logits = precision.loss_inputs(logits)  # losses in FP32
    labels, masks = source.targets(index, has_masks)
    return madclip_loss(logits, labels, masks, model.image_size)


@torch.no_grad()
def _evaluate_holdout(model: MadCLIP, source: _FeatureSource, has_masks: bool, batch_size: int) -> dict:
    n = len(source.data)
    totals, scores = {}, []
    for start in range(0, n, batch_size):
        index = torch.arange(start, min(start + batch_size, n))
        parts = _batch_loss(model, source, index, has_masks)
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + float(v) * len(index)
        t_n, t_ab = model.text_embeddings()
        scores.append(model.outputs_from_features(source.get(index), t_ab - t_n)["score"].cpu())
    out = {f"val_{k}": v / n for k, v in totals.items()}
    out["val_image_auroc"] = image_auroc(torch.cat(scores).numpy(), source.data.labels.numpy())
    return out


def fit(model: MadCLIP, shots: ShotTensors, has_masks: bool, tcfg: TrainConfig, device: torch.device,
        backbone_id: dict, cache_dir: Path | None = None, progress=None, log_file=None) -> dict:
    """Train adapters and prompt context in place. `shots.images` are un-normalised [0, 1]. Returns a summary (history, selected epoch, cache info)."""
    model.to(device)
    train_idx, held_idx = (holdout_split(shots.labels, tcfg.holdout_fraction, tcfg.seed)
                           if tcfg.select_on == "valid" else (torch.arange(len(shots)), torch.tensor([], dtype=torch.long)))
    train_set, held_set = shots.subset(train_idx), shots.subset(held_idx)
    if tcfg.augment:
        train_set = _augment(train_set, tcfg.seed)
        held_set = _augment(held_set, tcfg.seed + 1) if len(held_set) else held_set
    train_set, held_set = _normalize(train_set, model.cfg.preprocess), _normalize(held_set, model.cfg.preprocess)
    train_src = _FeatureSource(model, train_set, tcfg, device, backbone_id, cache_dir, progress, "train shots")
    held_src = _FeatureSource(model, held_set, tcfg, device, backbone_id, cache_dir, progress, "held-out shots")

    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=tcfg.lr, betas=tuple(tcfg.betas))
    precision = Precision.create(tcfg.precision, device)
    generator = torch.Generator().manual_seed(tcfg.seed)
    n = len(train_set)
    history, best, best_state = [], None, None
    task = progress.add_task("epochs", total=tcfg.epochs) if progress else None
    for epoch in range(1, tcfg.epochs + 1):
        model.adapters.train()
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=generator)
        sums: dict[str, float] = {}
        for start in range(0, n, tcfg.batch_size):
            index = order[start:start + tcfg.batch_size]
            parts = _batch_loss(model, train_src, index, has_masks, precision)
            optimizer.zero_grad(set_to_none=True)
            precision.backward_step(parts["total"], optimizer)
            for k, v in parts.items():  # summed on the device: no host sync per step
                sums[k] = sums.get(k, 0.0) + v.detach() * len(index)
        record = {"epoch": epoch, **{f"loss_{k}": float(v) / n for k, v in sums.items()},
                  "seconds": round(time.perf_counter() - t0, 4)}
        model.adapters.eval()
        if len(held_set):
            record.update(_evaluate_holdout(model, held_src, has_masks, tcfg.batch_size))
            if best is None or record["val_total"] < best["val_total"]:
                best, best_state = record, copy.deepcopy(_trainable(model))
        history.append(record)
        if log_file is not None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if progress:
            progress.update(task, advance=1, description=f"epochs (loss {record['loss_total']:.4f})")
        log.debug("epoch %d: %s", epoch, record)
    selected = tcfg.epochs
    if best_state is not None:
        _restore(model, best_state)
        selected = best["epoch"]
    return {"history": history, "selected_epoch": selected, "n_train_images": n, "n_holdout_images": len(held_set),
            "precision": precision.record(),
            "holdout_index": [int(i) for i in held_idx], "cache": {"train": train_src.info, "holdout": held_src.info}}


def _trainable(model: MadCLIP) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in list(model.adapters.state_dict(prefix="adapters.").items())
            + [(f"ctx.{k}", p) for k, p in model.prompts.ctx.items()]}


@torch.no_grad()
def _restore(model: MadCLIP, state: dict[str, torch.Tensor]) -> None:
    model.adapters.load_state_dict({k[len("adapters."):]: v for k, v in state.items() if k.startswith("adapters.")})
    for k, p in model.prompts.ctx.items():
        p.copy_(state[f"ctx.{k}"])
