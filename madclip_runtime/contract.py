"""The one I/O contract between exporter, bundle, backends and callers: names, shapes, meaning, files, decisions.

Every method's exported graph has the same contract: one input `image` float32 [batch, 3, S, S] (the output of
the one preprocessing with the bundle's spec) and three outputs:

    score          [batch]            the method's image anomaly score
    anomaly_map    [batch, 1, S, S]   the pixel anomaly map at the model's resolution
    score_map_max  [batch]            max of anomaly_map per image

Their ranges and meanings are the method's and are recorded in the bundle's metadata (`io_metadata`). A bundle
is a directory of the files named here; a decision is `decide(value, threshold)` everywhere.
"""

from __future__ import annotations

import math
from typing import Any

INPUT_NAME = "image"
SCORE, ANOMALY_MAP, SCORE_MAP_MAX = "score", "anomaly_map", "score_map_max"
OUTPUT_NAMES = (SCORE, ANOMALY_MAP, SCORE_MAP_MAX)
SCORE_NAMES = (SCORE, SCORE_MAP_MAX)  # what a calibrated threshold may apply to

# bf16: the FP32 graph run with OpenVINO's BF16 inference precision (no file of its own)
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
OPENVINO = "openvino"  # OpenVINO on x86 CPUs: fp32, bf16 (AVX512-BF16 / AMX) and NNCF static int8
BACKENDS = ("trt", "ort-trt", "ort-cuda", OPENVINO, "ort-cpu")  # fastest first: the "auto" preference order
OPENVINO_PRECISIONS = ("fp32", "bf16", "int8")

METADATA_FILE = "metadata.json"
GOLDEN_FILE = "golden.npz"
REPORT_FILE = "export_report.json"
MODEL_FILES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx"}
# Precisions without a file of their own run another variant's graph with a runtime precision hint.
RUNTIME_PRECISION_OF = {"bf16": "fp32"}
# OpenVINO IR variants (metadata.json `openvino_models`): the graph .xml and its weights .bin beside it.
OPENVINO_MODEL_FILES = {"int8": "model_int8_ov.xml"}
OPENVINO_WEIGHTS_SUFFIX = ".bin"
# golden.npz: preprocessed inputs, their labels and source names, and the FP32 reference of every output
GOLDEN_INPUT, GOLDEN_LABELS, GOLDEN_SOURCES = INPUT_NAME, "labels", "sources"
# ... and the decisions the exported calibration made on that reference (checked by --selftest)
GOLDEN_DECISIONS, GOLDEN_DECISION_THRESHOLD, GOLDEN_DECISION_SCORE_NAME = (
    "decisions",
    "decision_threshold",
    "decision_score_name",
)
GOLDEN_DECISION_KEYS = (GOLDEN_DECISIONS, GOLDEN_DECISION_THRESHOLD, GOLDEN_DECISION_SCORE_NAME)

# One name each for code that means one precision or backend (the tuples above list them all).
FP32, FP16, INT8 = "fp32", "fp16", "int8"
BF16 = "bf16"  # training autocast (madclip-train --precision), and OpenVINO BF16 (no file of its own)
TRT, ORT_TRT, ORT_CUDA, ORT_CPU = "trt", "ort-trt", "ort-cuda", "ort-cpu"

ANOMALY, NORMAL = "anomaly", "normal"


def decide(value: float, threshold: float | None) -> str | None:
    """'anomaly' when value >= threshold, 'normal' below, None without a threshold or for a non-finite value."""
    if threshold is None or not math.isfinite(value) or not math.isfinite(threshold):
        return None
    return ANOMALY if value >= threshold else NORMAL


def io_metadata(
    image_size: int, ranges: dict[str, tuple[float, float]], meanings: dict[str, str] | None = None
) -> dict[str, Any]:
    """The `input` and `outputs` entries of metadata.json. `ranges`: {"score": (lo, hi), "anomaly_map": (lo, hi)}."""
    s = int(image_size)
    meanings = meanings or {}
    score_range = [float(v) for v in ranges[SCORE]]
    map_range = [float(v) for v in ranges[ANOMALY_MAP]]
    return {
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", 3, s, s]},
        "outputs": {
            SCORE: {
                "shape": ["batch"],
                "range": score_range,
                "meaning": meanings.get(SCORE, "image anomaly score"),
            },
            ANOMALY_MAP: {
                "shape": ["batch", 1, s, s],
                "range": map_range,
                "meaning": f"{meanings.get(ANOMALY_MAP, 'pixel anomaly map')} at {s}x{s}",
            },
            SCORE_MAP_MAX: {
                "shape": ["batch"],
                "range": map_range,
                "meaning": "max of anomaly_map per image (the reference's image score on datasets "
                "with masks)",
            },
        },
    }


# Per-volume output files of madclip-infer --out (madclip_runtime.scans.volume_output.output_names), and the
# DICOM SEG suffix that a 2-D DICOM also gets with --dicom-seg. `<stem>.json` is written last in every set.
VOLUME_MAP_SUFFIX = "_map.nii.gz"
VOLUME_MONTAGE_SUFFIX = "_montage.png"
DICOM_SEG_SUFFIX = "_seg.dcm"
VOLUME_OUTPUT_SUFFIXES = (VOLUME_MAP_SUFFIX, VOLUME_MONTAGE_SUFFIX, DICOM_SEG_SUFFIX)
