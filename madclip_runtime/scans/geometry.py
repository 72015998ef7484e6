"""DICOM stack geometry -> the grid of the NIfTI map: written as acquired when the stack is regular, else
resampled onto a regular grid (as dcm2niix does for gantry tilt and unequal slice spacing).

A NIfTI header has one affine, and ITK-based readers (ITK-SNAP, 3D Slicer, SimpleITK) read it from the
qform, which can only hold a rotation, voxel sizes and a shift, while nibabel reads the sform. madclip
therefore writes every map with sform = the stored qform (equal to float32 precision, see
`volume_output.nifti_map_bytes`), and only ever uses
grids that a qform can hold: orthogonal axes along the slice's row/column directions and its normal.

A DICOM stack fits such a grid exactly when every slice origin lies on the normal through the first one
(no shear) at an even step (within `POSITION_TOL` mm). Otherwise:

- gantry tilt (slice origins drift in-plane from slice to slice: a sheared stack) and
- uneven spacing (missing slices, a gap between two acquisitions, variable steps)

are resampled onto a regular grid aligned with the slice plane: rows/columns keep the pixel spacing and
the in-plane extent grows to cover every slice; planes are `dz` apart along the normal, `dz` the smallest
step in the stack (larger when the grid would exceed max(8 x the source's voxels, 16M voxels); the JSON
then counts the slices that fall between planes). Each output plane interpolates linearly between the two
source slices around it (each shifted in-plane to its true position, bilinearly); a plane inside a gap (a step
larger than 1.5 x the median step) holds no data unless it lies on a slice: values never move off their
position.
Voxels with no data (outside every slice's extent, inside a gap) are 0 in the map and counted in the JSON.
The DICOM SEG is always written on the source frames, so both outputs place each value at the same point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
POSITION_TOL = 0.02  # mm: slice origins within this of a regular grid are written on the source grid
GAP_FACTOR = 1.5  # steps larger than this x the median step are gaps (no interpolation across them)
MAX_GRID_FACTOR = 8  # a resampled grid holds at most this many x the source's voxels ...
MAX_GRID_VOXELS = 1 << 24  # ... or 16M voxels (64 MB of float32) when that is more


@dataclass
class StackGeometry:
    """One ordered DICOM stack: orientation, pixel spacing, and every slice's ImagePositionPatient (LPS)."""

    row_cos: np.ndarray  # [3] direction of increasing column index (IOP[:3])
    col_cos: np.ndarray  # [3] direction of increasing row index (IOP[3:])
    spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns) mm
    positions: np.ndarray  # [N, 3] IPP of slice k, in slice order (ascending along the normal)
    rows: int
    cols: int

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Orthonormal (u: down the rows, v: along the columns, n: slice normal = v x u), from IOP."""
        v = self.row_cos / np.linalg.norm(self.row_cos)
        u = self.col_cos - np.dot(self.col_cos, v) * v
        u = u / np.linalg.norm(u)
        return u, v, np.cross(v, u)

    def offsets(self) -> np.ndarray:
        """[N, 3]: each slice origin relative to slice 0 in (u, v, n) coordinates, mm."""
        u, v, n = self.axes()
        d = self.positions - self.positions[0]
        return np.stack([d @ u, d @ v, d @ n], axis=1)

    def pixel_positions_lps(self, k: int) -> np.ndarray:
        """[R, C, 3] DICOM patient position of every pixel centre of slice k (as the standard defines it)."""
        r, c = np.meshgrid(np.arange(self.rows), np.arange(self.cols), indexing="ij")
        return (
            self.positions[k][None, None, :]
            + r[..., None] * self.spacing[0] * self.col_cos
            + c[..., None] * self.spacing[1] * self.row_cos
        )


@dataclass
class MapGrid:
    """Where the map goes: the output array's shape, its RAS affine, and how source slices fill it."""

    shape: tuple[int, int, int]
    affine: np.ndarray  # 4x4 RAS, columns orthogonal (a valid qform)
    resampled: bool
    reason: str = ""  # why resampled ("" when written on the source grid)
    shifts: np.ndarray | None = None  # [N, 2] source slice k starts at output row/column (shift pixels)
    planes: list[list[tuple[int, float]]] = field(default_factory=list)  # output plane -> [(slice, weight)]
    dz: float = 0.0

    def slices_on_grid(self) -> int:
        """How many source slices contribute to at least one plane of the map."""
        return len({k for contrib in self.planes for k, wt in contrib if wt > 0})

    def info(self) -> dict[str, Any]:
        zooms = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        out: dict[str, Any] = {
            "grid": "resampled" if self.resampled else "source",
            "shape": list(self.shape),
            "voxel_mm": [round(float(z), 6) for z in zooms],
        }
        if self.resampled:
            out["reason"] = self.reason
            out["method"] = (
                "linear between neighbouring slices, bilinear in-plane shift to each slice's "
                "true position; no interpolation across gaps"
            )
            out["slice_spacing_mm"] = round(self.dz, 6)
            out["source_slices_in_map"] = self.slices_on_grid()
        return out


