"""Reading scans and masks into arrays, with one-line errors naming the file.

`read_image` returns a ScanImage whose pixels are uint8 for 8-bit sources (so preprocessing can take the
reference's exact uint8 path) or float32 in [0, 1] for windowed higher-bit-depth sources.
`read_scans` adds DICOM and NIfTI (see `madclip_runtime.scans.medical`) and returns one ScanImage per slice;
`expand_inputs` turns command-line arguments (files, directories, globs) into a list of scan files.

Safety: image sizes are checked from the header (PIL opens lazily) before any pixel is decoded, PIL's
decompression-bomb warning is an error here, and truncated files fail (we never enable
`ImageFile.LOAD_TRUNCATED_IMAGES`).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import warnings
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageFile

from ..errors import InputError
from .scan import (  # noqa: F401  (re-exported: the public names of this module before the split)
    MAX_PIXELS,
    MIN_SIDE,
    WINDOW_MODES,
    ScanImage,
    check_finite,
    check_regular_file,
    check_size,
    check_window,
    one_line,
    window_to_unit,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_EXTENSIONS = (".dcm", ".dicom")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
SCAN_EXTENSIONS = IMAGE_EXTENSIONS + DICOM_EXTENSIONS + NIFTI_EXTENSIONS

# PIL modes we turn into grey (L) or RGB uint8; everything else except the high-bit-depth modes is refused.
_TO_RGB = ("P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
_TO_GREY = ("1", "LA", "La")
_HIGH_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _pil_to_pixels(img: Image.Image, path: str, window: str) -> ScanImage:
    mode = img.mode
    if mode in _TO_RGB:
        img = img.convert("RGB")  # alpha dropped (not composited), palette expanded
    elif mode in _TO_GREY:
        img = img.convert("L")
    mode = img.mode
    if mode in ("L", "RGB"):
        return ScanImage(np.asarray(img, dtype=np.uint8), path, 8)
    if mode in _HIGH_BIT:
        arr = np.asarray(img)  # uint16 for I;16*, int32 for I, float32 for F; [H, W]
        check_finite(path, arr)
        if mode == "F":
            bits, dtype_max = 32, None
        elif mode.startswith("I;16") or (arr.size and arr.min() >= 0 and arr.max() <= 65535):
            bits, dtype_max = 16, 65535.0
        else:
            bits, dtype_max = 32, float(np.iinfo(np.int32).max)
        return ScanImage(window_to_unit(arr, "minmax" if window == "auto" else window, dtype_max), path, bits)
    raise InputError(
        f"{path}: unsupported image mode {mode!r} (expected grey, RGB, RGBA, palette, 16-bit or float)"
    )


def read_image(path: str | os.PathLike, window: str = "auto") -> ScanImage:
    """Read a 2-D image file (PNG, JPEG, TIFF, BMP; 8 or 16 bit or float; grey, RGB, RGBA, LA, palette).

    Multi-page files give their first page. Any problem is an InputError with one line naming the file.
    """
    path = os.fspath(path)
    check_window(window)
    check_regular_file(path)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        log.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is enabled by some other code; truncated files may load"
        )
    with _decoded(path) as img:
        return _pil_to_pixels(img, path, window)


_NON_IMAGE_SUFFIXES = {
    ".gii": "a GIFTI surface/data file",
    ".surf.gii": "a GIFTI surface file",
    ".pial": "a FreeSurfer surface",
    ".white": "a FreeSurfer surface",
    ".inflated": "a FreeSurfer surface",
    ".sphere": "a FreeSurfer surface",
    ".vtk": "a VTK mesh",
    ".vtp": "a VTK mesh",
    ".stl": "an STL mesh",
    ".obj": "an OBJ mesh",
    ".ply": "a PLY mesh",
    ".trk": "a TrackVis tractogram",
    ".tck": "an MRtrix tractogram",
}


def non_image_format(path: str) -> str | None:
    """The name of a known non-image format (surfaces, meshes, tractograms) from the file name, else None."""
    low = os.path.basename(path).lower()
    for suffix in sorted(_NON_IMAGE_SUFFIXES, key=len, reverse=True):
        if low.endswith(suffix):
            return _NON_IMAGE_SUFFIXES[suffix]
    return None


@contextlib.contextmanager
def _decoded(path: str) -> Iterator[Image.Image]:
    """A PIL image opened lazily, its size checked from the header before decoding (bombs refused), then
    loaded; every PIL failure while it is in use becomes one InputError line naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", message="Palette images with Transparency")
            with Image.open(path) as img:  # lazy: reads the header only
                check_size(path, *img.size)
                img.load()
                yield img
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{path}: image too large, refusing to decode ({one_line(exc)})") from None
    except Image.UnidentifiedImageError:
        fmt = non_image_format(path)
        if fmt:
            raise InputError(f"{path}: {fmt}, not an image to score; not supported") from None
        raise InputError(f"{path}: not an image (unrecognised or unsupported format)") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, zlib.error, ValueError ... for corrupt files
        raise InputError(
            f"{path}: truncated or corrupt image ({type(exc).__name__}: {one_line(exc)})"
        ) from None


