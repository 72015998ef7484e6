"""DICOM and NIfTI scans -> 2-D ScanImage slices, windowed to [0, 1].

pydicom and nibabel are optional (the `medical` extra) and imported only when a file needs them.

Intensities. DICOM: stored values -> modality values -> VOI -> [0, 1], through pydicom's own
`pydicom.pixels.apply_modality_lut` (Rescale Slope/Intercept or a Modality LUT Sequence) and `apply_voi_lut`
(a VOI LUT Sequence, else Window Center/Width with its VOI LUT Function, first when several; common in
mammography and CR), whose output range is then scaled to [0, 1]. For enhanced multi-frame files the
per-frame (else shared) functional groups' Pixel Value Transformation and Frame VOI LUT are looked up here
(pydicom reads only the top level) and handed to pydicom as a per-frame view. MONOCHROME1 is inverted so
bright always means high signal. With `window="auto"` the file's VOI is used when present, else per-slice
min/max. "minmax" is per-slice min/max;
"full" maps the whole range the stored bits can hold (after rescale) to [0, 1]. NIfTI: the same, with
the header's display range cal_min/cal_max playing the VOI window's part and scl_slope/scl_inter the
rescale's. 8-bit unsigned sources with no rescale and no window applied stay uint8, like 8-bit PNGs.

Slices. A multi-frame DICOM gives one slice per frame, in file order. A NIfTI volume is first reoriented
to the closest RAS+ orientation (as `nibabel.as_closest_canonical` does), so its last axis runs
inferior -> superior whatever the storage order; slice k is that axis' k-th axial plane, shown the way
DICOM shows axial images (radiological convention): rows run anterior -> posterior, columns run from the
patient's right to their left. Volume slices are named "path#slice=N".

Bounded decoding. The number of voxels to decode is checked against a voxel budget (`max_voxels`, default
`DEFAULT_MAX_VOXELS`, or the MADCLIP_MAX_VOXELS environment variable) from the header alone, before any
pixel is decoded; a single slice (`slice_index`) decodes only that slice (nibabel's array proxy reads one
plane; pydicom decodes one frame), so a huge volume can still be looked at slice by slice.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import InputError, MadclipError
from .scan import (
    ScanImage,
    check_finite,
    check_regular_file,
    check_size,
    check_window,
    one_line,
    window_to_unit,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_VOXELS = 1 << 28  # 268M voxels: a 512 x 512 x 1024 CT; 1-2 GB once decoded and windowed
MAX_VOXELS_ENV = "MADCLIP_MAX_VOXELS"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _require(module: str, path: str, what: str) -> ModuleType:
    """Import an optional reader, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MadclipError(
            f'{path}: reading {what} needs {module}; install it with: pip install "madclip[medical]"'
        ) from None


_budget_override: int | None = None  # set by a CLI's --max-voxels for the readers of that run


def set_max_voxels(max_voxels: int | None) -> None:
    """Set (None: clear) the process-wide voxel budget that readers use when not given one explicitly."""
    global _budget_override
    _budget_override = None if max_voxels is None else voxel_budget(max_voxels)


def voxel_budget(max_voxels: int | None = None) -> int:
    """The voxel budget: `max_voxels` when given, else `set_max_voxels`'s, else $MADCLIP_MAX_VOXELS, else
    DEFAULT_MAX_VOXELS."""
    if max_voxels is None and _budget_override is not None:
        return _budget_override
    if max_voxels is None:
        raw = os.environ.get(MAX_VOXELS_ENV)
        if raw is None or raw.strip() == "":
            return DEFAULT_MAX_VOXELS
        try:
            max_voxels = int(raw)
        except ValueError:
            raise MadclipError(f"{MAX_VOXELS_ENV}={raw!r} is not a whole number of voxels") from None
    if int(max_voxels) <= 0:
        raise MadclipError(f"the voxel budget must be a positive number of voxels, got {max_voxels}")
    return int(max_voxels)


