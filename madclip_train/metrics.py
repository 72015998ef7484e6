"""Evaluation metrics (docs/METHODS.md §8) with scikit-learn's ROC/PR curves.

- image AUROC over one score per image;
- pixel AUROC pooled over every pixel of every test image at model resolution (not averaged per image);
- AUPRO: area under the per-region-overlap curve up to a false-positive rate of 0.3, normalised to [0, 1];
- F1-max: the best image-level F1 over all thresholds of the image score.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_auc_score


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return None  # undefined with one class
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float | None:
    labels = np.asarray(labels).astype(bool)
    if not labels.any():
        return None
    precision, recall, _ = precision_recall_curve(labels, np.asarray(scores, dtype=np.float64))
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(f1.max())


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float | None:
    """maps [N, S, S], masks bool [N, S, S]: one ROC over all pixels pooled."""
    return image_auroc(np.asarray(maps, dtype=np.float32).ravel(), np.asarray(masks, dtype=bool).ravel())


def aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3, n_thresholds: int = 200) -> float | None:
    """Area under the PRO curve up to `max_fpr` (MVTec AD definition), normalised by max_fpr."""
    from scipy import ndimage

    maps = np.asarray(maps, dtype=np.float32)
    masks = np.asarray(masks, dtype=bool)
    if not masks.any() or masks.all():
        return None
    thresholds = np.linspace(float(maps.max()), float(maps.min()), n_thresholds)
    regions = []  # (image index, boolean region)
    for i in range(masks.shape[0]):
        labelled, n = ndimage.label(masks[i])
        regions.extend((i, labelled == r) for r in range(1, n + 1))
    negatives = ~masks
    n_neg = negatives.sum()
    fprs, pros = [], []
    for t in thresholds:
        pred = maps >= t
        fprs.append((pred & negatives).sum() / n_neg)
        pros.append(np.mean([pred[i][reg].mean() for i, reg in regions]))
    fprs, pros = np.asarray(fprs), np.asarray(pros)
    keep = fprs <= max_fpr
    if keep.sum() < 2:
        return 0.0
    f, p = fprs[keep], pros[keep]
    # close the curve exactly at max_fpr by interpolating with the next point
    nxt = np.argmax(fprs > max_fpr) if (fprs > max_fpr).any() else None
    if nxt is not None and nxt > 0:
        f0, f1_, p0, p1 = fprs[nxt - 1], fprs[nxt], pros[nxt - 1], pros[nxt]
        p_end = p0 + (p1 - p0) * (max_fpr - f0) / max(f1_ - f0, 1e-12)
        f, p = np.append(f, max_fpr), np.append(p, p_end)
    return float(np.trapezoid(p, f) / max_fpr)


def all_metrics(
    scores: np.ndarray,
    map_max: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray | None = None,
    masks: np.ndarray | None = None,
) -> dict:
    """The madclip-eval JSON: image_auroc (AC), image_auroc_max_map, pixel_auroc, aupro, f1_max, n_images."""
    out = {
        "n_images": int(len(labels)),
        "image_auroc": image_auroc(scores, labels),
        "f1_max": f1_max(scores, labels),
        "image_auroc_max_map": None,
        "pixel_auroc": None,
        "aupro": None,
    }
    if maps is not None and masks is not None:
        out["image_auroc_max_map"] = image_auroc(map_max, labels)
        out["pixel_auroc"] = pixel_auroc(maps, masks)
        out["aupro"] = aupro(maps, masks)
    return out
