"""Scoring a Volume slice by slice and writing one answer per scan.

Per volume (names from `output_names`): `<stem>_map.nii.gz` (float32 anomaly map on the map's grid: the
input's own grid for NIfTI and regular DICOM stacks, a resampled regular grid for tilted or unevenly spaced
stacks, see `madclip_runtime.scans.geometry`; qform == sform), `<stem>_montage.png` (the most anomalous
slices with their maps), optionally `<stem>_seg.dcm` (see `madclip_runtime.scans.dicom_seg`), and
`<stem>.json`. All are built in memory first and written together (`write_result_set`), the JSON last, so
its presence means the set is complete; a failure in any part leaves no file of the set.

Volume score: the slices' decision scores (the score the bundle's threshold applies to) reduced by "max"
(default: the volume is an anomaly when any slice is) or "mean-top-K" (mean of the K highest, K = 3 when
written "mean-top-k"), then compared with the same threshold.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import io
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from .. import INTENDED_USE
from ..atomic import atomic_write_bytes, atomic_write_text
from ..contract import (
    DICOM_SEG_SUFFIX,
    SCORE,
    SCORE_MAP_MAX,
    VOLUME_MAP_SUFFIX,
    VOLUME_MONTAGE_SUFFIX,
    decide,
)
from ..errors import MadclipError
from ..outputs import mark_output_dir
from ..overlay import jsonable, render_montage_tiles, verdict_colour
from .volume import Volume

DEFAULT_TOP_K = 3
MONTAGE_SLICES = 6
_FG = (235, 235, 235)
_EMPTY = np.zeros((0, 0), np.float32)


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
    raise MadclipError(
        f"--volume-score must be 'max', 'mean-top-k' or 'mean-top-N' with N >= 1, got {text!r}"
    )


def score_volume(predictor: Any, volume: Volume, advance: Callable[[int], None] | None = None) -> list[Any]:
    """Predictions for every slice, run in batches of the predictor's max batch (`advance(n)` after each)."""
    preds: list[Any] = []
    step = max(1, int(predictor.max_batch))
    for start in range(0, volume.n_slices, step):
        chunk = volume.slices[start : start + step]
        for p in predictor.predict_scans(chunk):  # the model-resolution map is not needed per volume
            preds.append(dataclasses.replace(p, model_map=_EMPTY) if dataclasses.is_dataclass(p) else p)
        if advance is not None:
            advance(len(chunk))
    return preds


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def summarize(
    volume: Volume,
    preds: Sequence[Any],
    method: VolumeScoreMethod,
    threshold: float | None,
    score_name: str,
    n_top: int = MONTAGE_SLICES,
) -> dict[str, Any]:
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
        "slices": [
            {
                "slice": k,
                SCORE: _finite(p.score),
                SCORE_MAP_MAX: _finite(p.score_map_max),
                "label": p.label,
                "source": p.source,
                "position_mm": volume.positions_mm[k] if volume.positions_mm else None,
            }
            for k, p in enumerate(preds)
        ],
    }


def output_names(stem: str) -> dict[str, str]:
    """The file names of one volume's result set (the JSON last); the one place they are spelled."""
    return {
        "map": f"{stem}{VOLUME_MAP_SUFFIX}",
        "montage": f"{stem}{VOLUME_MONTAGE_SUFFIX}",
        "seg": f"{stem}{DICOM_SEG_SUFFIX}",
        "json": f"{stem}.json",
    }


def nifti_map_bytes(
    volume: Volume, arr: np.ndarray, scale: tuple[float, float], affine: np.ndarray | None = None
) -> bytes:
    """The float32 map as gzip'ed NIfTI bytes on the map's grid.

    NIfTI input: the input's header is copied with its qform and sform untouched (same codes, same
    quaternion: NIfTI-2 stays valid), so the map lies on the scan's voxels in every reader, whichever of the
    two it reads. DICOM input: `affine` (orthogonal by construction, see `geometry`) is written as the qform,
    and the sform is set to the qform as stored, so ITK-based readers (qform) and nibabel (sform) agree
    exactly."""
    nib = importlib.import_module("nibabel")
    if volume.nifti is not None:
        header = volume.nifti.header.copy()
        cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        img = cls(arr, None, header=header)
    else:
        img = nib.Nifti1Image(arr, None)
        img.set_qform(volume.affine if affine is None else affine, code=1)  # scanner coordinates, as dcm2niix
        img.set_sform(img.get_qform(), code=1)
    img.set_data_dtype(np.float32)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = scale  # display range: the bundle's fixed map scale
    img.header["descrip"] = b"madclip anomaly map (research use)"
    img.header["intent_code"] = 0
    img.header.set_xyzt_units("mm")
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0) as gz:  # streamed: no raw copy
        img.to_file_map({"image": nib.FileHolder(fileobj=gz), "header": nib.FileHolder(fileobj=gz)})
    return buf.getvalue()


