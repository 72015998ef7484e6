"""Scoring a split with a trained (or untrained) model and computing the metrics of docs/METHODS.md §8."""

from __future__ import annotations

import logging

import numpy as np
import torch

from madclip_runtime.contract import ANOMALY_MAP, SCORE, SCORE_MAP_MAX

from .data import Split, load_arrays
from .methods import MethodModel
from .metrics import all_metrics

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_split(
    model: MethodModel, split: Split, batch_size: int = 16, device: torch.device | str = "cpu", progress=None
) -> dict[str, np.ndarray]:
    """Run the full model (image -> AC, AS) over every image of `split`, reading in batches.

    Returns score [N], score_map_max [N], labels [N], and with masks: maps float16 [N, S, S], masks bool [N, S, S].
    """
    model.eval().to(device)
    spec = model.cfg.preprocess
    samples = list(split.samples)
    ctx = model.inference_context()  # constants (e.g. text embeddings) computed once
    out: dict[str, list] = {SCORE: [], SCORE_MAP_MAX: [], "labels": [], "maps": [], "masks": []}
    task = progress.add_task(f"scoring {split.name}", total=len(samples)) if progress else None
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images, masks, labels = load_arrays(chunk, spec)
        res = model.outputs(model.cacheable(torch.from_numpy(images).to(device)), ctx)
        out[SCORE].append(res[SCORE].cpu().numpy())
        out[SCORE_MAP_MAX].append(res[SCORE_MAP_MAX].cpu().numpy())
        out["labels"].append(labels)
        if split.has_masks:
            out["maps"].append(res[ANOMALY_MAP][:, 0].cpu().numpy().astype(np.float16))
            out["masks"].append(masks)
        if progress:
            progress.advance(task, len(chunk))
    result = {k: np.concatenate(v) for k, v in out.items() if v}
    return result


def metrics_from_predictions(pred: dict[str, np.ndarray]) -> dict:
    return all_metrics(pred[SCORE], pred[SCORE_MAP_MAX], pred["labels"], pred.get("maps"), pred.get("masks"))