def check_voxels(path: str, shape: tuple[int, ...], n_decode: int, max_voxels: int | None = None) -> None:
    """Refuse, from the header's `shape`, to decode `n_decode` voxels over the budget (before any decoding)."""
    budget = voxel_budget(max_voxels)
    if n_decode > budget:
        dims = " x ".join(str(int(d)) for d in shape)
        raise InputError(
            f"{path}: volume of {dims} needs {n_decode} voxels decoded, over the budget of {budget} "
            f"(raise it with --max-voxels or {MAX_VOXELS_ENV}, or read one slice with --slice)"
        )


def _select(path: str, n: int, slice_index: int | None) -> list[int]:
    """Slice indices to return: all of them, or the one asked for (checked against the count)."""
    if slice_index is None:
        return list(range(n))
    if not 0 <= slice_index < n:
        raise InputError(
            f"{path}: slice {slice_index} out of range (the scan has {n} slice{'s' if n != 1 else ''}: 0..{n - 1})"
        )
    return [slice_index]


def _source(path: str, n: int, i: int) -> str:
    return f"{path}#slice={i}" if n > 1 else path


def _linear(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] linearly to [0, 1], clipping outside."""
    v = (values.astype(np.float64) - lo) / (hi - lo)
    return np.clip(v, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------- DICOM


def first_float(value: object) -> float | None:
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


def frame_item(ds, frame: int, sequence: str):
    """The first item of `sequence` in the per-frame functional group of `frame`, else the shared group."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and len(seq) > index:
            inner = seq[index].get(sequence)
            if inner is not None and len(inner) > 0:
                return inner[0]
    return None


_MODALITY_KEYWORDS = ("RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence")
_VOI_KEYWORDS = ("WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence")
_PIXEL_DESCRIPTION = (
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PhotometricInterpretation",
    "SamplesPerPixel",
)


def frame_view(ds, frame: int):
    """A small pydicom Dataset holding frame `frame`'s modality and VOI attributes at the top level.

    pydicom's LUT functions read Rescale/Window/LUT attributes from the top level only; enhanced multi-frame
    files keep them per frame (Pixel Value Transformation, Frame VOI LUT functional groups). Per-frame
    values win over shared ones, which win over top-level ones, as PS3.3 C.7.6.16 says.
    """
    from pydicom.dataset import Dataset

    view = Dataset()
    if getattr(ds, "file_meta", None) is not None:  # LUT Data (OW) is raw bytes: pydicom needs the byte order
        view.file_meta = ds.file_meta
    if ds.original_encoding[0] is not None:
        view.set_original_encoding(*ds.original_encoding)
    for kw in _PIXEL_DESCRIPTION + _MODALITY_KEYWORDS + _VOI_KEYWORDS:
        if kw in ds:
            setattr(view, kw, ds[kw].value)
    for sequence, keywords in (
        ("PixelValueTransformationSequence", _MODALITY_KEYWORDS),
        ("FrameVOILUTSequence", _VOI_KEYWORDS),
    ):
        item = frame_item(ds, frame, sequence)
        if item is not None and any(kw in item for kw in keywords):
            for kw in keywords:  # a functional group replaces the top level's set of attributes as a whole
                if kw in view:
                    delattr(view, kw)
            for kw in keywords:
                if kw in item:
                    setattr(view, kw, item[kw].value)
    return view


def _has_rescale(view) -> bool:
    slope, intercept = first_float(view.get("RescaleSlope")), first_float(view.get("RescaleIntercept"))
    return "ModalityLUTSequence" in view or (slope not in (None, 1.0)) or (intercept not in (None, 0.0))


def _has_voi(view) -> bool:
    return "VOILUTSequence" in view or ("WindowCenter" in view and "WindowWidth" in view)


