"""Default decision thresholds, chosen on the run's own shots (never on the test split).

Image threshold: the shots (un-augmented originals) are scored by the trained FP32 model; among the midpoints
between consecutive distinct scores, the one maximising Youden's J = TPR - FPR is chosen (ties: the median of
the tied midpoints). The shots were seen in training, so their classes are usually separated more cleanly than
unseen scans: treat the threshold as a starting point and override it (`madclip-infer --threshold`) after
checking on held-out data. Map threshold (overlay contour): with masks, the pixel threshold maximising pixel F1
on the shots' masks; without masks, the 99.5th percentile of the normal shots' map values.
"""

from __future__ import annotations

import numpy as np

from madclip_runtime.contract import SCORE

METHOD_TEXT = (
    "Youden's J maximised over midpoints of the image scores of the run's shots (k normal + k abnormal, "
    "un-augmented); shots were seen in training, so the threshold is optimistic: check it on held-out data"
)


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    values = np.unique(scores)
    if len(values) == 1:
        return float(values[0])
    mids = (values[:-1] + values[1:]) / 2
    pos, neg = max(labels.sum(), 1), max((~labels).sum(), 1)
    j = np.array([(scores[labels] >= t).sum() / pos - (scores[~labels] >= t).sum() / neg for t in mids])
    best = mids[np.isclose(j, j.max())]
    return float(np.median(best))


def map_threshold(maps: np.ndarray, masks: np.ndarray | None, labels: np.ndarray) -> float:
    """maps [N, S, S] at model resolution, masks bool [N, S, S] or None."""
    from sklearn.metrics import precision_recall_curve

    maps = np.asarray(maps, dtype=np.float32)
    if masks is not None and np.asarray(masks).any():
        rng = np.random.default_rng(0)
        flat, truth = maps.ravel(), np.asarray(masks, bool).ravel()
        if flat.size > 2_000_000:  # subsample evenly for speed; enough for a threshold
            keep = rng.choice(flat.size, 2_000_000, replace=False)
            flat, truth = flat[keep], truth[keep]
        precision, recall, thresholds = precision_recall_curve(truth, flat)
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        return float(thresholds[int(np.argmax(f1[:-1]))])
    normal = maps[np.asarray(labels) <= 0]  # normal (0) or unknown (-1): most unlabelled scans are normal
    return float(np.percentile(normal if normal.size else maps, 99.5))


def calibrate(
    scores: np.ndarray,
    map_max: np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray | None,
    labels: np.ndarray,
    map_range: tuple[float, float],
    has_masks: bool,
) -> dict:
    """The metadata.json `calibration` entry. score_name: the score the label uses (AC by default).

    Labels 1 abnormal, 0 normal, -1 unknown (an unlabelled --calib folder). Without both classes no image
    threshold can be chosen: `threshold` is None (the bundle gives scores without a decision) and `method` says so.
    """
    labels = np.asarray(labels)
    both = bool((labels == 0).any() and (labels == 1).any())
    known = labels >= 0
    return {
        "threshold": youden_threshold(scores[known], labels[known]) if both else None,
        "score_name": SCORE,
        "threshold_score_map_max": youden_threshold(map_max[known], labels[known]) if both else None,
        "method": METHOD_TEXT
        if both
        else (
            "none: the calibration images do not hold both normal and abnormal labelled images, so no decision "
            "threshold was chosen (pass madclip-infer --threshold, or re-export with a labelled --calib dataset)"
        ),
        "map_threshold": map_threshold(maps, masks if has_masks else None, labels),
        "map_threshold_method": (
            "pixel F1-max on the shots' masks"
            if has_masks
            else "99.5th percentile of the normal shots' map values"
        ),
        "map_scale": [float(map_range[0]), float(map_range[1])],
        "n_shots": int(len(labels)),
    }
