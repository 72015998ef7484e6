"""Self-test on the target: run the bundle's golden inputs through a backend and compare with the FP32 reference.

golden.npz (written by madclip-export) holds preprocessed inputs `image` [N, 3, S, S], the FP32 reference
outputs `score` [N], `anomaly_map` [N, 1, S, S], `score_map_max` [N], and the decisions the exported
calibration made on them: `decisions` int8 [N] (1 anomaly, 0 normal, -1 no threshold), `decision_threshold`
(NaN: none) and `decision_score_name`. The self-test answers "does this machine, with this backend and
precision, compute what the exporter computed, and does the bundle still decide as it did at export?" It
first verifies every bundle file (sha256), the schema version, the metadata's integrity record and
signature, so a tampered or foreign bundle is refused before it runs; then it fails when the bundle's
calibration (threshold, score name) no longer reproduces the recorded decisions.

Tolerances (absolute; scores and maps lie in [0, L], L = 4):

    precision  score / score_map_max max |err|   anomaly_map p99 |err|
    fp32       1e-4 (CPU),  2e-3 (GPU backends)   1e-4 (CPU),  2e-3 (GPU)
    fp16       5e-2                               5e-2
    bf16       5e-2                               5e-2
    int8       1e-1                               1e-1

FP32 on the CPU reproduces the reference to ~1e-6 (docs/ARCHITECTURE.md §4), so 1e-4 leaves room for other CPUs
and thread counts only. GPU backends get 2e-3 because cuDNN/TensorRT use TF32 for FP32 matrix products by
default (10-bit mantissa inputs). FP16 keeps the scoring head in FP32 but the backbone runs in half
precision (~1e-3 relative per layer, compounding); 5e-2 is 1.25 % of the range. Dynamic INT8 moved the map
by up to 3.4e-2 with random weights (docs/ARCHITECTURE.md §4); 1e-1 is 2.5 % of the range. BF16 (OpenVINO)
has an 8-bit mantissa but FP32 accumulation; it moved MVFA's map by 4e-2 on tiny random weights, MadCLIP's
by 2e-4 (docs/runtime.md), so it shares FP16's 5e-2. openvino FP32 counts as a CPU backend. The map is judged
on its 99th percentile so a handful of boundary pixels do not fail a healthy build, while the max is reported.
"""

from __future__ import annotations

import logging
import os
import zipfile
from typing import Any

import numpy as np

from ..contract import (
    ANOMALY,
    ANOMALY_MAP,
    BF16,
    FP16,
    FP32,
    GOLDEN_DECISION_KEYS,
    GOLDEN_DECISION_SCORE_NAME,
    GOLDEN_DECISION_THRESHOLD,
    GOLDEN_DECISIONS,
    GOLDEN_INPUT,
    INT8,
    NORMAL,
    OPENVINO,
    ORT_CPU,
    OUTPUT_NAMES,
    SCORE,
    SCORE_MAP_MAX,
    decide,
)
from ..engines.backends import create_backend, resolve_auto
from ..errors import BundleError
from ..predictor import DEFAULT_MAX_BATCH, model_sha256
from .bundle import Bundle, load_bundle

log = logging.getLogger(__name__)

GOLDEN_KEYS = (GOLDEN_INPUT, *OUTPUT_NAMES, *GOLDEN_DECISION_KEYS)
CPU_BACKENDS = (ORT_CPU, OPENVINO)
TOLERANCES: dict[str, dict[str, float]] = {
    FP32: {SCORE: 1e-4, "map_p99": 1e-4},
    "fp32-gpu": {SCORE: 2e-3, "map_p99": 2e-3},
    FP16: {SCORE: 5e-2, "map_p99": 5e-2},
    BF16: {SCORE: 5e-2, "map_p99": 5e-2},
    INT8: {SCORE: 1e-1, "map_p99": 1e-1},
}


def tolerance(precision: str, backend: str) -> dict[str, float]:
    """The pass/fail limits for a precision on a backend (see the module docstring)."""
    if precision == FP32 and backend not in CPU_BACKENDS:
        return dict(TOLERANCES["fp32-gpu"])
    return dict(TOLERANCES[precision])