MASK_MAX_LABELS = 8  # integer masks with at most this many distinct values are label maps (nonzero = lesion)


def _raw_mask_pixels(path: str) -> np.ndarray:
    """The stored sample values of a mask image (no windowing, no scaling): [H, W] or [H, W, 3]."""
    check_regular_file(path)
    with _decoded(path) as img:
        if img.mode in ("LA", "La", "PA"):
            img = img.convert("L") if img.mode != "PA" else img.convert("P")
        elif img.mode in ("RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"):
            img = img.convert("RGB")
        return np.asarray(img)


def mask_to_unit(raw: np.ndarray, path: str = "<mask>") -> np.ndarray:
    """Stored mask values -> float32 [H, W] in [0, 1], whatever the bit depth (RGB masks: any channel).

    * two values {0, k} (k > 0: 0/1, 0/255, 0/65535, 0/1.0 ...): exactly 0/1;
    * integer label maps (at most MASK_MAX_LABELS distinct values, e.g. 0/1/2): nonzero -> 1;
    * anything else (anti-aliased or JPEG-compressed masks): divided by the dtype's maximum (floats clipped),
      so the preprocessing's 0.5 threshold splits them.
    Dividing a 0/1 mask stored in 16 bits by 65535 would make every lesion background: never done here.
    """
    m = np.asarray(raw)
    if m.dtype == np.bool_:
        return m.astype(np.float32) if m.ndim == 2 else m.any(axis=2).astype(np.float32)
    if m.ndim == 3:
        m = m.max(axis=2)
    if m.dtype.kind == "f":
        check_finite(path, m, "mask")
    values = np.unique(m)
    if values.size <= 2 and values.min() >= 0:
        top = values.max()
        return (m == top).astype(np.float32) if top > 0 else np.zeros(m.shape, np.float32)
    if m.dtype.kind in "iu":
        if values.size <= MASK_MAX_LABELS and values.min() >= 0:
            return (m > 0).astype(np.float32)
        return np.clip(m.astype(np.float32) / np.float32(np.iinfo(m.dtype).max), 0.0, 1.0)
    return np.clip(m.astype(np.float32), 0.0, 1.0)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a lesion mask as float32 [H, W] in [0, 1], at any bit depth (see `mask_to_unit`)."""
    path = os.fspath(path)
    return mask_to_unit(_raw_mask_pixels(path), path)


def _lower_name(path: str) -> str:
    return os.path.basename(path).lower()


def is_nifti_path(path: str) -> bool:
    return _lower_name(path).endswith(NIFTI_EXTENSIONS)


def has_dicom_magic(path: str) -> bool:
    """True when the file has the DICOM Part 10 preamble: "DICM" at byte 128."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_dicom_path(path: str) -> bool:
    """.dcm/.dicom by name, or any name that is not a known image/NIfTI name but starts like DICOM."""
    name = _lower_name(path)
    if name.endswith(DICOM_EXTENSIONS):
        return True
    if name.endswith(IMAGE_EXTENSIONS) or name.endswith(NIFTI_EXTENSIONS):
        return False
    return has_dicom_magic(path)


def read_scans(
    path: str | os.PathLike, slice_index: int | None = None, window: str = "auto"
) -> list[ScanImage]:
    """Read any supported scan file into 2-D slices.

    DICOM (.dcm/.dicom, or DICM magic) and NIfTI (.nii/.nii.gz) go to `madclip_runtime.scans.medical`
    (frames/axial slices; `slice_index` picks one, None = all). Other files are read by PIL as one slice,
    so `slice_index` may only be None or 0 for them.
    """
    path = os.fspath(path)
    check_window(window)
    check_regular_file(path)
    if is_nifti_path(path) or is_dicom_path(path):
        from . import medical  # lazy: pydicom/nibabel are optional

        if is_nifti_path(path):
            return medical.read_nifti(path, slice_index=slice_index, window=window)
        return medical.read_dicom(path, slice_index=slice_index, window=window)
    if slice_index not in (None, 0):
        raise InputError(f"{path}: slice {slice_index} requested but a 2-D image has only slice 0")
    return [read_image(path, window=window)]