def header_agreement(volume: Volume) -> dict[str, Any]:
    """For NIfTI input: do its qform and sform place the voxels at the same points? (mm, over the corners)"""
    if volume.nifti is None:
        return {"qform_equals_sform": True}
    h = volume.nifti.header
    q, qc = h.get_qform(coded=True)
    s, sc = h.get_sform(coded=True)
    if q is None or s is None:
        return {
            "qform_equals_sform": None,
            "qform_code": int(h["qform_code"]),
            "sform_code": int(h["sform_code"]),
        }
    corners = np.array(
        [
            [i, j, k, 1.0]
            for i in (0, volume.shape[0] - 1)
            for j in (0, volume.shape[1] - 1)
            for k in (0, volume.shape[2] - 1)
        ]
    ).T
    diff = float(np.abs((q - s) @ corners).max())
    return {"qform_equals_sform": diff <= 0.1, "qform_sform_max_difference_mm": round(diff, 4)}


def render_montage(
    volume: Volume,
    preds: Sequence[Any],
    top: Sequence[int],
    scale: tuple[float, float],
    threshold: float | None,
    map_threshold: float | None,
    record: dict[str, Any] | None = None,
    min_side: int = 240,
    columns: int = 3,
) -> Image.Image:
    """The top slices (shown in slice order) at a readable size with their maps, one shared legend."""
    tiles = []
    for k in sorted(top):
        p = preds[k]
        pos = volume.positions_mm[k] if volume.positions_mm else None
        caption = f"slice {k}/{volume.n_slices}" + (f"  {pos:.1f} mm" if pos is not None else "")
        caption += f"  score {float(p.decision_score):.3f}"
        tiles.append((volume.slices[k].pixels, p.anomaly_map, caption, p.label))
    rec = record or {}
    vscore = rec.get("volume_score")
    legend = [
        (f"{volume.name}: {volume.n_slices} slices, {len(tiles)} highest-scoring shown", _FG),
        (f"volume score {vscore:.3f}" if vscore is not None else "volume score n/a", _FG),
    ]
    label = rec.get("label")
    verdict = {"anomaly": "ANOMALY", "normal": "normal"}.get(label or "", "(no decision)")
    legend[1] = (
        legend[1][0] + f" ({rec.get('volume_score_method', '')})  threshold "
        f"{'n/a' if threshold is None else f'{threshold:.3f}'}  -> {verdict}",
        verdict_colour(label),
    )
    pos_note = "positions: along the slice normal, scanner coordinates" if volume.positions_mm else ""
    if pos_note:
        legend.append((pos_note, _FG))
    return render_montage_tiles(tiles, scale, map_threshold, legend, min_side=min_side, columns=columns)


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
        "nonfinite_voxels": int(volume.nifti.nonfinite) if volume.nifti is not None else 0,
        "intended_use": INTENDED_USE,
    }


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_result_set(
    out_dir: str, files: dict[str, bytes], json_name: str, doc: dict[str, Any]
) -> dict[str, str]:
    """Write a result set together or not at all: every file is staged in a hidden directory inside
    `out_dir`, then renamed into place, the JSON last (its presence means the set is complete). Any failure
    before the renames leaves nothing behind. -> {name: final path}."""
    mark_output_dir(out_dir)
    stage = tempfile.mkdtemp(prefix=".madclip-stage-", dir=out_dir)
    try:
        for name, data in files.items():
            atomic_write_bytes(os.path.join(stage, name), data)
        atomic_write_text(
            os.path.join(stage, json_name), json.dumps(jsonable(doc), indent=2, allow_nan=False) + "\n"
        )
        paths = {}
        for name in list(files) + [json_name]:
            paths[name] = os.path.join(out_dir, name)
            os.replace(os.path.join(stage, name), paths[name])
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return paths


def save_volume_outputs(
    out_dir: str,
    stem: str,
    volume: Volume,
    preds: Sequence[Any],
    record: dict[str, Any],
    scale: tuple[float, float],
    map_threshold: float | None,
    map_threshold_method: str | None,
    seg: Callable[[Sequence[np.ndarray]], bytes] | None = None,
) -> dict[str, str]:
    """Build the map, the montage and the SEG (when `seg` builds one from the per-slice maps) in memory,
    then write them and the JSON together (`write_result_set`); nothing is written when any part fails."""
    if not stem or "/" in stem or os.sep in stem:
        raise ValueError(f"stem must be a plain file-name stem, got {stem!r}")
    os.makedirs(out_dir, exist_ok=True)
    names = output_names(stem)
    planes = [p.anomaly_map for p in preds]  # slice order, each at the slice's native size
    arr, geometry = volume.map_output(planes)  # float32 on the map's grid
    files = {names["map"]: nifti_map_bytes(volume, arr, scale)}
    del arr
    geometry.update(header_agreement(volume))
    files[names["montage"]] = _png_bytes(
        render_montage(volume, preds, record["top_slices"], scale, record["threshold"], map_threshold, record)
    )
    if seg is not None:
        files[names["seg"]] = seg(planes)
    doc = dict(record)
    doc.update(
        map_file=names["map"],
        map_encoding="float32 NIfTI, raw anomaly map values; qform == sform",
        map_geometry=geometry,
        map_scale=list(scale),
        map_threshold=map_threshold,
        map_threshold_method=map_threshold_method,
        montage_file=names["montage"],
        seg_file=names["seg"] if seg is not None else None,
    )
    written = write_result_set(out_dir, files, names["json"], doc)
    kinds = {v: k for k, v in names.items()}
    return {kinds[name]: path for name, path in written.items()}
