"""What one serving replica does, without Ray: load + verify + warm up a bundle, describe it, encode results.

`open_verified` is the readiness gate: the bundle's model files are checked against their sha256, the
predictor is loaded on the requested backend, the bundle's golden inputs (golden.npz) are run through that
very predictor and compared with the exporter's FP32 outputs at the self-test tolerances, and one batch of
the maximum size is run so the backend has allocated its largest buffers. Any failure raises, so a bad
bundle never serves. `record_json` builds the same per-scan record `madclip-infer --json` prints, plus the
anomaly map on request (16-bit PNG on the bundle's fixed scale, or float32 .npy, base64-encoded).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import INTENDED_USE, __version__
from ..atomic import sha256_file
from ..errors import BundleError
from ..contract import decide
from ..predictor import Prediction, Predictor, load
from .maps import MAP_FORMATS, encode_map  # noqa: F401  (MAP_FORMATS: imported from here by app.py)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """Everything a replica needs; plain values so Ray can ship it to any node."""

    bundle: str
    backend: str = "ort-cpu"
    precision: str = "fp32"
    threshold: float | None = None
    max_body_bytes: int = 64 * 1024 * 1024
    cache_dir: str | None = None


def _golden_check(predictor: Predictor) -> dict[str, float] | None:
    """Run golden.npz through `predictor`'s backend; BundleError when outside the self-test tolerances."""
    from ..bundles.selftest import read_golden, tolerance

    bundle = predictor.bundle
    if not bundle.has_golden:
        return None
    golden = read_golden(bundle)
    images = golden["image"].astype(np.float32)  # [N, 3, S, S]
    outs = [predictor.backend.run(images[i : i + predictor.max_batch])
            for i in range(0, len(images), predictor.max_batch)]
    score = np.concatenate([o["score"] for o in outs])  # [N]
    amap = np.concatenate([o["anomaly_map"] for o in outs])  # [N, 1, S, S]
    score_err = float(np.max(np.abs(score.astype(np.float64) - golden["score"])))
    map_err = np.abs(amap.astype(np.float64) - golden["anomaly_map"])
    map_p99 = float(np.percentile(map_err, 99)) if np.isfinite(map_err).all() else float("inf")
    tol = tolerance(predictor.precision, predictor.backend_name)
    if not (score_err <= tol["score"] and map_p99 <= tol["map_p99"]):
        raise BundleError(f"{bundle.path}: warm-up self-test failed on {predictor.backend_name} "
                          f"{predictor.precision} (score err {score_err:.3g}, map p99 err {map_p99:.3g}; "
                          f"tolerances {tol['score']:g} / {tol['map_p99']:g})")
    return {"score_max_abs_err": score_err, "map_p99_abs_err": map_p99}


def open_verified(cfg: ServeConfig) -> tuple[Predictor, dict[str, Any]]:
    """Load, verify and warm up; returns the predictor and its /metadata document. Raises on any problem."""
    predictor = load(cfg.bundle, backend=cfg.backend, precision=cfg.precision, threshold=cfg.threshold,
                     cache_dir=cfg.cache_dir, verify="model")
    try:
        selftest = _golden_check(predictor)
        s = predictor.bundle.image_size
        predictor.backend.run(np.zeros((predictor.max_batch, 3, s, s), np.float32))  # largest buffers now
    except BaseException:
        predictor.close()
        raise
    return predictor, metadata(predictor, selftest)


def metadata(predictor: Predictor, selftest: dict[str, float] | None) -> dict[str, Any]:
    """The /metadata document: what is served, with which threshold, and how to read its maps."""
    b = predictor.bundle
    meta = b.meta
    return {
        "method": b.method,
        "bundle": os.path.basename(b.path.rstrip(os.sep)),
        "bundle_sha256": sha256_file(b.metadata_path),  # metadata.json lists every file's sha256
        "schema_version": meta.get("schema_version"),
        "threshold": predictor.threshold,
        "score_name": predictor.score_name,
        "map_threshold": b.map_threshold,
        "map_scale": list(b.map_scale),
        "window": b.spec.window,
        "image_size": b.image_size,
        "max_batch": predictor.max_batch,
        "backend": predictor.backend_name,
        "provider": predictor.provider,
        "precision": predictor.precision,
        "warmup_selftest": selftest,
        "madclip_version": __version__,
        "intended_use": INTENDED_USE,
    }


def with_threshold(pred: Prediction, threshold: float | None) -> Prediction:
    """The prediction re-decided at a per-request threshold (None keeps the served one)."""
    if threshold is None:
        return pred
    return dataclasses.replace(pred, threshold=float(threshold), label=decide(pred.decision_score, threshold))


def record_json(pred: Prediction, predictor: Predictor, map_format: str | None) -> dict[str, Any]:
    """The `madclip-infer --json` record for one scan, plus "anomaly_map" when `map_format` is given."""
    record = predictor.record(pred)
    if map_format:
        record["anomaly_map"] = encode_map(pred.anomaly_map, map_format, predictor.bundle.map_scale)
    return record