def voi_to_unit(values: np.ndarray, view) -> np.ndarray | None:
    """Modality values -> [0, 1] through pydicom's `apply_voi_lut` (None when the file's VOI is unusable).

    pydicom maps a window onto the stored bits' output range, and a VOI LUT onto its entries' range
    [0, 2^bits - 1]; either range is read off and scaled to [0, 1] here.
    """
    from pydicom.pixels import apply_voi_lut

    try:
        if "VOILUTSequence" in view:
            out = apply_voi_lut(values, view, index=0, prefer_lut=True)
            bits = int(view.VOILUTSequence[0].LUTDescriptor[2])
            lo, hi = 0.0, float(2**bits - 1)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # SIGMOID's exp overflows on the range probe
                center, width = first_float(view.get("WindowCenter")), first_float(view.get("WindowWidth"))
                if center is None or width is None:
                    return None
                probe = np.array([center - 1e6 * abs(width) - 1.0, center + 1e6 * abs(width) + 1.0])
                lo, hi = (float(v) for v in apply_voi_lut(probe, view, index=0, prefer_lut=False))
                out = apply_voi_lut(values.astype(np.float64), view, index=0, prefer_lut=False)
    except Exception as exc:  # invalid width, malformed LUT descriptor, unknown VOI LUT Function ...
        log.warning("unusable DICOM VOI (%s: %s); using per-slice min/max", type(exc).__name__, one_line(exc))
        return None
    if not hi > lo:
        return None
    return np.clip((np.asarray(out, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _dcmread(pydicom: ModuleType, path: str, header_only: bool = False):
    """Read a DICOM file (pixel data deferred, not loaded); non-Part 10 files are retried leniently.

    -> (dataset, forced). With `header_only` the pixel data element is not read at all.
    """
    kwargs = {"stop_before_pixels": True} if header_only else {"defer_size": "1 MB"}
    try:
        return pydicom.dcmread(path, **kwargs), False
    except pydicom.errors.InvalidDicomError:
        pass
    except Exception as exc:
        raise InputError(f"{path}: cannot read DICOM ({type(exc).__name__}: {one_line(exc)})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, force=True, **kwargs), True
    except Exception:
        raise InputError(f"{path}: not a DICOM file") from None


_NON_IMAGE_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.481.",  # RT Dose, Structure Set, Plan, Ion Plan, treatment records (not RT Image)
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, registrations, fiducials, Segmentation, surface segmentation
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF / CDA / STL ...
    "1.2.840.10008.5.1.4.1.1.68.",  # surface storage
    "1.2.840.10008.5.1.4.1.1.67",  # real world value mapping
)
_IMAGE_EXCEPTIONS = ("1.2.840.10008.5.1.4.1.1.481.1",)  # RT Image Storage: a projection image


def check_image_sop_class(path: str, ds: Any) -> None:
    """Refuse, in one line naming the SOP class, DICOM objects that are not images to score.

    RT Dose/Plan/Structure Set, Segmentation, SR, presentation states, registrations, waveforms, encapsulated
    documents and surfaces: some carry pixel data (a dose grid, a segment mask), none is a scan."""
    uid = str(
        ds.get("SOPClassUID", "")
        or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")
        or ""
    )
    if uid and uid not in _IMAGE_EXCEPTIONS and uid.startswith(_NON_IMAGE_PREFIXES):
        from pydicom.uid import UID

        name = UID(uid).name
        name = name if name and name != uid else "non-image"
        raise InputError(
            f"{path}: a DICOM {name} object (SOP class {uid}), not an image to score; not supported"
        )


def read_dicom_header(path: str | os.PathLike):
    """The dataset of a DICOM file without its pixel data (for grouping series and checking sizes)."""
    path = os.fspath(path)
    check_regular_file(path)
    pydicom = _require("pydicom", path, "DICOM")
    ds, forced = _dcmread(pydicom, path, header_only=True)
    if forced and "Rows" not in ds:
        raise InputError(f"{path}: not a DICOM file")
    check_image_sop_class(path, ds)
    return ds


def _stored_range(ds, bits: int) -> tuple[float, float]:
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1.0
    return 0.0, 2.0**bits - 1.0


def _decode_frames(ds, path: str, n: int, frames: list[int], rows: int, cols: int, spp: int) -> np.ndarray:
    """Decode only `frames` -> [len(frames), R, C(, spp)]; one frame of a multi-frame file decodes alone."""
    from pydicom.pixels import pixel_array

    try:
        if n > 1 and len(frames) == 1:
            arr = pixel_array(ds, index=frames[0])[None]  # [1, R, C(, 3)]
        else:
            arr = ds.pixel_array  # [R, C] / [F, R, C], with a trailing [.., 3] for colour
            arr = arr.reshape((n, rows, cols) + ((spp,) if spp > 1 else ()))[frames]
    except Exception as exc:
        raise InputError(
            f"{path}: cannot decode DICOM pixel data ({type(exc).__name__}: {one_line(exc)})"
        ) from None
    return arr.reshape((len(frames), rows, cols) + ((spp,) if spp > 1 else ()))


def read_dicom(
    path: str | os.PathLike,
    slice_index: int | None = None,
    window: str = "auto",
    max_voxels: int | None = None,
) -> list[ScanImage]:
    """Read a DICOM file into one ScanImage per frame (or just frame `slice_index`).

    The frames to decode are checked against the voxel budget from the header first (see `check_voxels`).
    """
    path = os.fspath(path)
    check_window(window)
    check_regular_file(path)
    pydicom = _require("pydicom", path, "DICOM")
    ds, forced = _dcmread(pydicom, path)
    check_image_sop_class(path, ds)
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise InputError(f"{path}: {'not a DICOM file' if forced else 'DICOM file has no pixel data'}")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    check_size(path, cols, rows)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    frames = _select(path, n, slice_index)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    check_voxels(path, (n, rows, cols), len(frames) * rows * cols * spp, max_voxels)
    arr = _decode_frames(ds, path, n, frames, rows, cols, spp)  # [len(frames), R, C(, 3)]
    check_finite(path, arr)
    bits_alloc = int(ds.get("BitsAllocated", arr.dtype.itemsize * 8) or arr.dtype.itemsize * 8)
    bits = int(ds.get("BitsStored", bits_alloc) or bits_alloc)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()

    if spp > 1:  # colour (pydicom converts YBR to RGB): no rescale or VOI window applies
        if spp != 3:
            raise InputError(f"{path}: unsupported DICOM with {spp} samples per pixel")
        out = []
        for j, i in enumerate(frames):
            rgb = arr[j]  # [R, C, 3]
            px = (
                rgb
                if rgb.dtype == np.uint8
                else window_to_unit(rgb, "full" if window == "full" else "minmax", 2.0**bits - 1)
            )
            out.append(ScanImage(np.ascontiguousarray(px), _source(path, n, i), bits))
        return out

    from pydicom.pixels import apply_modality_lut

    out = []
    for j, i in enumerate(frames):
        stored = arr[j]  # [R, C]
        view = frame_view(ds, i)
        rescaled = _has_rescale(view)
        try:
            values = np.asarray(apply_modality_lut(stored, view)) if rescaled else stored  # [R, C]
        except Exception as exc:
            raise InputError(
                f"{path}: invalid DICOM modality LUT/rescale ({type(exc).__name__}: {one_line(exc)})"
            ) from None
        check_finite(path, values)
        unit = voi_to_unit(values, view) if window == "auto" and _has_voi(view) else None
        if stored.dtype == np.uint8 and not rescaled and unit is None:
            px = 255 - stored if photometric == "MONOCHROME1" else stored  # uint8 [R, C], the PNG path
            out.append(ScanImage(np.ascontiguousarray(px), _source(path, n, i), bits))
            continue
        if unit is None:
            if window == "full" and stored.dtype.kind in "iu" and "ModalityLUTSequence" not in view:
                slope = first_float(view.get("RescaleSlope"))
                intercept = first_float(view.get("RescaleIntercept"))
                slope, intercept = (
                    (1.0 if slope is None else slope),
                    (0.0 if intercept is None else intercept),
                )
                ends = sorted(v * slope + intercept for v in _stored_range(ds, bits))
                unit = (
                    _linear(values, ends[0], ends[1])
                    if ends[1] > ends[0]
                    else np.zeros(values.shape, np.float32)
                )
            else:  # "minmax", "auto" without a VOI, "full" on float pixel data or a Modality LUT
                unit = window_to_unit(values, "full" if window == "full" else "minmax")
        if photometric == "MONOCHROME1":
            unit = 1.0 - unit
        out.append(ScanImage(np.ascontiguousarray(unit, dtype=np.float32), _source(path, n, i), bits))
    return out


# ----------------------------------------------------------------------------------------------- NIfTI


@dataclass(frozen=True)
class NiftiVolume:
    """A NIfTI volume read as axial slices, with what is needed to write a map back on its own grid."""

    slices: list[ScanImage]  # axial slices k = 0..n-1 (inferior -> superior), or just the one asked for
    shape: tuple[int, int, int]  # the stored (spatial) shape [X, Y, Z] of the volume that was read
    affine: np.ndarray  # the file's 4x4 voxel -> RAS+ mm affine
    ornt: np.ndarray  # nibabel orientation: storage axis -> closest RAS+ axis and flip
    header: Any  # the nibabel header (a copy goes into the output map)
    nonfinite: int = 0  # NaN/inf voxels in the volume read (scored as background, masked in the map)
    nonfinite_mask: np.ndarray | None = None  # bool, stored shape [X, Y, Z]: where those voxels are
    positions_mm: list[float] | None = None  # slice k's centre along the slice axis (mm, scanner space)

    def to_storage(self, planes: Any) -> np.ndarray:
        """Per-slice maps (Z(S) planes [Y, X] as the slices are shown) -> float32 array of the stored shape
        [X, Y, Z], filled plane by plane through a reoriented view (no whole-volume temporaries)."""
        nib = importlib.import_module("nibabel")
        out = np.zeros(self.shape, dtype=np.float32)
        ras = nib.orientations.apply_orientation(out, self.ornt)  # a view of `out`: [X(R), Y(A), Z(S)]
        for k, plane in enumerate(planes):
            ras[::-1, ::-1, k] = np.asarray(plane, dtype=np.float32).T
        return out


def nifti_header(path: str, what: str = "file"):
    """Open a NIfTI lazily (header only, no voxel read) -> (image, shape without trailing singleton axes)."""
    nib = _require("nibabel", path, "NIfTI")
    try:
        quiet = not logging.getLogger().isEnabledFor(logging.DEBUG)  # nibabel's header fixes print unless -v
        with nib.imageglobals.LoggingOutputSuppressor() if quiet else contextlib.nullcontext():
            img = nib.load(path)
    except Exception as exc:
        raise InputError(
            f"{path}: not a readable NIfTI {what} ({type(exc).__name__}: {one_line(exc)})"
        ) from None
    check_nifti_image(path, img)
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return img, shape


_NIFTI_INTENTS_REFUSED = {
    1007: "a vector field (NIFTI_INTENT_VECTOR)",
    1008: "a point set (NIFTI_INTENT_POINTSET)",
    1009: "a triangle mesh (NIFTI_INTENT_TRIANGLE)",
    1005: "a symmetric-matrix field",
    1006: "a displacement field (NIFTI_INTENT_DISPVECT)",
    2006: "a displacement field",
    2003: "an RGB vector image (NIFTI_INTENT_RGB_VECTOR)",
}


def check_nifti_image(path: str, img: Any) -> None:
    """Refuse, in one line naming the format, what is not a scalar NIfTI image with a usable affine.

    CIFTI-2 (brainordinates, no voxel grid; NIfTI intent codes 3000-3099), GIFTI/surface files and other
    formats nibabel opens, NIfTI intents that are not images (vectors, meshes, point sets), and a
    qform/sform that is not finite or is singular (no position for the voxels)."""
    nib = importlib.import_module("nibabel")
    kind = type(img).__name__
    if "Cifti2" in kind:
        raise InputError(f"{path}: a CIFTI-2 file (grayordinates, not a voxel image); not supported")
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image, nib.Nifti1Pair, nib.Nifti2Pair)):
        name = {"GiftiImage": "a GIFTI surface/data file"}.get(kind, f"a {kind.replace('Image', '')} file")
        raise InputError(f"{path}: {name}, not a NIfTI image; not supported")
    header = img.header
    intent = int(header.get("intent_code", 0))
    if 3000 <= intent <= 3099:
        raise InputError(
            f"{path}: a CIFTI-2 file (NIfTI intent {intent}, grayordinates, not a voxel image); not supported"
        )
    if intent in _NIFTI_INTENTS_REFUSED:
        raise InputError(f"{path}: {_NIFTI_INTENTS_REFUSED[intent]}, not a scalar image; not supported")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise InputError(
            f"{path}: NIfTI orientation (qform/sform) holds NaN or infinite values; the voxels have "
            "no position"
        )
    if abs(float(np.linalg.det(affine[:3, :3]))) < 1e-12:
        raise InputError(
            f"{path}: NIfTI orientation (qform/sform) is singular (e.g. all zero); the voxels have "
            "no position"
        )


def nifti_open(path: str, volume_index: int | None):
    """Open a NIfTI header (no voxel read) -> (image, spatial shape [X, Y, Z], index of the 4th axis or None)."""
    img, shape = nifti_header(path)
    if len(shape) == 4:
        if volume_index is None:
            raise InputError(
                f"{path}: NIfTI of shape {shape} is 4-D ({shape[3]} volumes); pick one with "
                f"--volume-index 0..{shape[3] - 1}"
            )
        if not 0 <= volume_index < shape[3]:
            raise InputError(
                f"{path}: volume index {volume_index} out of range (the file has {shape[3]} "
                f"volumes: 0..{shape[3] - 1})"
            )
    elif len(shape) not in (2, 3):
        raise InputError(f"{path}: NIfTI of shape {shape} is not a 2-D image, 3-D volume or 4-D series")
    elif volume_index not in (None, 0):
        raise InputError(f"{path}: volume index {volume_index} given but the file holds one volume")
    raw_dtype = np.dtype(img.get_data_dtype())
    if raw_dtype.fields is not None or raw_dtype.kind not in "iuf":
        raise InputError(f"{path}: unsupported NIfTI data type {raw_dtype}")
    spatial = shape[:3] + (1,) * (3 - min(3, len(shape)))
    return img, tuple(spatial), (volume_index if len(shape) == 4 else None)


def _nifti_voxels(
    img,
    path: str,
    spatial: tuple[int, int, int],
    vol4: int | None,
    storage_axis: int | None,
    index: int | None,
) -> np.ndarray:
    """Read voxels through nibabel's array proxy: the whole volume, or one plane of `storage_axis` only."""
    ndim = len(img.shape)
    slicer: list[Any] = [slice(None)] * ndim
    for extra in range(3, ndim):
        slicer[extra] = 0
    if vol4 is not None:
        slicer[3] = vol4
    keep = list(spatial)
    if storage_axis is not None and storage_axis < ndim:
        slicer[storage_axis] = slice(index, index + 1)  # the proxy reads only this plane's bytes
        keep[storage_axis] = 1
    try:
        proxy = img.dataobj
        whole = storage_axis is None and ndim == 3 and hasattr(proxy, "get_unscaled")
        slope, inter = (
            (float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))) if whole else (1, 0)
        )
        if whole and (slope != 1.0 or inter != 0.0) and np.isfinite([slope, inter]).all():
            # nibabel would scale in float64 (2 x a float32 volume, plus a temporary): scale in float32, in place
            data = np.asarray(proxy.get_unscaled()).astype(np.float32)
            data *= np.float32(slope)
            data += np.float32(inter)
        else:
            data = np.asanyarray(proxy[tuple(slicer)])  # scl_slope / scl_inter applied by nibabel
    except Exception as exc:
        raise InputError(
            f"{path}: cannot read NIfTI voxel data ({type(exc).__name__}: {one_line(exc)})"
        ) from None
    return data.reshape(keep)  # [X, Y, Z] (the read axis of length 1 for a single plane)


