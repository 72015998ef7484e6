"""Scoring a Volume slice by slice and writing one answer per scan.

Per volume: `<stem>_map.nii.gz` (float32 anomaly map with exactly the geometry in `Volume.shape` and
`Volume.affine`, each slice's map resampled to the slice's native grid by the Predictor), `<stem>_montage.png`
(the most anomalous slices with their overlays), optionally `<stem>_seg.dcm` (see
`madclip_runtime.scans.dicom_seg`), and `<stem>.json` written LAST, so its presence means the set is complete.
Every file is written atomically.

Volume score: the slices' decision scores (the score the bundle's threshold applies to) reduced by "max"
(default: the volume is an anomaly when any slice is) or "mean-top-K" (mean of the K highest, K = 3 when
written "mean-top-k"), then compared with the same threshold.
"""
from __future__ import annotations

import gzip
import importlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from .. import INTENDED_USE
from ..atomic import atomic_save_png, atomic_write_bytes, atomic_write_text
from ..contract import decide
from ..errors import MadclipError
from ..overlay import jsonable, render_overlay
from .volume import Volume

DEFAULT_TOP_K = 3
MONTAGE_SLICES = 6
MONTAGE_TILE = 320  # px: the longer side of each montage tile


@dataclass(frozen=True)
class VolumeScoreMethod:
    name: str  # "max" or "mean-top-K"
    k: int  # slices averaged (1 for max)

    def reduce(self, values: Sequence[float]) -> float:
        v = np.sort(np.asarray(values, dtype=np.float64))[::-1]
        return float(v[0]) if self.name == "max" else float(np.mean(v[: min(self.k, v.size)]))


def parse_volume_score(text: str) -> VolumeScoreMethod:
    """'max' | 'mean-top-k' (K = 3) | 'mean-top-5' ... -> VolumeScoreMethod (MadclipError otherwise)."""
    t = text.strip().lower()
    if t == "max":
        return VolumeScoreMethod("max", 1)
    if t == "mean-top-k":
        return VolumeScoreMethod(f"mean-top-{DEFAULT_TOP_K}", DEFAULT_TOP_K)
    m = re.fullmatch(r"mean-top-(\d+)", t)
    if m and int(m.group(1)) >= 1:
        return VolumeScoreMethod(f"mean-top-{int(m.group(1))}", int(m.group(1)))
    raise MadclipError(f"--volume-score must be 'max', 'mean-top-k' or 'mean-top-N' with N >= 1, got {text!r}")


def score_volume(predictor: Any, volume: Volume, advance: Callable[[int], None] | None = None) -> list[Any]:
    """Predictions for every slice, run in batches of the predictor's max batch (`advance(n)` after each)."""
    preds: list[Any] = []
    step = max(1, int(predictor.max_batch))
    for start in range(0, volume.n_slices, step):
        chunk = volume.slices[start : start + step]
        preds.extend(predictor.predict_scans(chunk))
        if advance is not None:
            advance(len(chunk))
    return preds


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def summarize(volume: Volume, preds: Sequence[Any], method: VolumeScoreMethod, threshold: float | None,
              score_name: str, n_top: int = MONTAGE_SLICES) -> dict[str, Any]:
    """Per-slice scores, the volume score and label, and the most anomalous slices (highest first)."""
    decision = [float(p.decision_score) for p in preds]
    top = [int(i) for i in np.argsort(-np.asarray(decision), kind="stable")[: min(n_top, len(preds))]]
    vscore = method.reduce(decision)
    return {
        "volume_score": _finite(vscore),
        "volume_score_method": method.name,
        "volume_score_of": score_name,
        "label": decide(vscore, threshold),
        "threshold": threshold,
        "top_slices": top,
        "slices": [{"slice": k, "score": _finite(p.score), "score_map_max": _finite(p.score_map_max),
                    "label": p.label, "source": p.source} for k, p in enumerate(preds)],
    }


