"""The Python API of the runtime: `load(bundle)` -> Predictor; `predict(scan)` -> Prediction.

    import madclip_runtime as mr
    p = mr.load("bundle/")                      # fastest available backend, FP32
    pred = p.predict("scan.png")                # score, label, anomaly map at the scan's own resolution

A Predictor couples a verified bundle, its ONE preprocessing (`madclip_runtime.preprocess.preprocess` with the
bundle's spec, so serving cannot drift from training) and a backend. Decisions use the bundle's calibrated
threshold on its calibration `score_name` (`score` = AC or `score_map_max` = max of AS), or an override.
Research use, not for clinical decisions.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import numpy as np

from . import INTENDED_USE
from .bundles.bundle import Bundle, load_bundle, openvino_weights
from .contract import (
    ANOMALY_MAP,
    FP16,
    FP32,
    INT8,
    OPENVINO,
    ORT_CPU,
    OUTPUT_NAMES,
    RUNTIME_PRECISION_OF,
    SCORE,
    SCORE_MAP_MAX,
    decide,
)
from .engines.backends import create_backend, resolve_auto
from .engines.trt_rules import content_id
from .errors import BundleError, InputError, MadclipError
from .preprocess import preprocess, resize_map
from .scans.imageio import ScanImage, check_finite, check_size, read_scans, window_to_unit

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8  # used when the bundle sets no limit (max_batch null)
STAGES = ("decode", "preprocess", "inference", "postprocess")

PredictInput = Union[str, "os.PathLike[str]", np.ndarray, ScanImage]


@dataclass(frozen=True, eq=False)  # eq off: numpy arrays have no single truth value
class Prediction:
    """One scan's result. `timings` are milliseconds per stage; `inference` is this image's share of its batch."""

    source: str
    score: float  # AC, in [0, L]
    score_map_max: float  # max of the anomaly map, in [0, L]
    label: str | None  # "anomaly" / "normal", None without a threshold
    threshold: float | None
    score_name: str  # which of score / score_map_max the threshold applies to
    anomaly_map: np.ndarray = field(repr=False)  # float32 [H, W] at the input's native resolution
    model_map: np.ndarray = field(repr=False)  # float32 [S, S] as the model produced it
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def decision_score(self) -> float:
        """The value compared with the threshold."""
        return self.score if self.score_name == SCORE else self.score_map_max

    def record(self, **context: Any) -> dict[str, Any]:
        """The per-scan record (printed with --json, stored in <stem>.json): JSON-ready, NaN/inf as None.
        `context` adds where it was computed (backend, provider, precision)."""
        return {
            "file": self.source,
            SCORE: _finite(self.score),
            SCORE_MAP_MAX: _finite(self.score_map_max),
            "label": self.label,
            "threshold": self.threshold,
            "score_name": self.score_name,
            **context,
            "latency_ms": round(self.latency_ms, 3),
            "timings_ms": {k: round(v, 3) for k, v in self.timings.items()},
            "height": int(self.anomaly_map.shape[0]),
            "width": int(self.anomaly_map.shape[1]),
            "intended_use": INTENDED_USE,
        }

    @property
    def latency_ms(self) -> float:
        return float(sum(self.timings.get(s, 0.0) for s in STAGES))


def _finite(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def array_to_scan(pixels: np.ndarray, source: str = "<array>", window: str = "auto") -> ScanImage:
    """A user's array -> ScanImage: uint8 [H, W(, 3)] as is; float in [0, 1]; other integers windowed."""
    arr = np.asarray(pixels)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise InputError(f"{source}: expected pixels [H, W] or [H, W, 3], got shape {list(arr.shape)}")
    check_size(source, int(arr.shape[1]), int(arr.shape[0]))
    if arr.dtype == np.bool_:
        return ScanImage(arr.astype(np.uint8) * 255, source, 8)
    if arr.dtype == np.uint8:
        return ScanImage(np.ascontiguousarray(arr), source, 8)
    if arr.dtype.kind == "f":
        check_finite(source, arr)
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise InputError(
                f"{source}: float pixels must lie in [0, 1], got [{lo:g}, {hi:g}] "
                "(pass integers to have them windowed)"
            )
        return ScanImage(arr.astype(np.float32), source, 32)
    if arr.dtype.kind in "iu":
        mode = "minmax" if window == "auto" else window
        dtype_max = float(np.iinfo(arr.dtype).max)
        return ScanImage(window_to_unit(arr, mode, dtype_max), source, arr.dtype.itemsize * 8)
    raise InputError(f"{source}: unsupported pixel dtype {arr.dtype}")


