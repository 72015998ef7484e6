"""Volumes: a NIfTI file, a multi-frame DICOM or a DICOM series -> ordered 2-D slices plus their geometry.

A `Volume` holds the slices the model scores (`ScanImage`s, read by `madclip_runtime.scans.medical`, so the one
windowing applies) and what is needed to write per-slice anomaly maps back as ONE array on the input's grid:

- NIfTI: the output has the file's own stored shape and affine; slice k is the k-th axial plane after
  reorienting to the closest RAS+ (see `medical`), and `medical.NiftiVolume.to_storage` undoes that.
- DICOM (series or multi-frame): the output array is [Rows, Columns, N] with slices ordered along the slice
  normal (ImageOrientationPatient row x column cosines, dotted with ImagePositionPatient), and the affine is
  nibabel's DICOM affine (`nibabel.nicom.dicomwrappers.Wrapper.affine`: column 0 = column cosine x row
  spacing, column 1 = row cosine x column spacing, i.e. index [r, c]) with the slice column the mean step
  between the first and last slice position, converted from DICOM's LPS to NIfTI's RAS by negating x and y,
  the way dcm2niix and nibabel write DICOM-derived NIfTI. Viewers then overlay the map on the series.

Series checks: files are grouped by SeriesInstanceUID; within a series, mixed sizes or orientations and
duplicated slice positions are refused, missing slices (gaps of whole steps) and uneven spacing are warned
about. The voxel budget is checked from the headers before any pixel is decoded.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import InputError
from . import medical
from .geometry import GAP_FACTOR, LPS_TO_RAS, MapGrid, StackGeometry, map_grid, resample_planes
from .imageio import has_dicom_magic, is_dicom_path, is_nifti_path
from .scan import ScanImage

log = logging.getLogger(__name__)

__all__ = ["LPS_TO_RAS", "Volume", "VolumeJob", "plan_volumes", "read_dicom_series", "read_multiframe"]
SPACING_RTOL = 0.05  # steps differing from the median by more than 5 % are "uneven"


@dataclass
class Volume:
    """Ordered slices of one scan volume and the geometry of the output map (see the module docstring)."""

    source: str  # the file, or the folder of a DICOM series
    kind: str  # "nifti", "dicom-series" or "dicom-multiframe"
    slices: list[ScanImage]  # slice k as the model sees it, k along the slice axis
    shape: tuple[int, ...]  # the output map array's shape (the NIfTI's stored shape; [R, C, N] for DICOM)
    affine: np.ndarray  # 4x4 voxel -> RAS+ mm affine of the output map array
    name: str  # file-name stem for the outputs
    series_uid: str | None = None
    datasets: list[Any] = field(default_factory=list)  # DICOM headers of the source, in file order
    frame_of_slice: list[int] = field(
        default_factory=list
    )  # DICOM: slice k -> (dataset index or frame number)
    warnings: list[str] = field(default_factory=list)
    nifti: medical.NiftiVolume | None = None
    grid: MapGrid | None = None  # DICOM: the map's grid (the source grid, or a resampled regular one)
    geometry: StackGeometry | None = None  # DICOM: orientation, spacing, every slice's position
    positions_mm: list[float] | None = None  # slice k's position along the slice normal (mm)

    @property
    def n_slices(self) -> int:
        return len(self.slices)

    @property
    def is_dicom(self) -> bool:
        return self.kind.startswith("dicom")

    def release_pixels(self, keep: Sequence[int]) -> None:
        """Drop the decoded pixels of every slice but `keep` (the montage's) once scored: bounded memory."""
        kept = set(int(k) for k in keep)
        self.slices = [
            s if k in kept else ScanImage(np.zeros((1, 1), np.uint8), s.source, s.bits)
            for k, s in enumerate(self.slices)
        ]
        if self.nifti is not None:  # it holds the same slice list
            self.nifti = dataclasses.replace(self.nifti, slices=[])

    def map_array(self, planes: Sequence[np.ndarray]) -> np.ndarray:
        """Per-slice maps (each [H, W] at the slice's native size, slice order) -> float32 array of `shape`."""
        return self.map_output(planes)[0]

    def map_output(self, planes: Sequence[np.ndarray]) -> tuple[np.ndarray, dict[str, Any]]:
        """Per-slice maps -> (float32 map array of `shape` on the map's grid, geometry facts for the JSON).

        NIfTI: the input's own grid; non-finite input voxels are masked (0) in the map. DICOM: the source
        grid when the stack is regular, else the resampled regular grid (`geometry.resample_planes`)."""
        info: dict[str, Any]
        if self.nifti is not None:
            out = self.nifti.to_storage(planes)
            info = {"grid": "source", "shape": list(out.shape)}
            if self.nifti.nonfinite_mask is not None:
                out[self.nifti.nonfinite_mask] = 0.0
                info["masked_voxels"] = int(self.nifti.nonfinite)
        elif self.grid is not None and self.grid.resampled:
            out, no_data = resample_planes(self.grid, planes)
            info = {**self.grid.info(), "voxels_without_data": no_data}
        else:
            out = np.empty((self.shape[0], self.shape[1], len(planes)), dtype=np.float32)
            for k, p in enumerate(planes):  # [R, C, N]: index [r, c, k] as nibabel's DICOM affine
                out[:, :, k] = p
            info = self.grid.info() if self.grid is not None else {"grid": "source", "shape": list(out.shape)}
        if out.shape != tuple(self.shape):
            raise ValueError(f"map array shape {out.shape} does not match the volume's {self.shape}")
        return out, info


def file_stem(path: str) -> str:
    """'a/case01.nii.gz' -> 'case01'; a folder -> its name."""
    name = os.path.basename(os.path.normpath(path))
    for ext in (".nii.gz", ".nii", ".dcm", ".dicom"):
        if name.lower().endswith(ext):
            return name[: -len(ext)] or name
    return name


# ----------------------------------------------------------------------------------------------- NIfTI


def nifti_slice_count(path: str, volume_index: int | None = None) -> int:
    """Number of axial slices of a NIfTI, from its header only (no voxel read)."""
    img, shape3, _ = medical.nifti_open(path, volume_index)
    nib = __import__("nibabel")
    ornt = nib.orientations.io_orientation(img.affine)
    return int(shape3[int(np.flatnonzero(ornt[:, 0] == 2)[0])])


def read_nifti_as_volume(
    path: str, window: str = "auto", volume_index: int | None = None, max_voxels: int | None = None
) -> Volume:
    nv = medical.read_nifti_volume(path, None, window, volume_index, max_voxels)
    warn = []
    if nv.nonfinite:
        warn.append(
            f"{nv.nonfinite} non-finite (NaN/inf) voxels read as background (the lowest finite value) "
            "and masked (0) in the map"
        )
    return Volume(
        path,
        "nifti",
        nv.slices,
        nv.shape,
        nv.affine,
        file_stem(path),
        nifti=nv,
        warnings=warn,
        positions_mm=nv.positions_mm,
    )


# ----------------------------------------------------------------------------------------------- DICOM geometry


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.isfinite(arr).all() else None


def geometry_of(
    ds: Any, frame: int | None = None
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(IOP [6], IPP [3], PixelSpacing [2]) of a single-frame file, or of `frame` of an enhanced multi-frame."""
    if frame is None:
        return (
            _floats(ds.get("ImageOrientationPatient"), 6),
            _floats(ds.get("ImagePositionPatient"), 3),
            _floats(ds.get("PixelSpacing"), 2),
        )
    ori = medical.frame_item(ds, frame, "PlaneOrientationSequence")
    pos = medical.frame_item(ds, frame, "PlanePositionSequence")
    pix = medical.frame_item(ds, frame, "PixelMeasuresSequence")
    return (
        _floats(ori.get("ImageOrientationPatient"), 6)
        if ori is not None
        else _floats(ds.get("ImageOrientationPatient"), 6),
        _floats(pos.get("ImagePositionPatient"), 3) if pos is not None else None,
        _floats(pix.get("PixelSpacing"), 2) if pix is not None else _floats(ds.get("PixelSpacing"), 2),
    )


def order_and_affine(
    where: str,
    geoms: list[tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]],
    fallback_order: Sequence[float],
    dims: tuple[int, int] = (0, 0),
    series_uid: str | None = None,
) -> tuple[list[int], MapGrid, StackGeometry | None, list[str]]:
    """Slice geometry -> (order along the slice normal, the map's grid, the stack geometry, warnings).

    Without orientation/position the slices keep `fallback_order` (InstanceNumber) and the map's affine only
    carries the pixel spacing (a warning says so). Duplicated positions and mixed orientations are errors.
    A sheared (gantry tilt) or unevenly spaced stack gets a resampled grid (see `geometry`).
    """
    n = len(geoms)
    warn: list[str] = []
    iops = [g[0] for g in geoms]
    ipps = [g[1] for g in geoms]
    spacing = next((g[2] for g in geoms if g[2] is not None), None)
    if spacing is None:
        spacing = np.ones(2)
        warn.append("no PixelSpacing: 1 mm assumed")
    if any(v is None for v in iops) or any(v is None for v in ipps):
        order = sorted(range(n), key=lambda i: (fallback_order[i], i))
        warn.append(
            "no ImageOrientationPatient/ImagePositionPatient on every slice: ordered by InstanceNumber, "
            "the map's affine carries the pixel spacing only"
        )
        aff = np.diag([float(spacing[0]), float(spacing[1]), 1.0, 1.0])
        return (
            order,
            MapGrid((dims[0], dims[1], n), aff, False, planes=[[(k, 1.0)] for k in range(n)]),
            None,
            warn,
        )
    iop = iops[0]
    distinct = []
    for v in iops:
        if not any(np.allclose(v, d, atol=1e-3) for d in distinct):
            distinct.append(v)
    if len(distinct) > 1:
        what = f"series {series_uid}" if series_uid else "this input"
        shown = "; ".join("[" + ", ".join(f"{x:.3g}" for x in d) + "]" for d in distinct[:3])
        raise InputError(
            f"{where}: {what} holds slices in {len(distinct)} orientations ({shown}: e.g. localizers "
            "or several stacks in one series); not one volume: give the files of one stack"
        )
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)  # the slice normal, as nibabel's Wrapper.slice_normal
    pos = np.array([float(np.dot(p, normal)) for p in ipps])
    order = sorted(range(n), key=lambda i: (pos[i], fallback_order[i]))
    sorted_pos = pos[order]
    steps = np.diff(sorted_pos)
    if n > 1:
        tol = max(1e-3, 1e-3 * float(np.max(np.abs(steps))))
        dup = np.flatnonzero(steps < tol)
        if dup.size:
            raise InputError(
                f"{where}: {dup.size + 1} or more slices share the position {sorted_pos[dup[0]]:.3f} mm "
                "along the slice normal (several acquisitions in one series?); not one volume"
            )
        med = float(np.median(steps))
        gaps = [i for i, s in enumerate(steps) if s > GAP_FACTOR * med]
        if gaps:
            warn.append(
                f"missing slices: {len(gaps)} gap(s) larger than 1.5 x the median spacing {med:.3f} mm "
                f"(first after slice {gaps[0]}); the map is resampled onto a regular grid, no data in the gaps"
            )
        elif np.any(np.abs(steps - med) > SPACING_RTOL * med):
            warn.append(
                f"uneven slice spacing ({steps.min():.3f}..{steps.max():.3f} mm, median {med:.3f}); "
                "the map is resampled onto a regular grid"
            )
    geom = StackGeometry(
        np.asarray(row_cos, float),
        np.asarray(col_cos, float),
        (float(spacing[0]), float(spacing[1])),
        np.array([ipps[i] for i in order], dtype=np.float64),
        dims[0],
        dims[1],
    )
    grid = map_grid(geom)
    if grid.resampled and not any(w.startswith(("missing slices", "uneven slice")) for w in warn):
        warn.append(
            f"{grid.reason}: the map is resampled onto a regular grid (a NIfTI qform cannot hold this geometry)"
        )
    return order, grid, geom, warn


def _positions(geom: StackGeometry | None, n: int) -> list[float] | None:
    """Each slice's position along the slice normal (IPP . normal, mm), in slice order."""
    if geom is None:
        return None
    normal = np.cross(geom.row_cos, geom.col_cos)
    return [round(float(np.dot(p, normal)), 4) for p in geom.positions[:n]]


def _instance(ds: Any, default: int) -> float:
    try:
        return float(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        return float(default)


# ----------------------------------------------------------------------------------------------- DICOM series


@dataclass
class DicomSeries:
    """The files of one SeriesInstanceUID, with their headers (no pixel data read)."""

    uid: str
    folder: str
    files: list[str]
    headers: list[Any]
    description: str = ""

    @property
    def frames(self) -> int:
        return sum(int(h.get("NumberOfFrames", 1) or 1) for h in self.headers)


def group_series(files: Sequence[str]) -> tuple[list[DicomSeries], list[str]]:
    """DICOM files -> series grouped by SeriesInstanceUID (in first-seen order), plus files that failed.

    Only headers are read. Files that are not readable DICOM are reported (InputError lines) by the caller.
    """
    groups: dict[str, DicomSeries] = {}
    bad: list[str] = []
    for f in files:
        try:
            ds = medical.read_dicom_header(f)
        except InputError as exc:
            log.debug("%s", exc)
            bad.append(f)
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or f"no-series-uid:{f}")
        g = groups.get(uid)
        if g is None:
            g = groups[uid] = DicomSeries(
                uid, os.path.dirname(f) or ".", [], [], str(ds.get("SeriesDescription", "") or "")
            )
        g.files.append(f)
        g.headers.append(ds)
    return list(groups.values()), bad


def read_dicom_series(
    series: DicomSeries, window: str = "auto", max_voxels: int | None = None, name: str | None = None
) -> Volume:
    """A series of single-frame files (or one multi-frame file) -> a Volume ordered along the slice normal."""
    where = series.folder if len(series.files) > 1 else series.files[0]
    if len(series.files) == 1 and int(series.headers[0].get("NumberOfFrames", 1) or 1) > 1:
        return read_multiframe(series.files[0], series.headers[0], window, max_voxels, name)
    multi = [f for f, h in zip(series.files, series.headers) if int(h.get("NumberOfFrames", 1) or 1) > 1]
    if multi:
        raise InputError(
            f"{multi[0]}: a multi-frame file inside series {series.uid} with other files; "
            "give the multi-frame file on its own"
        )
    sizes = {(int(h.get("Rows", 0) or 0), int(h.get("Columns", 0) or 0)) for h in series.headers}
    if len(sizes) != 1:
        raise InputError(f"{where}: series {series.uid} mixes image sizes {sorted(sizes)}; not one volume")
    rows, cols = sizes.pop()
    n = len(series.files)
    medical.check_voxels(where, (rows, cols, n), rows * cols * n, max_voxels)  # before any pixel is decoded
    order, grid, geom, warn = order_and_affine(
        where,
        [geometry_of(h) for h in series.headers],
        [_instance(h, i) for i, h in enumerate(series.headers)],
        (rows, cols),
        series.uid,
    )
    slices = []
    for k, i in enumerate(order):
        (s,) = medical.read_dicom(series.files[i], window=window, max_voxels=max_voxels)
        slices.append(ScanImage(s.pixels, f"{series.files[i]}#slice={k}", s.bits))
    for w in warn:
        log.warning("%s: %s", where, w)
    return Volume(
        where,
        "dicom-series",
        slices,
        grid.shape,
        grid.affine,
        name or file_stem(where),
        series.uid,
        datasets=list(series.headers),
        frame_of_slice=list(order),
        warnings=warn,
        grid=grid,
        geometry=geom,
        positions_mm=_positions(geom, n),
    )


def read_multiframe(
    path: str, header: Any, window: str = "auto", max_voxels: int | None = None, name: str | None = None
) -> Volume:
    """A multi-frame DICOM -> Volume; frames ordered along the slice normal from the functional groups."""
    n = int(header.get("NumberOfFrames", 1) or 1)
    rows, cols = int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)
    medical.check_voxels(path, (n, rows, cols), rows * cols * n, max_voxels)
    uid = str(header.get("SeriesInstanceUID", "") or "") or None
    order, grid, geom, warn = order_and_affine(
        path, [geometry_of(header, f) for f in range(n)], list(range(n)), (rows, cols), uid
    )
    frames = medical.read_dicom(path, window=window, max_voxels=max_voxels)
    slices = [ScanImage(frames[f].pixels, f"{path}#slice={k}", frames[f].bits) for k, f in enumerate(order)]
    for w in warn:
        log.warning("%s: %s", path, w)
    return Volume(
        path,
        "dicom-multiframe",
        slices,
        grid.shape,
        grid.affine,
        name or file_stem(path),
        uid,
        datasets=[header],
        frame_of_slice=list(order),
        warnings=warn,
        grid=grid,
        geometry=geom,
        positions_mm=_positions(geom, n),
    )


# ----------------------------------------------------------------------------------------------- dispatch


@dataclass
class VolumeJob:
    """One volume to read and score: a NIfTI file or a DICOM series (files or one multi-frame file)."""

    source: str
    kind: str  # "nifti" or "dicom"
    series: DicomSeries | None = None
    label: str | None = (
        None  # output stem when the source's own name is ambiguous (several series in a folder)
    )

    def read(
        self, window: str = "auto", volume_index: int | None = None, max_voxels: int | None = None
    ) -> Volume:
        if self.kind == "nifti":
            return read_nifti_as_volume(self.source, window, volume_index, max_voxels)
        assert self.series is not None
        return read_dicom_series(self.series, window, max_voxels, name=self.name)

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.kind == "nifti" or self.series is None:
            return file_stem(self.source)
        return file_stem(self.series.files[0] if len(self.series.files) == 1 else self.series.folder)


def _is_dicom(path: str) -> bool:
    return is_dicom_path(path) or has_dicom_magic(path)


def plan_volumes(
    files: Sequence[str], series_uid: str | None = None, volume_index: int | None = None
) -> tuple[list[VolumeJob], list[str], list[str]]:
    """Split expanded input files into volume jobs and plain 2-D files.

    -> (volume jobs, files for the 2-D path, messages for files that could not be planned). A NIfTI with more
    than one axial slice is a volume; DICOM files are grouped by SeriesInstanceUID, and a series of two or
    more files, or a multi-frame file, is a volume (a single one-frame file stays a 2-D scan). With
    `series_uid`, only that series is kept (an error when no file belongs to it).
    """
    jobs: list[VolumeJob] = []
    flat: list[str] = []
    errors: list[str] = []
    dicoms: list[str] = []
    for f in files:
        if is_nifti_path(f):
            try:
                many = nifti_slice_count(f, volume_index) > 1
            except InputError as exc:
                errors.append(str(exc))
                continue
            except Exception as exc:  # one bad input never stops the others
                errors.append(
                    f"{f}: cannot read this NIfTI header ({type(exc).__name__}: {' '.join(str(exc).split())})"
                )
                continue
            (jobs.append(VolumeJob(f, "nifti")) if many else flat.append(f))
        elif _is_dicom(f):
            dicoms.append(f)
        else:
            flat.append(f)
    if dicoms:
        groups, bad = group_series(dicoms)
        flat.extend(bad)  # the 2-D reader reports what is wrong with them, one line each
        if series_uid is not None:
            kept = [g for g in groups if g.uid == series_uid]
            if not kept:
                listed = ", ".join(f"{g.uid} ({len(g.files)} files)" for g in groups) or "none"
                errors.append(
                    f"--series {series_uid}: no such series among the DICOM inputs (found: {listed})"
                )
            groups = kept
        folders: dict[str, list[DicomSeries]] = {}
        for g in groups:
            folders.setdefault(g.folder, []).append(g)
        for folder, gs in folders.items():
            if len(gs) > 1:
                log.info(
                    "%s: %d DICOM series in this folder, each processed on its own (pick one with --series): %s",
                    folder,
                    len(gs),
                    "; ".join(f"{g.uid} {g.description!r} {len(g.files)} file(s)" for g in gs),
                )
        for g in groups:
            if g.frames > 1:
                label = None
                if len(folders[g.folder]) > 1 and len(g.files) > 1:  # several series share the folder's name
                    number = g.headers[0].get("SeriesNumber")
                    label = (
                        f"{file_stem(g.folder)}_series{number if number not in (None, '') else g.uid[-8:]}"
                    )
                jobs.append(VolumeJob(g.files[0] if len(g.files) == 1 else g.folder, "dicom", g, label))
            else:
                flat.extend(g.files)
    return jobs, flat, errors