def read_nifti_volume(
    path: str | os.PathLike,
    slice_index: int | None = None,
    window: str = "auto",
    volume_index: int | None = None,
    max_voxels: int | None = None,
) -> NiftiVolume:
    """Read a NIfTI volume (.nii / .nii.gz) into axial slices (all, or just `slice_index`) plus its geometry.

    4-D files need `volume_index`. The voxels to decode are checked against the budget from the header
    before any is read; a single slice reads only that plane from disk.
    """
    path = os.fspath(path)
    check_window(window)
    check_regular_file(path)
    img, shape3, vol4 = nifti_open(path, volume_index)
    nib = importlib.import_module("nibabel")
    raw_dtype = np.dtype(img.get_data_dtype())
    ornt = nib.orientations.io_orientation(img.affine)  # storage axes -> closest RAS+ axes
    ras_shape = [0, 0, 0]
    for axis, (target, _flip) in enumerate(ornt):
        ras_shape[int(target)] = shape3[axis]
    check_size(path, ras_shape[0], ras_shape[1])  # each axial slice is [Y, X] after the transpose below
    n = ras_shape[2]
    frames = _select(path, n, slice_index)
    check_voxels(path, tuple(img.shape), len(frames) * ras_shape[0] * ras_shape[1], max_voxels)

    if slice_index is None:
        data = _nifti_voxels(img, path, shape3, vol4, None, None)  # [X, Y, Z] stored
        ras_index = {k: k for k in frames}
    else:  # the RAS slice -> the stored plane that holds it
        axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
        stored = slice_index if ornt[axis, 1] > 0 else n - 1 - slice_index
        data = _nifti_voxels(img, path, shape3, vol4, axis, stored)
        ras_index = {slice_index: 0}
    nonfinite, mask = 0, None
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():  # resampled data: NaN outside the field of view -> background, masked in the map
            if not finite.any():
                raise InputError(f"{path}: every voxel read is NaN or infinite; nothing to score")
            mask = ~finite
            nonfinite = int(mask.sum())
            fill = data[finite].min()
            data = np.where(finite, data, fill)
            log.info(
                "%s: %d non-finite voxels read as background (%g) and masked in the map",
                path,
                nonfinite,
                float(fill),
            )
        del finite
    vol = nib.orientations.apply_orientation(data, ornt)  # [X(R), Y(A), Z(S)] (Z of length 1 for one slice)
    slope = first_float(getattr(img.dataobj, "slope", 1.0))
    inter = first_float(getattr(img.dataobj, "inter", 0.0))
    slope, inter = (1.0 if slope is None else slope), (0.0 if inter is None else inter)
    scaled = slope != 1.0 or inter != 0.0
    cal = (float(img.header.get("cal_min", 0.0)), float(img.header.get("cal_max", 0.0)))
    use_cal = window == "auto" and np.isfinite(cal).all() and cal[1] > cal[0]
    bits = int(img.header.get("bitpix", raw_dtype.itemsize * 8))

    out = []
    for k in frames:
        plane = np.ascontiguousarray(
            vol[::-1, ::-1, ras_index[k]].T
        )  # [Y, X]: rows anterior->posterior, cols right->left
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
    affine = np.asarray(img.affine, dtype=np.float64)
    return NiftiVolume(
        out,
        shape3,
        affine,
        ornt,
        img.header,
        nonfinite,
        mask if slice_index is None else None,
        _slice_positions(affine, shape3, ornt),
    )


def _slice_positions(affine: np.ndarray, shape3: tuple[int, int, int], ornt: np.ndarray) -> list[float]:
    """Axial slice k's centre, projected on the slice axis' direction (inferior -> superior), in mm."""
    axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    n = shape3[axis]
    unit = affine[:3, axis] / np.linalg.norm(affine[:3, axis]) * ornt[axis, 1]
    centre = (np.asarray(shape3, dtype=np.float64) - 1) / 2
    out = []
    for k in range(n):
        idx = centre.copy()
        idx[axis] = k if ornt[axis, 1] > 0 else n - 1 - k
        out.append(round(float(np.dot(affine[:3, :3] @ idx + affine[:3, 3], unit)), 4))
    return out


def read_nifti(
    path: str | os.PathLike,
    slice_index: int | None = None,
    window: str = "auto",
    volume_index: int | None = None,
    max_voxels: int | None = None,
) -> list[ScanImage]:
    """Read a NIfTI volume (.nii / .nii.gz) into axial slices (all, or just `slice_index`)."""
    return read_nifti_volume(path, slice_index, window, volume_index, max_voxels).slices
