"""The trainer, for any method (`methods.MethodModel`), on cached features where the method allows it.

Flow: shots -> the method's training source (default: offline augmentation, then the method's cacheable part
of the forward pass computed once into the fp16 feature cache) -> epochs that run only what follows the cache
boundary (for MadCLIP: the 8 adapters and the prompt learner, text tower included, frozen) -> the method's
`finalize` (e.g. a memory bank) -> checkpoint. Model selection never sees
the test split: a fixed epoch budget by default (`select_on="none"`, the last epoch is kept), or
`select_on="valid"`: a part of the shots (per class, `holdout_fraction`, at least one image) is held out of
training and the epoch with the lowest held-out loss is kept.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from madclip_runtime.contract import SCORE

from .cache import DTYPES, load_or_extract
from .config import TrainConfig
from .data import normalize_images
from .device import gather_to_device, place_on_device
from .methods.base import Batch, MethodModel, iterate_batches
from .metrics import image_auroc
from .precision import Precision

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
        if not idx:  # a class without shots (methods trained on normal shots only)
            continue
        if len(idx) < 2:
            raise MadclipError(
                f"--select-on valid needs at least 2 shots per class (got {len(idx)}); use more "
                f"--shots or the fixed epoch budget (--select-on none)"
            )
        rng.shuffle(idx)
        n_held = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        held += idx[:n_held]
        train += idx[n_held:]
    return torch.tensor(sorted(train)), torch.tensor(sorted(held))


class CachedSource:
    """Training batches from a fixed set of (augmented) images: their `model.cacheable()` features come from the
    feature cache, or (cache "off") from running the cacheable part every time, rounded through the same dtype."""

    def __init__(
        self,
        model: MethodModel,
        images01: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
        tcfg: TrainConfig,
        device: torch.device,
        cache_dir: Path | None = None,
        progress=None,
        label: str = "features",
    ):
        self.model, self.device, self.dtype, self.batch_size = (
            model,
            device,
            tcfg.cache_dtype,
            tcfg.batch_size,
        )
        self.images = normalize_images(images01, model.cfg.preprocess)  # [N, 3, S, S]
        self.masks, self.labels = masks, labels
        self.groups: torch.Tensor | None = None  # a method's training_source may say which shot each view is
        self.feats = None
        self.info: dict = {"mode": tcfg.feature_cache}
        if tcfg.feature_cache != "off" and len(labels):
            task = progress.add_task(f"backbone {label}", total=len(labels)) if progress else None
            t0 = time.perf_counter()
            self.feats, self.info = load_or_extract(
                model.cacheable,
                self.images,
                model.cache_identity(),
                tcfg.feature_cache,
                tcfg.cache_dtype,
                batch_size=tcfg.batch_size,
                device=device,
                cache_dir=cache_dir,
                advance=(lambda n: progress.advance(task, n)) if progress else None,
            )
            self.info["seconds"] = time.perf_counter() - t0
            self.info["bytes"] = self.feats.numel() * self.feats.element_size()
            self.feats, self.info["placement"] = place_on_device(
                self.feats, device
            )  # GPU if it fits, else pinned
        if device.type == "cuda":  # labels and masks are read every step: copied once
            self.labels, self.masks = place_on_device(labels, device)[0], place_on_device(masks, device)[0]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def get(self, index: torch.Tensor) -> Batch:
        """Batch of data[index]: features on the device (rounded through the cache dtype), labels, masks."""
        if self.feats is not None:
            feats = gather_to_device(self.feats, index, self.device, dim=0)
        else:
            with torch.no_grad():
                feats = self.model.cacheable(self.images[index].to(self.device)).to(DTYPES[self.dtype])
        return Batch(
            feats,
            gather_to_device(self.labels, index, self.device, dim=0),
            gather_to_device(self.masks, index, self.device, dim=0),
        )

    def batches(self, epoch: int, generator: torch.Generator) -> Iterator[Batch]:
        for index in iterate_batches(len(self), self.batch_size, generator):
            yield self.get(index)

    def in_order(self) -> Iterator[Batch]:
        for start in range(0, len(self), self.batch_size):
            yield self.get(torch.arange(start, min(start + self.batch_size, len(self))))


@torch.no_grad()
def _evaluate_holdout(model: MethodModel, source, has_masks: bool) -> dict:
    n = len(source)
    totals, scores, labels = {}, [], []
    ctx = model.inference_context()
    for batch in source.in_order():
        parts = model.loss(batch.feats, batch.labels, batch.masks if has_masks else None)
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + float(v) * len(batch.labels)
        scores.append(model.outputs(batch.feats, ctx)[SCORE].cpu())
        labels.append(batch.labels.cpu())
    out = {f"val_{k}": v / n for k, v in totals.items()}
    out["val_image_auroc"] = image_auroc(torch.cat(scores).numpy(), torch.cat(labels).numpy())
    return out


def check_finite_step(
    parts: dict[str, torch.Tensor], epoch: int, step: int, model: torch.nn.Module | None = None
) -> None:
    """Stop training at the first NaN/inf loss or trainable parameter: one line naming epoch and step.

    Called once per step after `optimizer.step()`. Raised as a MadclipError inside the run's AtomicDirectory,
    so nothing of the run is written. Parameters are checked too: an inf learning rate keeps the loss finite
    for one step but turns every parameter into NaN.
    """
    from madclip_runtime.errors import MadclipError

    for name, value in parts.items():
        if not bool(torch.isfinite(value.detach()).all()):
            raise MadclipError(
                f"training diverged: loss {name} is {float(value.detach().float().mean())} at epoch "
                f"{epoch} step {step}; nothing written (try a lower --lr)"
            )
    if model is not None:
        where = f"epoch {epoch} step {step}" if step else f"epoch {epoch}"
        for name, p in model.named_parameters():
            if p.requires_grad and not bool(torch.isfinite(p.detach()).all()):
                raise MadclipError(
                    f"training diverged: parameter {name} became NaN/inf at {where}; "
                    f"nothing written (try a lower --lr)"
                )


class FiniteGuard:
    """Per-step NaN/inf detection of the loss without a host sync per step; checked once per epoch.

    `step(parts, step)` records on the device the first step whose total loss is not finite; `end_epoch`
    syncs once and raises (via `check_finite_step`'s message) naming that epoch and step, and checks the
    trainable parameters (an inf learning rate turns them into NaN while the loss of that step is finite).
    """

    def __init__(self) -> None:
        self.first_bad: torch.Tensor | None = None  # int64 scalar on the loss's device: 0 = none yet

    def step(self, parts: dict[str, torch.Tensor], step: int) -> None:
        total = parts["total"].detach()
        code = torch.where(
            torch.isfinite(total).all(),
            torch.zeros((), dtype=torch.long, device=total.device),
            torch.full((), step, dtype=torch.long, device=total.device),
        )
        self.first_bad = (
            code if self.first_bad is None else torch.where(self.first_bad > 0, self.first_bad, code)
        )

    def end_epoch(self, epoch: int, model: torch.nn.Module) -> None:
        bad_step = int(self.first_bad) if self.first_bad is not None else 0
        self.first_bad = None
        if bad_step:
            check_finite_step({"total": torch.tensor(float("nan"))}, epoch, bad_step)
        check_finite_step({}, epoch, 0, model)


def fit(
    model: MethodModel,
    shots: ShotTensors,
    has_masks: bool,
    tcfg: TrainConfig,
    device: torch.device,
    cache_dir: Path | None = None,
    progress=None,
    log_file=None,
) -> dict:
    """Train the method's trainables in place. `shots.images` are un-normalised [0, 1]. Returns a summary
    (history, selected epoch, cache info, what `finalize` built)."""
    model.to(device)
    train_idx, held_idx = (
        holdout_split(shots.labels, tcfg.holdout_fraction, tcfg.seed)
        if tcfg.select_on == "valid"
        else (torch.arange(len(shots)), torch.tensor([], dtype=torch.long))
    )
    train_set, held_set = shots.subset(train_idx), shots.subset(held_idx)

    model.augment_variant = tcfg.augment_variant  # read by the default training_source's augmentation
    finite = FiniteGuard()

    def make_cached(images01, masks, labels, label):
        return CachedSource(model, images01, masks, labels, tcfg, device, cache_dir, progress, label)

    def source(data: ShotTensors, seed: int, label: str):
        if (
            not tcfg.augment and model.augmentation != "none"
        ):  # "none": the method's source is not an augmentation
            return make_cached(data.images, data.masks, data.labels, label)
        return model.training_source(
            data.images, data.masks, data.labels, seed, make_cached, label, batch_size=tcfg.batch_size
        )

    train_src = source(train_set, tcfg.seed, "train shots")
    held_src = source(held_set, tcfg.seed + 1, "held-out shots")

    optimizer = torch.optim.Adam(model.trainable_parameters(has_masks), lr=tcfg.lr, betas=tuple(tcfg.betas))
    params = model.trainable_parameters(has_masks)
    precision = Precision.create(tcfg.precision, device)
    generator = torch.Generator().manual_seed(tcfg.seed)
    n = len(train_src)
    history, best, best_state = [], None, None
    task = progress.add_task("epochs", total=tcfg.epochs) if progress else None
    for epoch in range(1, tcfg.epochs + 1):
        model.set_training(True)
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        for step, batch in enumerate(train_src.batches(epoch, generator), 1):
            with precision.autocast():
                parts = model.loss(batch.feats, batch.labels, batch.masks if has_masks else None)
            optimizer.zero_grad(set_to_none=True)
            precision.backward_step(parts["total"], optimizer)
            finite.step(parts, step)  # device-side: no host sync per step
            for k, v in parts.items():  # summed on the device: no host sync per step
                sums[k] = sums.get(k, 0.0) + v.detach().float() * len(batch.labels)
        finite.end_epoch(
            epoch, model
        )  # one sync: a NaN/inf loss or parameter stops training, naming epoch and step
        record = {
            "epoch": epoch,
            **{f"loss_{k}": float(v) / n for k, v in sums.items()},
            "seconds": round(time.perf_counter() - t0, 4),
        }
        model.set_training(False)
        if len(held_src):
            record.update(_evaluate_holdout(model, held_src, has_masks))
            if best is None or record["val_total"] < best["val_total"]:
                best, best_state = record, [p.detach().clone() for p in params]
        history.append(record)
        if log_file is not None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if progress:
            progress.update(task, advance=1, description=f"epochs (loss {record['loss_total']:.4f})")
        log.debug("epoch %d: %s", epoch, record)
    selected = tcfg.epochs
    if best_state is not None:
        with torch.no_grad():
            for p, saved in zip(params, best_state):
                p.copy_(saved)
        selected = best["epoch"]
    finalized = model.finalize(train_src, device)
    return {
        "history": history,
        "selected_epoch": selected,
        "n_train_images": n,
        "n_holdout_images": len(held_src),
        "holdout_index": [int(i) for i in held_idx],
        "finalize": finalized,
        "precision": precision.record(),
        "cache": {"train": train_src.info, "holdout": held_src.info},
    }
