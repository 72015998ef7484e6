"""The one validation of a bundle's metadata.json: types, finiteness and ranges of every value.

`validate_metadata(meta, where)` runs in `load_bundle` (after the integrity check, before any model file is
opened) and in `write_metadata` (so the exporter cannot write what the reader refuses). Each failure is one
BundleError line naming the field, e.g. ``metadata.json: calibration.threshold: must be a finite number in
[0, 4], got nan``. Why so strict: a NaN threshold labels every scan "normal" (``score >= nan`` is false), a
negative one labels every scan "anomaly", and both would otherwise pass silently with exit code 0.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from ..contract import (
    ANOMALY_MAP,
    OPENVINO_MODEL_FILES,
    OPENVINO_WEIGHTS_SUFFIX,
    OUTPUT_NAMES,
    PRECISIONS,
    SCORE,
    SCORE_MAP_MAX,
    SCORE_NAMES,
)
from ..errors import BundleError

SCHEMA_VERSION = 2
INTERPOLATIONS = ("bicubic", "bilinear")
NORMALIZE_MODES = ("none", "clip")
WINDOW_MODES = ("auto", "minmax", "full")
# What madclip-export really writes: the dynamo exporter's native opset is 18; it up-converts to newer opsets,
# and cannot write older ones (it silently writes 18). 21 is the newest that onnxruntime >= 1.18 and
# TensorRT 10 both parse.
OPSET_MIN, OPSET_MAX = 18, 21
# What a bundle's metadata may declare: any opset onnxruntime runs (a graph written by other tools may be older).
OPSET_READ_MIN, OPSET_READ_MAX = 7, 30
IMAGE_SIZE_MIN, IMAGE_SIZE_MAX = 8, 4096
MAX_BATCH_MAX = 4096
N_LAYERS_MAX = 64
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _fail(where: str, field: str, problem: str) -> BundleError:
    return BundleError(f"{where}: {field}: {problem}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(where: str, field: str, v: Any, lo: int, hi: int) -> int:
    if not _is_int(v) or not lo <= v <= hi:
        raise _fail(where, field, f"must be an integer in [{lo}, {hi}], got {_show(v)}")
    return v


def _finite(where: str, field: str, v: Any, lo: float | None = None, hi: float | None = None) -> float:
    ok = _is_number(v) and math.isfinite(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
    if not ok:
        span = (
            f" in [{lo:g}, {hi:g}]"
            if lo is not None and hi is not None
            else (f" >= {lo:g}" if lo is not None else "")
        )
        raise _fail(where, field, f"must be a finite number{span}, got {_show(v)}")
    return float(v)


def _choice(where: str, field: str, v: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v not in allowed:
        raise _fail(where, field, f"must be one of {', '.join(allowed)}, got {_show(v)}")
    return v


def _str(where: str, field: str, v: Any) -> str:
    if not isinstance(v, str):
        raise _fail(where, field, f"must be a string, got {_show(v)}")
    return v


def _obj(where: str, field: str, v: Any) -> dict:
    if not isinstance(v, dict):
        raise _fail(where, field, f"must be a JSON object, got {_show(v)}")
    return v


def _pair(
    where: str, field: str, v: Any, lo: float | None = None, hi: float | None = None
) -> tuple[float, float]:
    """[a, b] of finite numbers with a < b."""
    if not isinstance(v, list) or len(v) != 2:
        raise _fail(where, field, f"must be a list [low, high], got {_show(v)}")
    a = _finite(where, f"{field}[0]", v[0], lo, hi)
    b = _finite(where, f"{field}[1]", v[1], lo, hi)
    if not a < b:
        raise _fail(where, field, f"low must be below high, got {_show(v)}")
    return a, b


def _relpath(where: str, field: str, rel: Any) -> str:
    if (
        not isinstance(rel, str)
        or not rel
        or os.path.isabs(rel)
        or rel.startswith(("/", "\\"))
        or ".." in rel.replace("\\", "/").split("/")
        or any(ord(c) < 32 for c in rel)
    ):
        raise _fail(where, field, f"must be a relative path inside the bundle, got {_show(rel)}")
    return rel


def _preprocess(where: str, p: Any) -> int:
    p = _obj(where, "preprocess", p)
    known = {
        "image_size",
        "interpolation",
        "channels",
        "value_range",
        "normalize",
        "mean",
        "std",
        "window",
        "mask_threshold",
    }
    for key in p:
        if key not in known:
            raise _fail(where, f"preprocess.{key}", "unknown preprocessing key")
    size = _int(where, "preprocess.image_size", p.get("image_size"), IMAGE_SIZE_MIN, IMAGE_SIZE_MAX)
    _choice(where, "preprocess.interpolation", p.get("interpolation", "bicubic"), INTERPOLATIONS)
    _choice(where, "preprocess.channels", p.get("channels", "rgb_replicate_grey"), ("rgb_replicate_grey",))
    lo, hi = _pair(where, "preprocess.value_range", p.get("value_range", [0.0, 1.0]))
    if (lo, hi) != (0.0, 1.0):
        raise _fail(
            where,
            "preprocess.value_range",
            f"must be [0, 1] (the only range madclip produces), got {[lo, hi]}",
        )
    _choice(where, "preprocess.normalize", p.get("normalize", "none"), NORMALIZE_MODES)
    for key, low in (("mean", -10.0), ("std", 1e-6)):
        v = p.get(key, [0.5, 0.5, 0.5])
        if not isinstance(v, list) or len(v) != 3:
            raise _fail(where, f"preprocess.{key}", f"must be a list of 3 numbers, got {_show(v)}")
        for i, x in enumerate(v):
            _finite(where, f"preprocess.{key}[{i}]", x, low, 10.0)
    _choice(where, "preprocess.window", p.get("window", "auto"), WINDOW_MODES)
    _finite(where, "preprocess.mask_threshold", p.get("mask_threshold", 0.5), 0.0, 1.0)
    return size


def _io(where: str, meta: dict, size: int) -> dict[str, tuple[float, float]]:
    """Check `input` and `outputs`; returns each output's declared range (default [0, 4], MadCLIP's)."""
    ranges = {name: (0.0, 4.0) for name in OUTPUT_NAMES}
    if "input" in meta:
        inp = _obj(where, "input", meta["input"])
        _str(where, "input.name", inp.get("name"))
        _choice(where, "input.dtype", inp.get("dtype"), ("float32",))
        shape = inp.get("shape")
        if not isinstance(shape, list) or len(shape) != 4 or shape[1:] != [3, size, size]:
            raise _fail(
                where,
                "input.shape",
                f"must be [batch, 3, {size}, {size}] (preprocess.image_size {size}), got {_show(shape)}",
            )
    if "outputs" in meta:
        outs = _obj(where, "outputs", meta["outputs"])
        for name in OUTPUT_NAMES:
            if name not in outs:
                raise _fail(where, f"outputs.{name}", "missing")
            o = _obj(where, f"outputs.{name}", outs[name])
            if not isinstance(o.get("shape"), list):
                raise _fail(where, f"outputs.{name}.shape", f"must be a list, got {_show(o.get('shape'))}")
            ranges[name] = _pair(where, f"outputs.{name}.range", o.get("range"), -1e6, 1e6)
    return ranges


def _calibration(where: str, c: Any, ranges: dict[str, tuple[float, float]]) -> None:
    """Thresholds must lie within the declared range of the output they apply to (else every scan gets one label)."""
    if c is None:
        return
    c = _obj(where, "calibration", c)
    name = _choice(where, "calibration.score_name", c.get("score_name", SCORE), SCORE_NAMES)
    for key, output in (
        ("threshold", name),
        ("threshold_score_map_max", SCORE_MAP_MAX),
        ("map_threshold", ANOMALY_MAP),
    ):
        if c.get(key) is not None:
            _finite(where, f"calibration.{key}", c[key], *ranges[output])
    if "map_scale" in c:
        _pair(where, "calibration.map_scale", c["map_scale"], -1e6, 1e6)
    for key in ("method", "map_threshold_method"):
        if key in c:
            _str(where, f"calibration.{key}", c[key])
    if "n_shots" in c:
        _int(where, "calibration.n_shots", c["n_shots"], 0, 10_000_000)


def _models_and_files(where: str, meta: dict) -> None:
    models = _obj(where, "models", meta.get("models"))
    if not models:
        raise _fail(where, "models", "lists no model")
    for prec, rel in models.items():
        if prec not in PRECISIONS:
            raise _fail(where, f"models.{prec}", f"unknown precision (expected {', '.join(PRECISIONS)})")
        _relpath(where, f"models.{prec}", rel)
    files = _obj(where, "files", meta.get("files"))
    for rel, info in files.items():
        _relpath(where, f"files[{rel!r}]", rel)
        info = _obj(where, f"files[{rel!r}]", info)
        if not isinstance(info.get("sha256"), str) or not _SHA256.match(info["sha256"]):
            raise _fail(
                where,
                f"files[{rel!r}].sha256",
                f"must be 64 lowercase hex digits, got {_show(info.get('sha256'))}",
            )
        _int(where, f"files[{rel!r}].bytes", info.get("bytes"), 0, 2**50)
    for prec, rel in models.items():
        if rel not in files:
            raise _fail(where, f"models.{prec}", f"{rel} is not in the bundle's file list")
    ov_models = _obj(where, "openvino_models", meta.get("openvino_models", {}))
    for prec, rel in ov_models.items():
        if prec not in OPENVINO_MODEL_FILES:
            raise _fail(
                where,
                f"openvino_models.{prec}",
                f"unknown OpenVINO variant (expected {', '.join(OPENVINO_MODEL_FILES)})",
            )
        _relpath(where, f"openvino_models.{prec}", rel)
        if not rel.endswith(".xml"):
            raise _fail(where, f"openvino_models.{prec}", f"must be an OpenVINO IR .xml, got {_show(rel)}")
        for part in (rel, rel[: -len(".xml")] + OPENVINO_WEIGHTS_SUFFIX):
            if part not in files:
                raise _fail(where, f"openvino_models.{prec}", f"{part} is not in the bundle's file list")


def validate_metadata(meta: Any, where: str) -> None:
    """Check every value of a metadata.json (schema_version 2) that the runtime acts on; BundleError naming the field."""
    if not isinstance(meta, dict):
        raise BundleError(f"{where}: expected a JSON object at top level")
    for key in ("schema_version", "intended_use", "preprocess", "models", "files"):
        if key not in meta:
            raise _fail(where, key, "missing")
    if meta["schema_version"] != SCHEMA_VERSION or not _is_int(meta["schema_version"]):
        raise _fail(where, "schema_version", f"must be {SCHEMA_VERSION}, got {_show(meta['schema_version'])}")
    for key in ("madclip_version", "created_utc", "intended_use"):
        if key in meta:
            _str(where, key, meta[key])
    if "n_layers" in meta:
        _int(where, "n_layers", meta["n_layers"], 1, N_LAYERS_MAX)
    if "method" in meta:
        _str(where, "method", meta["method"])
    if "fp32_islands" in meta:
        islands = meta["fp32_islands"]
        if not isinstance(islands, list) or not islands or not all(isinstance(n, str) and n for n in islands):
            raise _fail(
                where,
                "fp32_islands",
                f"must be a non-empty list of graph constant names, got {_show(islands)}",
            )
    size = _preprocess(where, meta["preprocess"])
    ranges = _io(where, meta, size)
    if meta.get("max_batch") is not None:
        _int(where, "max_batch", meta["max_batch"], 1, MAX_BATCH_MAX)
    if "opset" in meta:
        _int(where, "opset", meta["opset"], OPSET_READ_MIN, OPSET_READ_MAX)
    _calibration(where, meta.get("calibration"), ranges)
    if "provenance" in meta:
        _obj(where, "provenance", meta["provenance"])
    _models_and_files(where, meta)