def _affine(
    origin: np.ndarray, u: np.ndarray, v: np.ndarray, n: np.ndarray, dr: float, dc: float, dz: float
) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = u * dr, v * dc, n * dz, origin
    return LPS_TO_RAS @ lps


def classify(geom: StackGeometry) -> tuple[list[str], float]:
    """-> (reasons the stack is not a regular grid, the tilt angle in degrees)."""
    off = geom.offsets()
    n = len(off)
    reasons: list[str] = []
    if n < 2:
        return reasons, 0.0
    w = off[:, 2]
    span = float(w[-1] - w[0])
    inplane = off[:, :2] - np.outer(w / span, off[-1, :2]) if span > 0 else off[:, :2]
    drift = np.hypot(off[-1, 0], off[-1, 1])
    tilt = math.degrees(math.atan2(drift, span)) if span > 0 else 0.0
    if drift > POSITION_TOL:
        reasons.append(
            f"gantry tilt / sheared stack ({tilt:.2f} degrees: slice origins drift {drift:.2f} mm in-plane)"
        )
    elif np.abs(inplane).max() > POSITION_TOL:
        reasons.append(f"slice origins off the slice normal by up to {np.abs(inplane).max():.2f} mm")
    steps = np.diff(w)
    even = w[0] + np.arange(n) * span / (n - 1)
    if np.abs(w - even).max() > POSITION_TOL:
        reasons.append(f"uneven slice spacing ({steps.min():.3f}..{steps.max():.3f} mm)")
    return reasons, tilt