def read_golden(bundle: Bundle) -> dict[str, np.ndarray]:
    """golden.npz -> arrays (no pickles), checked against the bundle's image size."""
    path = bundle.golden_path
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: np.asarray(npz[k]) for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    missing = [k for k in GOLDEN_KEYS if k not in data]
    if missing:
        raise BundleError(
            f"{path}: missing arrays {', '.join(missing)} (written by an older madclip-export: re-export)"
        )
    n, s = len(data[GOLDEN_INPUT]), bundle.image_size
    expected = {
        GOLDEN_INPUT: (n, 3, s, s),
        SCORE: (n,),
        ANOMALY_MAP: (n, 1, s, s),
        SCORE_MAP_MAX: (n,),
        GOLDEN_DECISIONS: (n,),
        GOLDEN_DECISION_THRESHOLD: (),
        GOLDEN_DECISION_SCORE_NAME: (),
    }
    for key, shape in expected.items():
        if data[key].shape != shape:
            raise BundleError(f"{path}: {key} has shape {data[key].shape}, expected {shape}")
    if n == 0:
        raise BundleError(f"{path}: holds no golden inputs")
    return data


def decision_codes(values: np.ndarray, threshold: float | None) -> np.ndarray:
    """`contract.decide` per value as int8 [N]: 1 anomaly, 0 normal, -1 no decision."""
    codes = {ANOMALY: 1, NORMAL: 0, None: -1}
    return np.array([codes[decide(float(v), threshold)] for v in np.asarray(values).ravel()], dtype=np.int8)


def golden_decisions(outputs: dict[str, np.ndarray], calibration: dict) -> dict[str, np.ndarray]:
    """The decisions the exported calibration makes on the golden FP32 reference outputs, for --selftest.

    decisions int8 [N]: 1 anomaly, 0 normal, -1 no threshold; decision_threshold float64 [] (NaN: none);
    decision_score_name str []. The self-test fails when the bundle's calibration no longer reproduces them.
    """
    name = calibration.get("score_name", SCORE)
    t = calibration.get("threshold")
    decisions = decision_codes(outputs[name], None if t is None else float(t))
    return {
        GOLDEN_DECISIONS: decisions,
        GOLDEN_DECISION_THRESHOLD: np.float64(np.nan if t is None else t),
        GOLDEN_DECISION_SCORE_NAME: np.array(name),
    }


def check_decisions(bundle: Bundle, golden: dict[str, np.ndarray]) -> dict[str, Any]:
    """Do the bundle's threshold and score name still make the decisions recorded at export on the golden set?

    Returns {"decisions_reproduced": bool, "export_threshold", "threshold", "n_changed"}.
    """
    name = str(golden[GOLDEN_DECISION_SCORE_NAME])
    export_t = float(golden[GOLDEN_DECISION_THRESHOLD])
    recorded = golden[GOLDEN_DECISIONS].astype(np.int8)
    t = bundle.threshold
    now = decision_codes(golden[bundle.score_name], t)
    same = bool(np.array_equal(now, recorded)) and (t is None or name == bundle.score_name)
    return {
        "decisions_reproduced": same,
        "export_threshold": None if np.isnan(export_t) else export_t,
        "threshold": t,
        "n_changed": int((now != recorded).sum()),
    }


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(np.max(d)) if np.isfinite(d).all() else float("inf")


