"""What one serving replica does, without Ray: load + verify + warm up a bundle, describe it, encode results.

`open_verified` is the readiness gate: the bundle's model files are checked against their sha256 (and its
signature against the trusted key, when one is given), the predictor is loaded on the requested backend, the
self-test's golden check (`bundles.selftest.golden_check`: every output and the export's decisions) runs on
that very predictor, and one batch of the maximum size is run so the backend has allocated its largest
buffers. Any failure raises, so a bad
bundle never serves. `record_json` builds the same per-scan record `madclip-infer --json` prints, plus the
anomaly map on request (16-bit PNG on the bundle's fixed scale, or float32 .npy, base64-encoded).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .. import INTENDED_USE, __version__
from ..contract import ANOMALY_MAP, FP32, ORT_CPU, decide
from ..errors import BundleError, InputError
from ..predictor import Prediction, Predictor, load
from .limits import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_UPLOADS, DEFAULT_MIN_UPLOAD_RATE
from .maps import MAP_FORMATS, encode_map

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """Everything a replica needs; plain values so Ray can ship it to any node.

    `trusted_key` is the PEM (or base64 raw key) text of the Ed25519 public key the bundle must be signed by,
    read by the driver so the replicas' nodes need no key file; the upload limits are those of `limits.py`.
    """

    bundle: str
    backend: str = ORT_CPU
    precision: str = FP32
    threshold: float | None = None
    max_body_bytes: int = 64 * 1024 * 1024
    cache_dir: str | None = None
    trusted_key: bytes | None = None
    max_uploads: int = DEFAULT_MAX_UPLOADS
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    min_upload_rate: float = DEFAULT_MIN_UPLOAD_RATE


def open_verified(cfg: ServeConfig) -> tuple[Predictor, dict[str, Any]]:
    """Load, verify and warm up; returns the predictor and its /metadata document. Raises on any problem.

    Readiness = the self-test's golden check (`bundles.selftest.golden_check`: every output and the export's
    decisions) on this very predictor, then one batch of the largest size so the backend allocates now.
    """
    from ..bundles.selftest import failure_line, golden_check

    predictor = load(
        cfg.bundle,
        backend=cfg.backend,
        precision=cfg.precision,
        threshold=cfg.threshold,
        cache_dir=cfg.cache_dir,
        verify="model",
        trusted_key=cfg.trusted_key,
    )
    try:
        selftest = None
        if predictor.bundle.has_golden:
            res = golden_check(predictor)
            if not res["passed"]:
                raise BundleError(
                    failure_line(
                        predictor.bundle.path, res, predictor.backend_name, predictor.precision
                    ).replace("self-test", "warm-up self-test", 1)
                )
            selftest = {
                k: res[k]
                for k in (
                    "n",
                    "score_max_abs_err",
                    "score_map_max_max_abs_err",
                    "map_p99_abs_err",
                    "map_max_abs_err",
                    "decisions_reproduced",
                )
            }
        s = predictor.bundle.image_size
        predictor.run_images(np.zeros((predictor.max_batch, 3, s, s), np.float32))  # largest buffers now
    except BaseException:
        predictor.close()
        raise
    return predictor, metadata(predictor, selftest, cfg.trusted_key)


def metadata(
    predictor: Predictor, selftest: dict[str, Any] | None, trusted_key: bytes | None = None
) -> dict[str, Any]:
    """The /metadata document: what is served (identity, signature), with which threshold, how to read maps.

    `bundle_metadata` is metadata.json exactly as on disk (base64; its sha256 is `bundle_sha256`), so a client
    holding the trusted key verifies the signature itself (`client.verify_server_bundle`); `signed_by` is
    the signer's key id and `trusted_key_id` the key this server enforced (None: none given).
    """
    b = predictor.bundle
    meta = b.meta
    with open(b.metadata_path, "rb") as f:
        raw = f.read()
    if json.loads(raw.decode("utf-8")) != meta:  # what is published must be what was verified and loaded
        raise BundleError(f"{b.metadata_path}: changed on disk while the replica was loading it; refused")
    trusted_id = None
    if trusted_key is not None:
        from .client import trusted_key_id

        trusted_id = trusted_key_id(trusted_key)
    return {
        "method": b.method,
        "bundle": os.path.basename(b.path.rstrip(os.sep)),
        "bundle_sha256": hashlib.sha256(raw).hexdigest(),  # metadata.json lists every file's sha256
        "bundle_metadata": base64.b64encode(raw).decode("ascii"),
        "signed_by": (meta.get("signature") or {}).get("key_id")
        if isinstance(meta.get("signature"), dict)
        else None,
        "trusted_key_id": trusted_id,
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
    """The `madclip-infer --json` record for one scan, plus `anomaly_map` when `map_format` is given."""
    record = predictor.record(pred)
    if map_format:
        record[ANOMALY_MAP] = encode_map(pred.anomaly_map, map_format, predictor.bundle.map_scale)
    return record


@dataclass(frozen=True)
class WireOptions:
    """The query parameters of POST /predict, validated."""

    name: str = "<request>"
    slice_index: int | None = None
    map_format: str | None = None
    threshold: float | None = None


def wire_options(query: Mapping[str, str], bundle: Any) -> WireOptions:
    """POST /predict's query -> WireOptions, validated by the very code that validates madclip-infer's
    --slice and --threshold (`cli.common.bounded_int` / `finite_float`) and the API's threshold
    (`predictor.check_threshold`: finite and within the bundle's score range). InputError: one line."""
    import argparse

    from ..cli.common import bounded_int, finite_float
    from ..predictor import check_threshold

    def parse(key: str, kind: Any) -> Any:
        text = query.get(key)
        if text in (None, ""):
            return None
        try:
            return kind(text)
        except argparse.ArgumentTypeError as exc:
            raise InputError(f"{key} {exc}") from None

    slice_index = parse("slice", bounded_int(0))
    threshold = check_threshold(parse("threshold", finite_float()), bundle)
    fmt = query.get("map") or None
    if fmt is not None and fmt not in MAP_FORMATS:
        raise InputError(f"map must be one of {', '.join(MAP_FORMATS)}, got {fmt!r}")
    return WireOptions(query.get("name") or "<request>", slice_index, fmt, threshold)