def _is_scan_file(path: str) -> bool:
    """Supported by extension, or an extensionless file with DICOM magic (common in DICOM exports)."""
    name = _lower_name(path)
    if name.startswith("."):
        return False
    if name.endswith(SCAN_EXTENSIONS):
        return True
    return "." not in name and has_dicom_magic(path)


def _excluded_dir(path: str, exclude: set[str]) -> bool:
    from ..outputs import is_marked_dir

    return os.path.realpath(path) in exclude or is_marked_dir(path)


def _scan_files_in(directory: str, recursive: bool, exclude: set[str] = frozenset()) -> list[str]:
    """Scan files of a directory, without madclip's own outputs (`madclip_runtime.outputs`): subdirectories that
    are an --out directory or carry the results marker are not entered, result files are skipped by name."""
    from ..outputs import is_madclip_output, is_marked_dir

    found: list[str] = []
    if recursive:
        for root, dirs, names in os.walk(directory):
            dirs[:] = [d for d in dirs if not _excluded_dir(os.path.join(root, d), exclude)]
            marked = is_marked_dir(root)
            found += [
                p for p in (os.path.join(root, n) for n in names) if not is_madclip_output(p, marked or None)
            ]
    else:
        marked = is_marked_dir(directory)
        found = [
            p
            for p in (os.path.join(directory, n) for n in os.listdir(directory))
            if not is_madclip_output(p, marked or None)
        ]
    return sorted(p for p in found if os.path.isfile(p) and _is_scan_file(p))


def expand_inputs(inputs: Sequence[str], recursive: bool = False, exclude: Sequence[str] = ()) -> list[str]:
    """Command-line inputs -> scan file paths, in order, without duplicates.

    Files are kept as given (reading reports what is wrong with them); directories expand to their
    supported scan files, sorted (`recursive` descends into subdirectories); glob patterns expand with
    `glob.glob` (`**` needs `recursive`) to the matching scan files (other files, e.g. a manifest.json,
    are skipped), matched directories expanding as above. A pattern matching no scan, a directory without
    scans or a path that does not exist is an InputError naming it.

    madclip's own outputs are never picked up by directory or glob expansion (`madclip_runtime.outputs`):
    `exclude` (e.g. the --out directory) and marked results directories below an input are not entered, and
    result files (`*_overlay.png`, `*_map.png`, `*_map.npy` beside their `<stem>.json`) are skipped.
    """
    from ..outputs import is_madclip_output

    skip = {os.path.realpath(os.fspath(e)) for e in exclude}
    out: list[str] = []
    seen: set[str] = set()

    def add(p: str) -> None:
        key = os.path.normpath(p)
        if key not in seen:
            seen.add(key)
            out.append(p)

    def add_dir(d: str) -> None:
        files = _scan_files_in(d, recursive, skip)
        if not files:
            exts = " ".join(SCAN_EXTENSIONS)
            where = "or its subdirectories" if recursive else "(subdirectories not searched)"
            raise InputError(f"{d}: no scan files ({exts}) in this directory {where}")
        for f in files:
            add(f)

    for raw in inputs:
        item = os.path.expanduser(os.fspath(raw))
        if os.path.isfile(item):
            add(item)
        elif os.path.isdir(item):
            add_dir(item)
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=recursive))
            if not matches:
                raise InputError(f"{item}: no files match this pattern")
            files = []
            for m in matches:
                if os.path.isdir(m):
                    if not _excluded_dir(m, skip):
                        files.extend(_scan_files_in(m, recursive, skip))
                elif (
                    _is_scan_file(m)
                    and not is_madclip_output(m)
                    and os.path.realpath(os.path.dirname(m) or ".") not in skip
                ):
                    files.append(m)
            if not files:
                raise InputError(f"{item}: {len(matches)} paths match this pattern but none is a scan file")
            for f in files:
                add(f)
        else:
            raise InputError(f"{item}: no such file or directory")
    return out
