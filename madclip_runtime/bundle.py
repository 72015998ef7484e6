"""The bundle format: the ONE reader (and the metadata writer) for what madclip-export produces.

A bundle is a directory (written atomically, see `madclip_runtime.atomic.AtomicDirectory`):

    metadata.json        this schema (below)
    model.onnx           FP32 graph (+ `model.onnx.data` when weights are external)
    model_fp16.onnx      FP16 graph with FP32 islands (optional)
    model_int8.onnx      dynamic INT8 graph for CPUs (optional)
    golden.npz           a few preprocessed inputs and the FP32 reference outputs (for --selftest)
    export_report.json   parity figures per variant

metadata.json keys (schema_version 1):

    schema_version   int, 1
    madclip_version  str, version of the madclip that wrote the bundle
    created_utc      str, ISO 8601 UTC time of writing
    intended_use     "research use, not for clinical decisions"
    preprocess       PreprocessSpec.to_dict(): image size, interpolation, channels, value range, normalisation,
                     intensity windowing for 16-bit/DICOM sources
    input            {"name": "image", "dtype": "float32", "shape": ["batch", 3, S, S]}
    outputs          {"score": {"shape": ["batch"], "range": [0, L], "meaning": ...},
                      "anomaly_map": {"shape": ["batch", 1, S, S], "range": [0, L], "meaning": ...},
                      "score_map_max": {"shape": ["batch"], "range": [0, L], "meaning": ...}}
                     ranges and meanings are the method's (MadCLIP: [0, 4], sums of 4 probabilities).
    max_batch        int, the largest batch the graphs/engines are built for (null: no limit)
    opset            int, ONNX opset of the graphs
    method           str, the method the graph was exported from ("madclip", ...; absent = "madclip")
    calibration      {"threshold": float|null, "score_name": "score"|"score_map_max",
                      "method": how the threshold was chosen (text), "map_threshold": float|null,
                      "map_scale": [0, L]}  (optional: a bundle without it yields scores but no decision)
    provenance       {"backbone", "pretrained", "taps", "objective", "quick_gelu", "causal_prompt_mask",
                      "normalize", "shots", "seed", "run_dir", "versions": {"madclip", "torch", "open_clip",
                      "onnx", ...}}
    models           {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx"}: the
                     variants present. A model's external-data files are named `<model file>.<suffix>`
                     (e.g. `model.onnx.data`) and belong to it for verification.
    files            {relpath: {"sha256": hex, "bytes": int}} for every file in the bundle except
                     metadata.json itself (relpaths use "/").

Verification (`load_bundle(path, verify=...)`):
    True / "all"   size and sha256 of every listed file (hashing a 1.2 GB ViT-L graph takes a few seconds).
    "model"        size of every listed file, sha256 only of the `precision` variant's files and golden.npz.
    False / "none" only that listed files exist. `Bundle.verify()` can check later.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable

from . import INTENDED_USE, __version__
from .atomic import atomic_write_text, sha256_file
from .contract import ANOMALY_MAP, GOLDEN_FILE, METADATA_FILE, MODEL_FILES, PRECISIONS, SCORE, SCORE_NAMES
from .errors import BundleError
from .preprocess import PreprocessSpec

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SUPPORTED_SCHEMAS = {1}
REQUIRED_KEYS = ("schema_version", "intended_use", "preprocess", "models", "files")


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _listed_files(directory: str) -> list[str]:
    """Relative '/'-paths of every file under `directory` except metadata.json, sorted."""
    out = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
            if rel != METADATA_FILE:
                out.append(rel)
    return sorted(out)


def file_checksums(directory: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{relpath: {"sha256", "bytes"}} for every file in `directory` except metadata.json."""
    directory = os.fspath(directory)
    return {
        rel: {"sha256": sha256_file(os.path.join(directory, rel)),
              "bytes": os.path.getsize(os.path.join(directory, rel))}
        for rel in _listed_files(directory)
    }


def write_metadata(directory: str | os.PathLike, meta: dict[str, Any]) -> dict[str, Any]:
    """Checksum every file in `directory`, complete `meta` and write metadata.json atomically.

    Fills schema_version, madclip_version, created_utc and intended_use when absent and always recomputes
    `files`; call it last, after every other file is written. Returns the metadata as written.
    Raises BundleError if the result would not load (e.g. a listed model file missing).
    """
    directory = os.fspath(directory)
    out = dict(meta)
    out.setdefault("schema_version", SCHEMA_VERSION)
    out.setdefault("madclip_version", __version__)
    out.setdefault("created_utc", _utc_now())
    out.setdefault("intended_use", INTENDED_USE)
    out["files"] = file_checksums(directory)
    _validate(out, os.path.join(directory, METADATA_FILE))
    _check_models_listed(out, os.path.join(directory, METADATA_FILE))
    text = json.dumps(out, indent=2, allow_nan=False) + "\n"
    atomic_write_text(os.path.join(directory, METADATA_FILE), text)
    return out