def nifti_map_bytes(volume: Volume, arr: np.ndarray, scale: tuple[float, float]) -> bytes:
    """The float32 map as gzip'ed NIfTI bytes with the volume's shape and affine (header kept for NIfTI input)."""
    nib = importlib.import_module("nibabel")
    if volume.nifti is not None:
        header = volume.nifti.header.copy()
        cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        img = cls(arr, volume.affine, header=header)
        img.set_qform(volume.affine, code=int(header["qform_code"]) or 1)
        img.set_sform(volume.affine, code=int(header["sform_code"]) or 1)
    else:
        img = nib.Nifti1Image(arr, volume.affine)
        img.set_qform(volume.affine, code=1)  # scanner coordinates, as dcm2niix writes them
        img.set_sform(volume.affine, code=1)
    img.set_data_dtype(np.float32)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = scale  # display range: the bundle's fixed map scale
    img.header["descrip"] = b"madclip anomaly map (research use)"
    img.header.set_xyzt_units("mm")
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def render_montage(volume: Volume, preds: Sequence[Any], top: Sequence[int], scale: tuple[float, float],
                   threshold: float | None, map_threshold: float | None, columns: int = 3) -> Image.Image:
    """The top slices' overlays (fixed colour scale, contour at the map threshold) in a grid, best first."""
    tiles = []
    for k in top:
        p = preds[k]
        tile = render_overlay(volume.slices[k], p.anomaly_map, float(p.decision_score), threshold, p.label,
                              map_threshold, scale, label=f"{volume.name}  slice {k} of {volume.n_slices}")
        f = MONTAGE_TILE / max(tile.size)
        if f < 1.0:
            tile = tile.resize((max(1, round(tile.width * f)), max(1, round(tile.height * f))),
                               Image.Resampling.LANCZOS)
        tiles.append(tile)
    cols = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    cw, ch = max(t.width for t in tiles), max(t.height for t in tiles)
    canvas = Image.new("RGB", (cols * cw + (cols - 1) * 4, rows * ch + (rows - 1) * 4), (0, 0, 0))
    for i, t in enumerate(tiles):
        canvas.paste(t, ((i % cols) * (cw + 4), (i // cols) * (ch + 4)))
    return canvas


def volume_record(volume: Volume, summary: dict[str, Any], predictor: Any) -> dict[str, Any]:
    """The per-volume record (printed with --json, stored in <stem>.json)."""
    return {
        "file": volume.source,
        "kind": volume.kind,
        "series_uid": volume.series_uid,
        "n_slices": volume.n_slices,
        "shape": list(volume.shape),
        "affine": np.round(volume.affine, 6).tolist(),
        **summary,
        "score_name": predictor.score_name,
        "backend": predictor.backend_name,
        "provider": predictor.provider,
        "precision": predictor.precision,
        "warnings": list(volume.warnings),
        "intended_use": INTENDED_USE,
    }


def save_volume_outputs(out_dir: str, stem: str, volume: Volume, preds: Sequence[Any], record: dict[str, Any],
                        scale: tuple[float, float], map_threshold: float | None, map_threshold_method: str | None,
                        seg: Callable[[np.ndarray], bytes] | None = None) -> dict[str, str]:
    """Write the map, the montage, the SEG (when `seg` builds one from the map) and the JSON last."""
    if not stem or "/" in stem or os.sep in stem:
        raise ValueError(f"stem must be a plain file-name stem, got {stem!r}")
    os.makedirs(out_dir, exist_ok=True)
    arr = volume.map_array([p.anomaly_map for p in preds])  # float32, volume.shape
    paths = {"map": os.path.join(out_dir, f"{stem}_map.nii.gz"),
             "montage": os.path.join(out_dir, f"{stem}_montage.png")}
    atomic_write_bytes(paths["map"], nifti_map_bytes(volume, arr, scale))
    atomic_save_png(paths["montage"], render_montage(volume, preds, record["top_slices"], scale,
                                                     record["threshold"], map_threshold), optimize=True)
    if seg is not None:
        paths["seg"] = os.path.join(out_dir, f"{stem}_seg.dcm")
        atomic_write_bytes(paths["seg"], seg(arr))
    doc = dict(record)
    doc.update(
        map_file=os.path.basename(paths["map"]),
        map_encoding="float32 NIfTI, raw anomaly map values; same shape and affine as the input volume",
        map_scale=list(scale),
        map_threshold=map_threshold,
        map_threshold_method=map_threshold_method,
        montage_file=os.path.basename(paths["montage"]),
        seg_file=os.path.basename(paths["seg"]) if "seg" in paths else None,
    )
    paths["json"] = os.path.join(out_dir, f"{stem}.json")
    atomic_write_text(paths["json"], json.dumps(jsonable(doc), indent=2, allow_nan=False) + "\n")
    return paths
