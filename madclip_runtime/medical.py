"""DICOM and NIfTI scans -> 2-D ScanImage slices, windowed to [0, 1].

pydicom and nibabel are optional (the `medical` extra) and imported only when a file needs them.

Intensities. DICOM: stored values -> modality values (Rescale Slope/Intercept, or a Modality LUT) ->
window -> [0, 1]; MONOCHROME1 is inverted so bright always means high signal. With `window="auto"` the
file's VOI window (Window Center/Width, first value when several; LINEAR, LINEAR_EXACT or SIGMOID as
its VOI LUT Function says) is used when present, else per-slice min/max. "minmax" is per-slice min/max;
"full" maps the whole range the stored bits can hold (after rescale) to [0, 1]. NIfTI: the same, with
the header's display range cal_min/cal_max playing the VOI window's part and scl_slope/scl_inter the
rescale's. 8-bit unsigned sources with no rescale and no window applied stay uint8, like 8-bit PNGs.

Slices. A multi-frame DICOM gives one slice per frame, in file order. A NIfTI volume is first reoriented
to the closest RAS+ orientation (as `nibabel.as_closest_canonical` does), so its last axis runs
inferior -> superior whatever the storage order; slice k is that axis' k-th axial plane, shown the way
DICOM shows axial images (radiological convention): rows run anterior -> posterior, columns run from the
patient's right to their left. Volume slices are named "path#slice=N".
"""
from __future__ import annotations

import importlib
import logging
import os
import warnings
from types import ModuleType

import numpy as np

from .errors import InputError, MadclipError
from .scan import ScanImage, check_finite, check_regular_file, check_size, check_window, one_line, window_to_unit