def _validate(meta: Any, where: str) -> None:
    """Structural checks shared by writer and reader; one-line BundleError naming metadata.json."""
    if not isinstance(meta, dict):
        raise BundleError(f"{where}: expected a JSON object at top level")
    if "schema_version" not in meta:
        raise BundleError(f"{where}: missing key 'schema_version'")
    version = meta["schema_version"]
    if isinstance(version, bool) or version not in SUPPORTED_SCHEMAS:
        raise BundleError(f"{where}: unknown schema_version {version} (this madclip reads "
                          f"{', '.join(str(v) for v in sorted(SUPPORTED_SCHEMAS))})")
    for key in REQUIRED_KEYS:
        if key not in meta:
            raise BundleError(f"{where}: missing key {key!r}")
    models, files = meta["models"], meta["files"]
    if not isinstance(models, dict) or not models:
        raise BundleError(f"{where}: 'models' must map precision to model file, got {models!r}")
    for prec, rel in models.items():
        if prec not in PRECISIONS or not isinstance(rel, str):
            raise BundleError(f"{where}: bad models entry {prec!r}: {rel!r} (precisions: {', '.join(PRECISIONS)})")
    if not isinstance(files, dict):
        raise BundleError(f"{where}: 'files' must be an object")
    for rel, info in files.items():
        if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
            raise BundleError(f"{where}: file entry {rel!r} points outside the bundle")
        if not (isinstance(info, dict) and isinstance(info.get("sha256"), str) and isinstance(info.get("bytes"), int)):
            raise BundleError(f"{where}: file entry {rel!r} needs 'sha256' and 'bytes'")
    try:
        PreprocessSpec.from_dict(meta["preprocess"])
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{where}: invalid preprocess spec ({exc})") from None
    calib = meta.get("calibration")
    if calib is not None:
        if not isinstance(calib, dict):
            raise BundleError(f"{where}: 'calibration' must be an object")
        if calib.get("score_name", SCORE) not in SCORE_NAMES:
            raise BundleError(f"{where}: calibration score_name must be 'score' or 'score_map_max', "
                              f"got {calib.get('score_name')!r}")
        for key in ("threshold", "map_threshold"):
            if calib.get(key) is not None and not isinstance(calib[key], (int, float)):
                raise BundleError(f"{where}: calibration {key} must be a number, got {calib[key]!r}")
    shape = (meta.get("input") or {}).get("shape")
    size = int(meta["preprocess"].get("image_size", 0))
    if shape is not None and (len(shape) != 4 or shape[2:] != [size, size]):
        raise BundleError(f"{where}: input shape {shape} does not match preprocess image_size {size}")


def _check_models_listed(meta: dict[str, Any], where: str) -> None:
    for prec, rel in meta["models"].items():
        if rel not in meta["files"]:
            raise BundleError(f"{where}: {prec} model {rel} is not in the bundle's file list")


