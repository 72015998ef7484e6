"""The bundle format: the ONE reader (and the metadata writer) for what madclip-export produces.

A bundle is a directory (written atomically, see `madclip_runtime.atomic.AtomicDirectory`):

    metadata.json        this schema (below)
    model.onnx           FP32 graph (+ `model.onnx.data` when weights are external)
    model_fp16.onnx      FP16 graph with FP32 islands (optional)
    model_int8.onnx      dynamic INT8 graph for CPUs (optional)
    model_int8_ov.xml    NNCF static INT8 OpenVINO IR (+ model_int8_ov.bin; optional, `openvino_models`)
    golden.npz           a few preprocessed inputs and the FP32 reference outputs (for --selftest)
    export_report.json   parity figures per variant

metadata.json keys (schema_version 2):

    schema_version   int, 2 (bundles of schema 1 predate tamper-evident metadata and are refused: re-export)
    madclip_version  str, version of the madclip that wrote the bundle
    created_utc      str, ISO 8601 UTC time of writing
    intended_use     "research use, not for clinical decisions"
    preprocess       PreprocessSpec.to_dict(): image size, interpolation, channels, value range, normalisation,
                     intensity windowing for 16-bit/DICOM sources
    input            {"name": "image", "dtype": "float32", "shape": ["batch", 3, S, S]}
    outputs          {"score": {"shape": ["batch"], "range": [0, L], "meaning": ...},
                      `anomaly_map`: {"shape": ["batch", 1, S, S], "range": [0, L], "meaning": ...},
                      `score_map_max`: {"shape": ["batch"], "range": [0, L], "meaning": ...}}
                     ranges and meanings are the method's (MadCLIP: [0, 4], sums of 4 probabilities).
    max_batch        int, the largest batch the graphs/engines are built for (null: no limit)
    opset            int, ONNX opset of the graphs
    method           str, the method the graph was exported from ("madclip", ...; absent = "madclip")
    calibration      {"threshold": float|null, "score_name": `score`|`score_map_max`,
                      "method": how the threshold was chosen (text), "map_threshold": float|null,
                      "map_scale": [0, L]}  (optional: a bundle without it yields scores but no decision)
    provenance       {"backbone", "pretrained", "taps", "objective", "quick_gelu", "causal_prompt_mask",
                      "normalize", "shots", "seed", "run_dir", "versions": {"madclip", "torch", "open_clip",
                      "onnx", ...}}
    models           {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx"}: the
                     variants present. A model's external-data files are named `<model file>.<suffix>`
                     (e.g. `model.onnx.data`) and belong to it for verification. bf16 has no file: it is
                     the fp32 graph run with OpenVINO's BF16 inference precision.
    openvino_models  {"int8": "model_int8_ov.xml"} (optional): OpenVINO IR variants; the weights file is the
                     .xml's sibling `.bin`, listed in `files` and hashed with it.
    openvino_int8    {"tool", "calibration_images", "ignored_scope_nodes", "fp32_islands", ...} (optional):
                     how the IR was quantized.
    files            {relpath: {"sha256": hex, "bytes": int}} for every file in the bundle except
                     metadata.json itself (relpaths use "/").
    integrity        per-field sha256 digests of everything above (`madclip_runtime.bundles.integrity`): an edited
                     value is refused by name.
    signature        optional Ed25519 signature over everything else (`madclip_runtime.bundles.signing`).

Every value is validated at load (`madclip_runtime.bundles.metadata_schema.validate_metadata`: types, finiteness,
ranges), after the integrity and signature checks and before any model file is opened.

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

from .. import INTENDED_USE, __version__
from ..atomic import atomic_write_text, sha256_file
from ..contract import (
    ANOMALY_MAP,
    FP32,
    GOLDEN_FILE,
    METADATA_FILE,
    MODEL_FILES,
    OPENVINO,
    OPENVINO_MODEL_FILES,
    OPENVINO_WEIGHTS_SUFFIX,
    PRECISIONS,
    RUNTIME_PRECISION_OF,
    SCORE,
)
from ..errors import BundleError
from ..preprocess import PreprocessSpec
from . import integrity
from .metadata_schema import SCHEMA_VERSION, validate_metadata

log = logging.getLogger(__name__)

SUPPORTED_SCHEMAS = {SCHEMA_VERSION}


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
        rel: {
            "sha256": sha256_file(os.path.join(directory, rel)),
            "bytes": os.path.getsize(os.path.join(directory, rel)),
        }
        for rel in _listed_files(directory)
    }


def write_metadata(
    directory: str | os.PathLike, meta: dict[str, Any], signing_key: Any = None
) -> dict[str, Any]:
    """Checksum every file in `directory`, complete, validate, seal (and sign) `meta`, write metadata.json atomically.

    Fills schema_version, madclip_version, created_utc and intended_use when absent and always recomputes
    `files`; call it last, after every other file is written. `signing_key`: an Ed25519 private key object
    (`madclip_runtime.bundles.signing.load_private_key`). Returns the metadata as written.
    Raises BundleError if the result would not load (e.g. a NaN threshold, a listed model file missing).
    """
    directory = os.fspath(directory)
    out = {k: v for k, v in meta.items() if k not in integrity.UNSEALED_KEYS}
    out.setdefault("schema_version", SCHEMA_VERSION)
    out.setdefault("madclip_version", __version__)
    out.setdefault("created_utc", _utc_now())
    out.setdefault("intended_use", INTENDED_USE)
    out["files"] = file_checksums(directory)
    out = json.loads(
        json.dumps(out)
    )  # exactly what the reader will see (tuples -> lists); NaN kept to be refused
    validate_metadata(out, os.path.join(directory, METADATA_FILE))
    out = integrity.seal(out)
    if signing_key is not None:
        from .signing import sign_metadata

        out = sign_metadata(out, signing_key)
    text = json.dumps(out, indent=2, allow_nan=False) + "\n"
    atomic_write_text(os.path.join(directory, METADATA_FILE), text)
    return out


def _check_schema_version(meta: Any, where: str) -> None:
    """Refuse other schema versions first, with a message that says what to do."""
    if not isinstance(meta, dict):
        raise BundleError(f"{where}: expected a JSON object at top level")
    if "schema_version" not in meta:
        raise BundleError(f"{where}: schema_version: missing (not a madclip bundle?)")
    version = meta["schema_version"]
    if version == 1 and not isinstance(version, bool):
        # Safe choice: a schema-1 bundle's metadata (threshold, preprocessing) is not covered by any integrity
        # check, so it could have been edited unnoticed; accepting it with a warning would serve unverified
        # decisions. Re-exporting the run takes minutes and yields a verifiable bundle.
        raise BundleError(
            f"{where}: schema_version 1 bundle: its metadata is not tamper-evident (written by an "
            f"older madclip); re-export the run with madclip-export"
        )
    if isinstance(version, bool) or version not in SUPPORTED_SCHEMAS:
        raise BundleError(
            f"{where}: unknown schema_version {version!r} (this madclip reads "
            f"{', '.join(str(v) for v in sorted(SUPPORTED_SCHEMAS))})"
        )


def openvino_weights(xml_rel: str) -> str:
    """The .bin beside an OpenVINO IR .xml (relative path)."""
    return xml_rel[: -len(".xml")] + OPENVINO_WEIGHTS_SUFFIX if xml_rel.endswith(".xml") else xml_rel


def model_files(meta: dict[str, Any], precision: str) -> list[str]:
    """The listed files of one model variant: the graph and its external data (`<model file>.*`); for a
    precision that runs another variant's graph (bf16: fp32) that variant's files; plus the precision's
    OpenVINO IR (.xml and .bin) when the bundle has one."""
    rel = meta["models"].get(RUNTIME_PRECISION_OF.get(precision, precision))
    out = [f for f in meta["files"] if rel is not None and (f == rel or f.startswith(rel + "."))]
    ov_rel = (meta.get("openvino_models") or {}).get(precision)
    if ov_rel:
        out += [f for f in (ov_rel, openvino_weights(ov_rel)) if f in meta["files"]]
    return out


# Bundles written before the metadata recorded "fp32_islands" all hold MadCLIP's graph, whose FP32 tail starts
# at the baked text difference `dt`; newer bundles name their method's constants.
PRE_METHOD_FP32_ISLANDS = ("dt",)


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

    def output_range(self, name: str) -> tuple[float, float]:
        """The declared value range of an output (validated at load), default [0, 4] (MadCLIP)."""
        lo, hi = ((self.meta.get("outputs") or {}).get(name) or {}).get("range", (0.0, 4.0))
        return float(lo), float(hi)

    @property
    def fp32_islands(self) -> tuple[str, ...]:
        """Graph constants whose consumers start the method's FP32 tail (the metadata's; older bundles:
        `PRE_METHOD_FP32_ISLANDS`); a TensorRT FP16-flag build pins them and everything downstream to FP32."""
        return tuple(self.meta.get("fp32_islands") or PRE_METHOD_FP32_ISLANDS)

    @property
    def threshold(self) -> float | None:
        """Calibrated decision threshold on `score_name`, or None when the bundle has none."""
        t = self.calibration.get("threshold")
        return None if t is None else float(t)

    @property
    def score_name(self) -> str:
        """Which output the threshold applies to: `score` (AC) or `score_map_max` (max of AS)."""
        return str(self.calibration.get("score_name", SCORE))

    @property
    def map_threshold(self) -> float | None:
        t = self.calibration.get("map_threshold")
        return None if t is None else float(t)

    @property
    def map_scale(self) -> tuple[float, float]:
        """The fixed value range for colouring and 16-bit encoding of anomaly maps: the calibration's map_scale,
        else the anomaly_map output's range (MadCLIP: [0, 4], a sum of 4 probabilities)."""
        default = self.output_range(ANOMALY_MAP)
        lo, hi = self.calibration.get("map_scale", default)
        return float(lo), float(hi)

    @property
    def signed_by(self) -> str | None:
        """Key id of the signature (verified at load), or None for an unsigned bundle."""
        sig = self.meta.get("signature")
        if not isinstance(sig, dict):
            return None
        import base64

        from .signing import key_id

        return key_id(base64.b64decode(sig["public_key"]))

    @property
    def max_batch(self) -> int | None:
        m = self.meta.get("max_batch")
        return None if m is None else int(m)

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    @property
    def precisions(self) -> tuple[str, ...]:
        """Model variants present (ONNX or OpenVINO IR files), in PRECISIONS order."""
        return tuple(p for p in PRECISIONS if p in self.meta["models"] or p in self.openvino_models)

    def has_precision(self, precision: str) -> bool:
        """A variant file for `precision`, or the graph it runs with a runtime hint (bf16: the fp32 graph)."""
        return precision in self.precisions or RUNTIME_PRECISION_OF.get(precision) in self.meta["models"]

    @property
    def openvino_models(self) -> dict[str, str]:
        """{precision: IR .xml} of the OpenVINO variants (NNCF INT8)."""
        return dict(self.meta.get("openvino_models") or {})

    def model_path(self, precision: str = FP32, backend: str | None = None) -> str:
        """Absolute path of the graph `backend` runs at `precision` (openvino int8: the NNCF IR; bf16: the
        fp32 graph); BundleError if the bundle does not have it."""
        if backend == OPENVINO and precision in OPENVINO_MODEL_FILES:
            rel = self.openvino_models.get(precision)
            if rel is None:
                wanted = OPENVINO_MODEL_FILES[precision]
                raise BundleError(
                    f"{self.path}: no OpenVINO {precision} model ({wanted}) in "
                    f"this bundle: re-export with --int8 where openvino and nncf are installed"
                )
            path = os.path.join(self.path, rel)
            if not os.path.isfile(path):
                raise BundleError(f"{path}: missing (listed in {METADATA_FILE})")
            return path
        models = self.meta["models"]
        precision = RUNTIME_PRECISION_OF.get(precision, precision)
        if precision not in models:
            wanted = MODEL_FILES.get(precision, precision)
            raise BundleError(
                f"{self.path}: no {precision} model ({wanted}) in this bundle "
                f"(has {', '.join(self.precisions)})"
            )
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
        ov = meta.get("openvino_models") or {}
        if not model_files(meta, precision):
            raise BundleError(
                f"{path}: no {precision} model in this bundle "
                f"(has {', '.join(p for p in PRECISIONS if p in meta['models'] or p in ov)})"
            )
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
            raise BundleError(
                f"{path}: tampered or corrupt: {rel} size mismatch "
                f"(expected {info['bytes']} bytes, found {size})"
            )
        if rel in hashed and sha256_file(full) != info["sha256"]:
            raise BundleError(f"{path}: tampered or corrupt: {rel} sha256 mismatch")
    log.debug("bundle %s verified (%s)", path, mode)


def load_bundle(
    path: str | os.PathLike, verify: str | bool = True, precision: str | None = None, trusted_key: Any = None
) -> Bundle:
    """Read and check a bundle directory. See the module docstring for the `verify` modes.

    Order: schema version, integrity of every metadata field, signature (`trusted_key`: a path to an Ed25519
    public key, raw key bytes or a key object; the bundle must then be signed by it), validation of every
    value, then the files. `trusted_key` needs the sha256 of the model in use, so it upgrades verify "none".
    """
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
        raise BundleError(
            f"{meta_path}: invalid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})"
        ) from None
    _check_schema_version(meta, meta_path)
    integrity.check(meta, meta_path)
    if trusted_key is not None or "signature" in meta:
        from .signing import verify_signature

        verify_signature(meta, meta_path, trusted_key)
    validate_metadata(meta, meta_path)
    if trusted_key is not None and verify in (False, "none"):
        verify = "model" if precision is not None else "all"
    if meta.get("intended_use") != INTENDED_USE:
        log.warning("%s: unexpected intended_use %r", meta_path, meta.get("intended_use"))
    _verify_files(path, meta, verify, precision)
    return Bundle(path=path, meta=meta, spec=PreprocessSpec.from_dict(meta["preprocess"]))