def golden_check(predictor: Any, golden: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """THE golden check (self-test and serving readiness): golden.npz through `predictor.run_images`.

    Compares every output (score, score_map_max, anomaly_map) with the FP32 reference at the tolerances of
    the predictor's precision and backend, and checks that the bundle's calibration still makes the export's
    decisions. Returns the errors, tolerance, label_agreement, the decision check and passed.
    """
    b = predictor.bundle
    golden = read_golden(b) if golden is None else golden
    decisions = check_decisions(b, golden)
    out = predictor.run_images(golden[GOLDEN_INPUT])  # [N, ...]
    map_err = np.abs(out[ANOMALY_MAP].astype(np.float64) - golden[ANOMALY_MAP].astype(np.float64))
    finite = bool(np.isfinite(map_err).all())
    errors = {
        "score_max_abs_err": _max_abs(out[SCORE], golden[SCORE]),
        "score_map_max_max_abs_err": _max_abs(out[SCORE_MAP_MAX], golden[SCORE_MAP_MAX]),
        "map_p99_abs_err": float(np.percentile(map_err, 99)) if finite else float("inf"),
        "map_max_abs_err": float(np.max(map_err)) if finite else float("inf"),
    }
    tol = tolerance(predictor.precision, predictor.backend_name)
    passed = (
        errors["score_max_abs_err"] <= tol[SCORE]
        and errors["score_map_max_max_abs_err"] <= tol[SCORE]
        and errors["map_p99_abs_err"] <= tol["map_p99"]
        and decisions["decisions_reproduced"]
    )
    agreement, flips = None, None
    if b.threshold is not None:
        key = b.score_name
        t = b.threshold
        same = [decide(float(o), t) == decide(float(g), t) for o, g in zip(out[key], golden[key])]
        agreement, flips = float(np.mean(same)), int(len(same) - sum(same))
    return {
        "n": int(len(golden[GOLDEN_INPUT])),
        **errors,
        "tolerance": tol,
        "label_agreement": agreement,
        "decision_flips": flips,
        **decisions,
        "passed": bool(passed),
    }


def failure_line(bundle_path: str, res: dict[str, Any], backend: str, precision: str) -> str:
    """Why a golden check failed, in one line."""
    if not res["decisions_reproduced"]:
        return (
            f"{bundle_path}: self-test failed: the bundle's calibration (threshold {res['threshold']}) "
            f"no longer reproduces the decisions made at export (threshold {res['export_threshold']}): "
            f"{res['n_changed']} of {res['n']} golden decisions changed"
        )
    return (
        f"{bundle_path}: self-test failed on {backend} {precision} "
        f"(score err {res['score_max_abs_err']:.3g}, "
        f"score_map_max err {res['score_map_max_max_abs_err']:.3g}, "
        f"map p99 err {res['map_p99_abs_err']:.3g}; "
        f"tolerances {res['tolerance'][SCORE]:g} / {res['tolerance']['map_p99']:g})"
    )


def run_selftest(
    bundle: str | os.PathLike | Bundle,
    backend: str = "auto",
    precision: str = FP32,
    cache_dir: str | os.PathLike | None = None,
    trusted_key: Any = None,
) -> dict[str, Any]:
    """Verify the bundle fully, run golden.npz on `backend` at `precision`, compare with the FP32 reference.

    Returns a JSON-able dict: backend, provider, precision, n, the errors (score_max_abs_err,
    score_map_max_max_abs_err, map_p99_abs_err, map_max_abs_err), tolerance, label_agreement (fraction of
    golden inputs whose thresholded decision matches the reference's, None without a threshold),
    decisions_reproduced (the bundle's calibration makes the export's decisions on the reference outputs),
    export_threshold, threshold, n_changed, and passed (tolerances met and decisions reproduced).
    A tampered bundle, an edited metadata field or an unknown schema raises BundleError (load_bundle with
    verify=True); `trusted_key` requires a signature by that key.
    """
    from ..predictor import Predictor

    b = load_bundle(
        bundle.path if isinstance(bundle, Bundle) else bundle, verify=True, trusted_key=trusted_key
    )
    golden = read_golden(b)
    name = resolve_auto(precision, INT8 in b.openvino_models) if backend == "auto" else backend
    be = create_backend(
        name,
        b.model_path(precision, name),
        precision,
        b.max_batch or DEFAULT_MAX_BATCH,
        None if cache_dir is None else os.fspath(cache_dir),
        input_chw=(3, b.image_size, b.image_size),
        fp32_islands=b.fp32_islands,
        onnx_sha256=model_sha256(b, precision, name),
    )
    with Predictor(b, be) as predictor:
        res = golden_check(predictor, golden)
        provider, load_seconds = be.provider, be.load_seconds
    result = {
        "bundle": b.path,
        "backend": name,
        "provider": provider,
        "precision": precision,
        **res,
        "load_seconds": float(load_seconds),
    }
    log.debug("selftest %s", result)
    return result
