"""Reading scans and masks into arrays, with one-line errors naming the file.

`read_image` returns a ScanImage whose pixels are uint8 for 8-bit sources (so preprocessing can take the
reference's exact uint8 path) or float32 in [0, 1] for windowed higher-bit-depth sources.
`read_scans` adds DICOM and NIfTI (see `madclip_runtime.medical`) and returns one ScanImage per slice;
`expand_inputs` turns command-line arguments (files, directories, globs) into a list of scan files.

Safety: image sizes are checked from the header (PIL opens lazily) before any pixel is decoded, PIL's
decompression-bomb warning is an error here, and truncated files fail (we never enable
`ImageFile.LOAD_TRUNCATED_IMAGES`).
"""
from __future__ import annotations

import glob
import logging
import os
import warnings
from typing import Sequence

import numpy as np
from PIL import Image, ImageFile

from .errors import InputError
from .scan import (  # noqa: F401  (re-exported: the public names of this module before the split)
    MAX_PIXELS, MIN_SIDE, WINDOW_MODES, ScanImage, check_finite, check_regular_file, check_size, check_window,
    one_line, window_to_unit,
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
    raise InputError(f"{path}: unsupported image mode {mode!r} (expected grey, RGB, RGBA, palette, 16-bit or float)")


def read_image(path: str | os.PathLike, window: str = "auto") -> ScanImage:
    """Read a 2-D image file (PNG, JPEG, TIFF, BMP; 8 or 16 bit or float; grey, RGB, RGBA, LA, palette).

    Multi-page files give their first page. Any problem is an InputError with one line naming the file.
    """
    path = os.fspath(path)
    check_window(window)
    check_regular_file(path)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is enabled by some other code; truncated files may load")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", message="Palette images with Transparency")
            with Image.open(path) as img:  # lazy: reads the header only
                check_size(path, *img.size)
                img.load()
                return _pil_to_pixels(img, path, window)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{path}: image too large, refusing to decode ({one_line(exc)})") from None
    except Image.UnidentifiedImageError:
        raise InputError(f"{path}: not an image (unrecognised or unsupported format)") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, zlib.error, ValueError ... for corrupt files
        raise InputError(f"{path}: truncated or corrupt image ({type(exc).__name__}: {one_line(exc)})") from None


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a lesion mask as float32 [H, W] scaled to [0, 1] (RGB masks: any channel).

    8-bit masks are divided by 255 (BMAD masks are 0/255), except label masks stored as 0/1, which are kept as
    0/1: dividing those by 255 would silently turn every lesion into background.
    """
    scan = read_image(path, window="full")
    m = scan.pixels
    if m.dtype == np.uint8:
        m = m.astype(np.float32) if m.max() == 1 else m.astype(np.float32) / 255.0
    else:
        m = m.astype(np.float32)
    if m.ndim == 3:
        m = m.max(axis=2)
    return m


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


def read_scans(path: str | os.PathLike, slice_index: int | None = None, window: str = "auto") -> list[ScanImage]:
    """Read any supported scan file into 2-D slices.

    DICOM (.dcm/.dicom, or DICM magic) and NIfTI (.nii/.nii.gz) go to `madclip_runtime.medical`
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


def _scan_files_in(directory: str, recursive: bool) -> list[str]:
    if recursive:
        found = [os.path.join(root, n) for root, dirs, names in os.walk(directory) for n in names]
    else:
        found = [os.path.join(directory, n) for n in os.listdir(directory)]
    return sorted(p for p in found if os.path.isfile(p) and _is_scan_file(p))


def expand_inputs(inputs: Sequence[str], recursive: bool = False) -> list[str]:
    """Command-line inputs -> scan file paths, in order, without duplicates.

    Files are kept as given (reading reports what is wrong with them); directories expand to their
    supported scan files, sorted (`recursive` descends into subdirectories); glob patterns expand with
    `glob.glob` (`**` needs `recursive`) to the matching scan files (other files, e.g. a manifest.json,
    are skipped), matched directories expanding as above. A pattern matching no scan, a directory without
    scans or a path that does not exist is an InputError naming it.
    """
    out: list[str] = []
    seen: set[str] = set()

    def add(p: str) -> None:
        key = os.path.normpath(p)
        if key not in seen:
            seen.add(key)
            out.append(p)

    def add_dir(d: str) -> None:
        files = _scan_files_in(d, recursive)
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
                    files.extend(_scan_files_in(m, recursive))
                elif _is_scan_file(m):
                    files.append(m)
            if not files:
                raise InputError(f"{item}: {len(matches)} paths match this pattern but none is a scan file")
            for f in files:
                add(f)
        else:
            raise InputError(f"{item}: no such file or directory")
    return out