def model_files(meta: dict[str, Any], precision: str) -> list[str]:
    """The listed files of one model variant: the graph and its external data (`<model file>.*`)."""
    rel = meta["models"][precision]
    return [f for f in meta["files"] if f == rel or f.startswith(rel + ".")]


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle. Build with `load_bundle`."""

    path: str
    meta: dict[str, Any]
    spec: PreprocessSpec

    @property
    def metadata_path(self) -> str:
        return os.path.join(self.path, METADATA_FILE)

    @property
    def calibration(self) -> dict[str, Any]:
        return dict(self.meta.get("calibration") or {})

    @property
    def method(self) -> str:
        """The method the bundle was exported from (bundles written before methods were recorded: MadCLIP)."""
        return str(self.meta.get("method", "madclip"))

    @property
    def threshold(self) -> float | None:
        """Calibrated decision threshold on `score_name`, or None when the bundle has none."""
        t = self.calibration.get("threshold")
        return None if t is None else float(t)

    @property
    def score_name(self) -> str:
        """Which output the threshold applies to: "score" (AC) or "score_map_max" (max of AS)."""
        return str(self.calibration.get("score_name", SCORE))

    @property
    def map_threshold(self) -> float | None:
        t = self.calibration.get("map_threshold")
        return None if t is None else float(t)

    @property
    def map_scale(self) -> tuple[float, float]:
        """The fixed value range for colouring and 16-bit encoding of anomaly maps: the calibration's map_scale,
        else the anomaly_map output's range (MadCLIP: [0, 4], a sum of 4 probabilities)."""
        default = ((self.meta.get("outputs") or {}).get(ANOMALY_MAP) or {}).get("range", (0.0, 4.0))
        lo, hi = self.calibration.get("map_scale", default)
        return float(lo), float(hi)

    @property
    def max_batch(self) -> int | None:
        m = self.meta.get("max_batch")
        return None if m is None else int(m)

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    @property
    def precisions(self) -> tuple[str, ...]:
        """Model variants present, in PRECISIONS order."""
        return tuple(p for p in PRECISIONS if p in self.meta["models"])

    def model_path(self, precision: str = "fp32") -> str:
        """Absolute path of a model variant; BundleError if the bundle does not have it."""
        models = self.meta["models"]
        if precision not in models:
            wanted = MODEL_FILES.get(precision, precision)
            raise BundleError(f"{self.path}: no {precision} model ({wanted}) in this bundle "
                              f"(has {', '.join(self.precisions)})")
        path = os.path.join(self.path, models[precision])
        if not os.path.isfile(path):
            raise BundleError(f"{path}: missing (listed in {METADATA_FILE})")
        return path

    @property
    def has_golden(self) -> bool:
        return GOLDEN_FILE in self.meta["files"]

    @property
    def golden_path(self) -> str:
        """Absolute path of golden.npz; BundleError if the bundle has none."""
        if not self.has_golden:
            raise BundleError(f"{self.path}: no {GOLDEN_FILE} in this bundle (needed for --selftest)")
        return os.path.join(self.path, GOLDEN_FILE)

    def verify(self, which: str | bool = "all", precision: str | None = None) -> None:
        """Check listed files: "all" (sizes and sha256 of all), "model" (sha256 of `precision`'s files and
        golden.npz, sizes of all), "none" (existence only). BundleError names the first bad file."""
        _verify_files(self.path, self.meta, which, precision)


def _verify_files(path: str, meta: dict[str, Any], which: str | bool, precision: str | None) -> None:
    mode = {True: "all", False: "none"}.get(which, which) if isinstance(which, bool) else which
    if mode not in ("all", "model", "none"):
        raise ValueError(f"verify must be True/False, 'all', 'model' or 'none', got {which!r}")
    files: dict[str, dict[str, Any]] = meta["files"]
    if mode == "model":
        if precision is None:
            raise ValueError("verify='model' needs a precision")
        if precision not in meta["models"]:
            raise BundleError(f"{path}: no {precision} model in this bundle "
                              f"(has {', '.join(p for p in PRECISIONS if p in meta['models'])})")
        hashed: Iterable[str] = set(model_files(meta, precision)) | ({GOLDEN_FILE} & set(files))
    elif mode == "all":
        hashed = set(files)
    else:
        hashed = set()
    for rel in sorted(files):
        info = files[rel]
        full = os.path.join(path, *rel.split("/"))
        if not os.path.isfile(full):
            raise BundleError(f"{full}: missing (listed in {METADATA_FILE})")
        if mode == "none":
            continue
        size = os.path.getsize(full)
        if size != info["bytes"]:
            raise BundleError(f"{path}: tampered or corrupt: {rel} size mismatch "
                              f"(expected {info['bytes']} bytes, found {size})")
        if rel in hashed and sha256_file(full) != info["sha256"]:
            raise BundleError(f"{path}: tampered or corrupt: {rel} sha256 mismatch")
    log.debug("bundle %s verified (%s)", path, mode)


def load_bundle(path: str | os.PathLike, verify: str | bool = True, precision: str | None = None) -> Bundle:
    """Read and check a bundle directory. See the module docstring for the `verify` modes."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        what = "not a directory" if os.path.exists(path) else "no such bundle directory"
        raise BundleError(f"{path}: {what}")
    meta_path = os.path.join(path, METADATA_FILE)
    if not os.path.isfile(meta_path):
        raise BundleError(f"{meta_path}: missing (not a madclip bundle?)")
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BundleError(f"{meta_path}: not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{meta_path}: invalid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    _validate(meta, meta_path)
    _check_models_listed(meta, meta_path)
    if meta.get("intended_use") != INTENDED_USE:
        log.warning("%s: unexpected intended_use %r", meta_path, meta.get("intended_use"))
    _verify_files(path, meta, verify, precision)
    return Bundle(path=path, meta=meta, spec=PreprocessSpec.from_dict(meta["preprocess"]))