log = logging.getLogger(__name__)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _require(module: str, path: str, what: str) -> ModuleType:
    """Import an optional reader, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MadclipError(f'{path}: reading {what} needs {module}; install it with: pip install "madclip[medical]"') from None


def _select(path: str, n: int, slice_index: int | None) -> list[int]:
    """Slice indices to return: all of them, or the one asked for (checked against the count)."""
    if slice_index is None:
        return list(range(n))
    if not 0 <= slice_index < n:
        raise InputError(f"{path}: slice {slice_index} out of range (the scan has {n} slice{'s' if n != 1 else ''}: 0..{n - 1})")
    return [slice_index]


def _source(path: str, n: int, i: int) -> str:
    return f"{path}#slice={i}" if n > 1 else path


def _linear(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] linearly to [0, 1], clipping outside."""
    v = (values.astype(np.float64) - lo) / (hi - lo)
    return np.clip(v, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------- DICOM


def _first_float(value: object) -> float | None:
    """A DS/IS element value (possibly multi-valued) -> its first value as float, or None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if len(value) == 0:  # type: ignore[arg-type]
            return None
        value = value[0]  # type: ignore[index]
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _frame_attr(ds, frame: int, sequence: str, keyword: str):
    """An attribute from the per-frame functional group, else the shared one, else the top level."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and len(seq) > index:
            inner = seq[index].get(sequence)
            if inner is not None and len(inner) > 0 and keyword in inner[0]:
                return inner[0].get(keyword)
    return ds.get(keyword)


def _rescale(ds, frame: int) -> tuple[float, float]:
    slope = _first_float(_frame_attr(ds, frame, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = _first_float(_frame_attr(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept"))
    return (1.0 if slope is None else slope), (0.0 if intercept is None else intercept)


def _voi_window(ds, frame: int) -> tuple[float, float, str] | None:
    """(center, width, function) of the first VOI window, or None when the file has no usable one."""
    center = _first_float(_frame_attr(ds, frame, "FrameVOILUTSequence", "WindowCenter"))
    width = _first_float(_frame_attr(ds, frame, "FrameVOILUTSequence", "WindowWidth"))
    if center is None or width is None:
        return None
    function = str(_frame_attr(ds, frame, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR").upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        log.warning("unknown VOI LUT Function %r; using LINEAR", function)
        function = "LINEAR"
    if width < (1.0 if function == "LINEAR" else np.finfo(np.float32).tiny):
        log.warning("invalid DICOM window width %s; using per-slice min/max", width)
        return None
    return center, width, function


def apply_voi_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI window (PS3.3 C.11.2.1.2) with output range [0, 1]; float32, same shape as `values`."""
    x = values.astype(np.float64)
    if function == "LINEAR_EXACT":
        y = (x - center) / width + 0.5
    elif function == "SIGMOID":
        y = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif width == 1.0:  # LINEAR with width 1 is a step at center - 0.5
        y = (x > center - 0.5).astype(np.float64)
    else:  # LINEAR: 0 at and below c - 0.5 - (w-1)/2, 1 above c - 0.5 + (w-1)/2
        y = (x - (center - 0.5)) / (width - 1.0) + 0.5
    return np.clip(y, 0.0, 1.0).astype(np.float32)


def _dcmread(pydicom: ModuleType, path: str):
    """Read a DICOM file; files without the Part 10 header are retried leniently. -> (dataset, forced)."""
    try:
        return pydicom.dcmread(path), False
    except pydicom.errors.InvalidDicomError:
        pass
    except Exception as exc:
        raise InputError(f"{path}: cannot read DICOM ({type(exc).__name__}: {one_line(exc)})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, force=True), True
    except Exception:
        raise InputError(f"{path}: not a DICOM file") from None


def _stored_range(ds, bits: int) -> tuple[float, float]:
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1.0
    return 0.0, 2.0**bits - 1.0


def read_dicom(path: str | os.PathLike, slice_index: int | None = None, window: str = "auto") -> list[ScanImage]:
    """Read a DICOM file into one ScanImage per frame (or just frame `slice_index`)."""
    path = os.fspath(path)
    check_window(window)
    check_regular_file(path)
    pydicom = _require("pydicom", path, "DICOM")
    ds, forced = _dcmread(pydicom, path)
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise InputError(f"{path}: {'not a DICOM file' if forced else 'DICOM file has no pixel data'}")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    check_size(path, cols, rows)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    frames = _select(path, n, slice_index)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    try:
        arr = ds.pixel_array  # [R, C] / [F, R, C], with a trailing [.., 3] for colour
        arr = arr.reshape((n, rows, cols) + ((spp,) if spp > 1 else ()))  # [F, R, C(, 3)]
    except Exception as exc:
        raise InputError(f"{path}: cannot decode DICOM pixel data ({type(exc).__name__}: {one_line(exc)})") from None
    check_finite(path, arr)
    bits_alloc = int(ds.get("BitsAllocated", arr.dtype.itemsize * 8) or arr.dtype.itemsize * 8)
    bits = int(ds.get("BitsStored", bits_alloc) or bits_alloc)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()

    if spp > 1:  # colour (pydicom converts YBR to RGB): no rescale or VOI window applies
        if spp != 3:
            raise InputError(f"{path}: unsupported DICOM with {spp} samples per pixel")
        out = []
        for i in frames:
            rgb = arr[i]  # [R, C, 3]
            px = rgb if rgb.dtype == np.uint8 else window_to_unit(rgb, "full" if window == "full" else "minmax", 2.0**bits - 1)
            out.append(ScanImage(np.ascontiguousarray(px), _source(path, n, i), bits))
        return out

    modality_lut = "ModalityLUTSequence" in ds
    out = []
    for i in frames:
        stored = arr[i]  # [R, C]
        slope, intercept = _rescale(ds, i)
        if modality_lut:
            from pydicom.pixels import apply_modality_lut

            values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
        elif slope != 1.0 or intercept != 0.0:
            values = stored.astype(np.float64) * slope + intercept
        else:
            values = stored
        check_finite(path, values)
        voi = _voi_window(ds, i) if window == "auto" else None
        rescaled = modality_lut or slope != 1.0 or intercept != 0.0
        if stored.dtype == np.uint8 and not rescaled and voi is None:
            px = 255 - stored if photometric == "MONOCHROME1" else stored  # uint8 [R, C], the PNG path
            out.append(ScanImage(np.ascontiguousarray(px), _source(path, n, i), bits))
            continue
        if voi is not None:
            unit = apply_voi_window(values, *voi)
        elif window == "full" and stored.dtype.kind in "iu" and not modality_lut:
            ends = sorted(v * slope + intercept for v in _stored_range(ds, bits))
            unit = _linear(values, ends[0], ends[1]) if ends[1] > ends[0] else np.zeros(values.shape, np.float32)
        else:  # "minmax", "auto" without a window, "full" on float pixel data or a Modality LUT
            unit = window_to_unit(values, "full" if window == "full" else "minmax")
        if photometric == "MONOCHROME1":
            unit = 1.0 - unit
        out.append(ScanImage(np.ascontiguousarray(unit, dtype=np.float32), _source(path, n, i), bits))
    return out


# ----------------------------------------------------------------------------------------------- NIfTI


def read_nifti(path: str | os.PathLike, slice_index: int | None = None, window: str = "auto") -> list[ScanImage]:
    """Read a NIfTI volume (.nii / .nii.gz) into axial slices (all, or just `slice_index`)."""
    path = os.fspath(path)
    check_window(window)
    check_regular_file(path)
    nib = _require("nibabel", path, "NIfTI")
    try:
        img = nib.load(path)
    except Exception as exc:
        raise InputError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {one_line(exc)})") from None
    shape = tuple(int(s) for s in img.shape)
    if len(shape) > 3 and all(s == 1 for s in shape[3:]):
        shape = shape[:3]
    if len(shape) not in (2, 3):
        raise InputError(f"{path}: NIfTI of shape {shape} is not a 2-D image or 3-D volume (pick one volume first)")
    raw_dtype = np.dtype(img.get_data_dtype())
    if raw_dtype.fields is not None or raw_dtype.kind not in "iuf":
        raise InputError(f"{path}: unsupported NIfTI data type {raw_dtype}")
    shape3 = shape + (1,) * (3 - len(shape))  # [X, Y, Z]
    ornt = nib.orientations.io_orientation(img.affine)  # storage axes -> closest RAS+ axes
    ras_shape = [0, 0, 0]
    for axis, (target, _flip) in enumerate(ornt):
        ras_shape[int(target)] = shape3[axis]
    check_size(path, ras_shape[0], ras_shape[1])  # each axial slice is [Y, X] after the transpose below
    frames = _select(path, ras_shape[2], slice_index)

    try:
        data = np.asanyarray(img.dataobj)  # scl_slope / scl_inter applied by nibabel
    except Exception as exc:
        raise InputError(f"{path}: cannot read NIfTI voxel data ({type(exc).__name__}: {one_line(exc)})") from None
    vol = nib.orientations.apply_orientation(data.reshape(shape3), ornt)  # [X(R), Y(A), Z(S)]
    check_finite(path, vol, "voxel")
    slope = _first_float(getattr(img.dataobj, "slope", 1.0))
    inter = _first_float(getattr(img.dataobj, "inter", 0.0))
    slope, inter = (1.0 if slope is None else slope), (0.0 if inter is None else inter)
    scaled = slope != 1.0 or inter != 0.0
    cal = (float(img.header.get("cal_min", 0.0)), float(img.header.get("cal_max", 0.0)))
    use_cal = window == "auto" and np.isfinite(cal).all() and cal[1] > cal[0]
    bits = int(img.header.get("bitpix", raw_dtype.itemsize * 8))

    out = []
    n = ras_shape[2]
    for k in frames:
        plane = np.ascontiguousarray(vol[::-1, ::-1, k].T)  # [Y, X]: rows anterior->posterior, cols right->left
        if raw_dtype == np.uint8 and not scaled and not use_cal:
            px = plane.astype(np.uint8, copy=False)
        elif use_cal:
            px = _linear(plane, cal[0], cal[1])
        elif window == "full" and raw_dtype.kind in "iu":
            info = np.iinfo(raw_dtype)
            ends = sorted((info.min * slope + inter, info.max * slope + inter))
            px = _linear(plane, ends[0], ends[1])
        else:
            px = window_to_unit(plane, "full" if window == "full" else "minmax")
        out.append(ScanImage(np.ascontiguousarray(px), _source(path, n, k), bits))
    return out