class Predictor:
    """A bundle on a backend. Build with `load`; use as a context manager or call `close()`."""

    def __init__(self, bundle: Bundle, backend: Any, threshold: float | None = None):
        self.bundle = bundle
        self.backend = backend
        self.threshold = bundle.threshold if threshold is None else float(threshold)
        self.score_name = bundle.score_name
        self.max_batch = int(getattr(backend, "max_batch", None) or bundle.max_batch or DEFAULT_MAX_BATCH)

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def provider(self) -> str:
        """The execution provider that actually runs (e.g. CPUExecutionProvider, TensorRT)."""
        return self.backend.provider

    @property
    def precision(self) -> str:
        return self.backend.precision

    @property
    def load_seconds(self) -> float:
        return float(self.backend.load_seconds)

    def read(self, path: str | os.PathLike, slice_index: int | None = None) -> list[ScanImage]:
        """Decode a scan file into 2-D slices with the bundle's windowing (InputError naming the file)."""
        return read_scans(path, slice_index=slice_index, window=self.bundle.spec.window)

    def _to_scan(self, item: PredictInput, slice_index: int | None) -> tuple[ScanImage, float]:
        """One input -> (ScanImage, decode ms). Volumes must resolve to one slice here."""
        if isinstance(item, ScanImage):
            return item, 0.0
        if isinstance(item, np.ndarray):
            return array_to_scan(item, window=self.bundle.spec.window), 0.0
        if isinstance(item, (str, os.PathLike)):
            t0 = time.perf_counter()
            scans = self.read(item, slice_index)
            ms = (time.perf_counter() - t0) * 1e3
            if len(scans) != 1:
                raise InputError(
                    f"{os.fspath(item)}: has {len(scans)} slices; pass slice_index= or use predict_file"
                )
            return scans[0], ms
        raise InputError(
            f"cannot predict on a {type(item).__name__}; pass a path, a numpy array or a ScanImage"
        )

    def predict(self, item: PredictInput, slice_index: int | None = None) -> Prediction:
        """One scan (file path, pixel array or ScanImage) -> Prediction."""
        scan, ms = self._to_scan(item, slice_index)
        return self.predict_scans([scan], [ms])[0]

    def predict_file(self, path: str | os.PathLike, slice_index: int | None = None) -> list[Prediction]:
        """Every slice of a file (one for 2-D images; frames/axial slices for DICOM/NIfTI volumes)."""
        t0 = time.perf_counter()
        scans = self.read(path, slice_index)
        ms = (time.perf_counter() - t0) * 1e3 / len(scans)
        return self.predict_scans(scans, [ms] * len(scans))

    def predict_batch(self, items: Sequence[PredictInput]) -> list[Prediction]:
        """Several inputs -> one Prediction each, run in batches of up to the bundle's max batch."""
        pairs = [self._to_scan(item, None) for item in items]
        return self.predict_scans([s for s, _ in pairs], [ms for _, ms in pairs])

    def predict_scans(
        self, scans: Sequence[ScanImage], decode_ms: Sequence[float] | None = None
    ) -> list[Prediction]:
        """Decoded scans -> Predictions; `decode_ms` (per scan) is recorded in the timings when given."""
        decode = list(decode_ms) if decode_ms is not None else [0.0] * len(scans)
        if len(decode) != len(scans):
            raise ValueError(f"decode_ms has {len(decode)} entries for {len(scans)} scans")
        out: list[Prediction] = []
        for start in range(0, len(scans), self.max_batch):
            chunk = scans[start : start + self.max_batch]
            out.extend(self._run_chunk(chunk, decode[start : start + self.max_batch]))
        return out

    def run_images(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """THE model call of the runtime: preprocessed images [N, 3, S, S] -> `contract.OUTPUT_NAMES` outputs.

        Runs in chunks of at most `max_batch`; the shapes are checked. Used by `predict_*`, madclip-batch's
        scorer, the serving replica and the golden self-test, so there is one way of running the model.
        A backend failure is a BundleError naming the bundle and backend (one line).
        """
        images = np.ascontiguousarray(images, dtype=np.float32)
        step = self.max_batch
        parts = [self._run_backend(images[i : i + step]) for i in range(0, len(images), step)]
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in OUTPUT_NAMES}

    def _run_backend(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        try:
            outputs = self.backend.run(batch)
        except MadclipError:
            raise
        except (
            Exception
        ) as exc:  # onnxruntime / TensorRT runtime failures: one line, naming bundle and backend
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BundleError(
                f"{self.bundle.path}: inference failed on {self.backend_name} ({type(exc).__name__}: {first})"
            ) from None
        self._check_outputs(outputs, len(batch))
        return outputs

    def decision(self, score: float, score_map_max: float) -> str | None:
        """The label of one scan at this predictor's threshold, on its calibration score name."""
        return decide(score if self.score_name == SCORE else score_map_max, self.threshold)

    def _run_chunk(self, scans: Sequence[ScanImage], decode_ms: Sequence[float]) -> list[Prediction]:
        spec = self.bundle.spec
        pre_ms, images = [], []
        for scan in scans:
            t0 = time.perf_counter()
            images.append(preprocess(scan, spec))  # [3, S, S]
            pre_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        outputs = self.run_images(np.stack(images))  # [B, 3, S, S] -> outputs
        infer_ms = (time.perf_counter() - t0) * 1e3 / len(scans)
        preds = []
        for i, scan in enumerate(scans):
            t0 = time.perf_counter()
            model_map = np.asarray(outputs[ANOMALY_MAP][i, 0], dtype=np.float32)  # [S, S]
            native = resize_map(model_map, scan.height, scan.width)  # [H, W]
            score, smax = float(outputs[SCORE][i]), float(outputs[SCORE_MAP_MAX][i])
            label = self.decision(score, smax)
            post_ms = (time.perf_counter() - t0) * 1e3
            timings = {
                "decode": float(decode_ms[i]),
                "preprocess": pre_ms[i],
                "inference": infer_ms,
                "postprocess": post_ms,
            }
            preds.append(
                Prediction(
                    scan.source,
                    score,
                    smax,
                    label,
                    self.threshold,
                    self.score_name,
                    native,
                    model_map,
                    timings,
                )
            )
        return preds

    def _check_outputs(self, outputs: dict[str, np.ndarray], n: int) -> None:
        missing = [k for k in OUTPUT_NAMES if k not in outputs]
        if missing:
            raise InputError(
                f"{self.bundle.path}: the model did not return {', '.join(missing)} "
                f"(it returned {', '.join(outputs)})"
            )
        s = self.bundle.image_size
        if outputs[ANOMALY_MAP].shape != (n, 1, s, s) or outputs[SCORE].shape != (n,):
            raise InputError(
                f"{self.bundle.path}: model output shapes {outputs[SCORE].shape} / "
                f"{outputs[ANOMALY_MAP].shape}, expected ({n},) / ({n}, 1, {s}, {s})"
            )

    def record(self, pred: Prediction) -> dict[str, Any]:
        """`pred.record()` with this predictor's backend, provider and precision."""
        return pred.record(backend=self.backend_name, provider=self.provider, precision=self.precision)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Predictor({self.bundle.path}, backend={self.backend_name}, provider={self.provider}, "
            f"precision={self.precision}, threshold={self.threshold})"
        )


def check_threshold(threshold: Any, bundle: Bundle | None = None) -> float | None:
    """THE threshold rule of the CLI, the API and the HTTP wire: None, or a finite number within the bundle's
    range of its calibration score (outside it every scan gets the same label). InputError with one line."""
    if threshold is None:
        return None
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise InputError(f"threshold must be a number, got {threshold!r}") from None
    if not np.isfinite(value):
        raise InputError(f"threshold must be a finite number, got {threshold}")
    if bundle is not None:
        lo, hi = bundle.output_range(bundle.score_name)
        if not lo <= value <= hi:
            raise InputError(
                f"threshold {value:g} is outside the {bundle.score_name} range [{lo:g}, {hi:g}] "
                f"of {bundle.path}: every scan would get the same label"
            )
    return value


def model_sha256(bundle: Bundle, precision: str, backend: str | None = None) -> str | None:
    """The content id of a model variant (graph + external data, or OpenVINO IR .xml + .bin) from the
    metadata's sha256s, so engine caches are keyed by the weights without hashing the files again
    (`trt_rules.content_id`)."""
    files = bundle.meta["files"]
    if backend == OPENVINO and precision in bundle.openvino_models:
        rel = bundle.openvino_models[precision]
        parts = [(files.get(r) or {}).get("sha256") for r in (rel, openvino_weights(rel))]
        return content_id(parts) if all(isinstance(p, str) for p in parts) else None
    rel = bundle.meta["models"].get(RUNTIME_PRECISION_OF.get(precision, precision))
    info = files.get(rel) if rel else None
    if not info:
        return None
    data = files.get(rel + ".data")  # external weights, when the graph has them
    parts = [info.get("sha256")] + ([data.get("sha256")] if data else [])
    return content_id(parts) if all(isinstance(p, str) for p in parts) else None


def load(
    bundle: str | os.PathLike | Bundle,
    backend: str = "auto",
    precision: str = FP32,
    threshold: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    verify: str | bool = "model",
    trusted_key: Any = None,
) -> Predictor:
    """Open a bundle (verified per `verify`, see `madclip_runtime.bundles.bundle`) on `backend` at `precision`.

    backend "auto" picks the fastest available (trt > ort-trt > ort-cuda > openvino > ort-cpu; see
    `backends.resolve_auto` for the CPU rule between openvino and ort-cpu).
    `threshold` overrides the bundle's calibrated threshold. `cache_dir` holds TensorRT engines.
    `trusted_key` (path to an Ed25519 public key PEM, raw key bytes or a key object): refuse a bundle that is
    unsigned or signed by another key. Every metadata field is checked against the bundle's integrity record
    and validated before any model file is opened (`madclip_runtime.bundles.bundle.load_bundle`).
    """
    check_threshold(threshold)
    if isinstance(bundle, Bundle):
        b = bundle
        if trusted_key is not None:  # re-check the signature of an already loaded bundle against this key
            from .bundles.signing import verify_signature

            verify_signature(b.meta, b.metadata_path, trusted_key)
    else:
        b = load_bundle(bundle, verify=verify, precision=precision, trusted_key=trusted_key)
    check_threshold(threshold, b)
    name = resolve_auto(precision, INT8 in b.openvino_models) if backend == "auto" else backend
    model_path = b.model_path(precision, name)
    if name == ORT_CPU and precision == FP16 and backend != "auto":
        log.warning("running the fp16 model on the CPU: FP16 on a CPU is slower than FP32 (use fp32 or int8)")
    s = b.image_size
    be = create_backend(
        name,
        model_path,
        precision,
        b.max_batch or DEFAULT_MAX_BATCH,
        None if cache_dir is None else os.fspath(cache_dir),
        onnx_sha256=model_sha256(b, precision, name),
        input_chw=(3, s, s),
        fp32_islands=b.fp32_islands,
    )
    return Predictor(b, be, threshold=threshold)