def map_grid(geom: StackGeometry) -> MapGrid:
    """The regular grid for the map of `geom`: the source grid when regular, else a resampling plan."""
    u, v, nrm = geom.axes()
    dr, dc = float(geom.spacing[0]), float(geom.spacing[1])
    off = geom.offsets()
    n = len(off)
    reasons, _ = classify(geom)
    if not reasons:
        dz = float(off[-1, 2] / (n - 1)) if n > 1 else 1.0
        return MapGrid(
            (geom.rows, geom.cols, n),
            _affine(geom.positions[0], u, v, nrm, dr, dc, dz),
            False,
            planes=[[(k, 1.0)] for k in range(n)],
            dz=dz,
        )
    w = off[:, 2]
    steps = np.diff(w)
    med = float(np.median(steps))
    span = float(w[-1] - w[0])
    dz = float(steps.min())
    a_min, b_min = float(off[:, 0].min()), float(off[:, 1].min())
    rows = geom.rows + int(math.ceil((float(off[:, 0].max()) - a_min) / dr - 1e-6))
    cols = geom.cols + int(math.ceil((float(off[:, 1].max()) - b_min) / dc - 1e-6))
    max_planes = max(MAX_GRID_FACTOR * n * geom.rows * geom.cols, MAX_GRID_VOXELS) // max(1, rows * cols)
    if span / dz + 1 > max_planes:
        dz = span / max(1, max_planes - 1)
    m = int(math.floor(span / dz + 1e-6)) + 1
    if span - (m - 1) * dz > POSITION_TOL:
        m += 1  # one more plane so the last slice is covered
    planes: list[list[tuple[int, float]]] = []
    for j in range(m):
        z = j * dz
        k = int(np.searchsorted(w, z, side="right")) - 1  # w[k] <= z < w[k + 1]
        k = min(max(k, 0), n - 1)
        if abs(z - w[k]) <= POSITION_TOL:
            planes.append([(k, 1.0)])
        elif k + 1 < n and abs(w[k + 1] - z) <= POSITION_TOL:
            planes.append([(k + 1, 1.0)])
        elif k + 1 < n and steps[k] <= GAP_FACTOR * med:
            t = (z - w[k]) / steps[k]
            planes.append([(k, 1.0 - t), (k + 1, t)])
        else:  # inside a gap (a missing slice, two acquisitions): no data; no slice moves off its position
            planes.append([])
    shifts = np.stack([(off[:, 0] - a_min) / dr, (off[:, 1] - b_min) / dc], axis=1)
    origin = geom.positions[0] + a_min * u + b_min * v
    return MapGrid(
        (rows, cols, m), _affine(origin, u, v, nrm, dr, dc, dz), True, "; ".join(reasons), shifts, planes, dz
    )


def _shift_axis(x: np.ndarray, shift: float, size: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear resampling of `x` along `axis` onto output indices 0..size-1, where source index = out - shift.

    -> (values, valid [size] bool: the source covers that output index)."""
    pos = np.arange(size, dtype=np.float64) - shift
    n = x.shape[axis]
    valid = (pos >= -1e-6) & (pos <= n - 1 + 1e-6)
    pos = np.clip(pos, 0.0, n - 1)
    i0 = np.minimum(np.floor(pos).astype(np.intp), max(n - 2, 0))
    f = (pos - i0).astype(np.float32)
    i1 = np.minimum(i0 + 1, n - 1)
    a, b = np.take(x, i0, axis=axis), np.take(x, i1, axis=axis)
    shape = [1, 1]
    shape[axis] = size
    f = f.reshape(shape)
    return a * (1.0 - f) + b * f, valid


def resample_planes(
    grid: MapGrid, planes: Sequence[np.ndarray], valid: Sequence[np.ndarray | None] | None = None
) -> tuple[np.ndarray, int]:
    """Per-slice maps (slice order, [R, C] each) -> (float32 array [R', C', M] of grid.shape, voxels w/o data).

    `valid` (optional, per slice [R, C] bool) marks source pixels that hold data (False: masked input)."""
    rows, cols, m = grid.shape
    out = np.zeros(grid.shape, dtype=np.float32)
    no_data = 0
    for j, contrib in enumerate(grid.planes):
        acc = np.zeros((rows, cols), dtype=np.float32)
        ok = np.ones((rows, cols), dtype=bool) if contrib else np.zeros((rows, cols), dtype=bool)
        for k, wt in contrib:
            src = np.asarray(planes[k], dtype=np.float32)
            mask = None if valid is None else valid[k]
            src_ok = np.ones(src.shape, np.float32) if mask is None else mask.astype(np.float32)
            sr, sc = (
                (0.0, 0.0) if grid.shifts is None else (float(grid.shifts[k, 0]), float(grid.shifts[k, 1]))
            )
            tmp, vr = _shift_axis(src, sr, rows, 0)
            val, vc = _shift_axis(tmp, sc, cols, 1)
            okr, _ = _shift_axis(src_ok, sr, rows, 0)
            okv, _ = _shift_axis(okr, sc, cols, 1)
            acc += np.float32(wt) * val
            ok &= vr[:, None] & vc[None, :] & (okv > 0.999)
        acc[~ok] = 0.0
        out[:, :, j] = acc
        no_data += int((~ok).sum())
    return out, no_data
