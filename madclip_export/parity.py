"""Parity figures between a reference (PyTorch FP32, or the FP32 ONNX) and a variant, on the same inputs."""

from __future__ import annotations

import numpy as np

from madclip_runtime.contract import OUTPUT_NAMES, SCORE, SCORE_MAP_MAX, decide


def diff_stats(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output: max, p99 and mean absolute error (float64)."""
    out = {}
    for name in OUTPUT_NAMES:
        d = np.abs(np.asarray(got[name], np.float64) - np.asarray(ref[name], np.float64)).ravel()
        finite = bool(np.isfinite(d).all())
        out[name] = {
            "max_abs": float(d.max()) if finite else float("inf"),
            "p99_abs": float(np.percentile(d, 99)) if finite else float("inf"),
            "mean_abs": float(d.mean()) if finite else float("inf"),
        }
    return out


def decision_flips(ref_scores: np.ndarray, got_scores: np.ndarray, threshold: float | None) -> int | None:
    if threshold is None:
        return None
    return int(
        sum(
            decide(float(r), threshold) != decide(float(g), threshold) for r, g in zip(ref_scores, got_scores)
        )
    )


def auroc_change(ref_scores: np.ndarray, got_scores: np.ndarray, labels: np.ndarray) -> float | None:
    """AUROC(variant) - AUROC(reference) on the labelled golden images (None with one class)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    known = labels >= 0
    y = labels[known].astype(bool)
    if y.all() or not y.any():
        return None
    return float(
        roc_auc_score(y, np.asarray(got_scores)[known]) - roc_auc_score(y, np.asarray(ref_scores)[known])
    )


def variant_report(
    ref: dict[str, np.ndarray], got: dict[str, np.ndarray], labels: np.ndarray, calibration: dict
) -> dict:
    stats = diff_stats(ref, got)
    return {
        "errors": stats,
        "decision_flips": decision_flips(ref[SCORE], got[SCORE], calibration.get("threshold")),
        "decision_flips_score_map_max": decision_flips(
            ref[SCORE_MAP_MAX], got[SCORE_MAP_MAX], calibration.get("threshold_score_map_max")
        ),
        "auroc_change": auroc_change(ref[SCORE], got[SCORE], labels),
        "auroc_change_score_map_max": auroc_change(ref[SCORE_MAP_MAX], got[SCORE_MAP_MAX], labels),
        "n_images": int(len(labels)),
    }
