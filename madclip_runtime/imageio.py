"""Reading scans and masks into arrays, with one-line errors naming the file.

`read_image` returns a ScanImage whose pixels are uint8 for 8-bit sources (so preprocessing can take the
reference's exact uint8 path) or float32 in [0, 1] for windowed higher-bit-depth sources.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class ScanImage:
    pixels: np.ndarray  # uint8 [H, W] / [H, W, 3], or float32 in [0, 1] for >8-bit sources
    source: str  # file path, with "#slice=N" for volume slices
    bits: int  # bit depth of the source samples (8, 12, 16, 32)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def window_to_unit(values: np.ndarray, mode: str, dtype_max: float | None = None) -> np.ndarray:
    """High-bit-depth values -> float32 [0, 1]. "minmax" per image; "full" divides by the dtype maximum."""
    v = values.astype(np.float32, copy=False)
    if mode == "full" and dtype_max:
        return np.clip(v / float(dtype_max), 0.0, 1.0)
    lo, hi = float(np.min(v)), float(np.max(v))
    if hi <= lo:
        return np.zeros_like(v, dtype=np.float32)
    return np.clip((v - lo) / (hi - lo), 0.0, 1.0)


def _pil_to_pixels(img: Image.Image, path: str, window: str) -> ScanImage:
    mode = img.mode
    if mode in ("P", "PA", "RGBA", "LA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        img = img.convert("RGB") if mode not in ("LA",) else img.convert("L")
        mode = img.mode
    if mode == "1":
        img = img.convert("L")
        mode = "L"
    if mode in ("L", "RGB"):
        return ScanImage(np.asarray(img, dtype=np.uint8), path, 8)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        bits = 16 if mode.startswith("I;16") else 32
        if mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
            bits = 16
        dtype_max = 65535.0 if bits == 16 else None
        return ScanImage(window_to_unit(arr, "minmax" if window == "auto" else window, dtype_max), path, bits)
    raise InputError(f"{path}: unsupported image mode {mode!r}")


def read_image(path: str | os.PathLike, window: str = "auto") -> ScanImage:
    """Read a 2-D image file (PNG, JPEG, TIFF, BMP; 8 or 16 bit; grey, RGB, RGBA, palette)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    try:
        with Image.open(path) as img:
            img.load()
            return _pil_to_pixels(img, path, window)
    except InputError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt files
        raise InputError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a lesion mask as float32 [H, W] scaled to [0, 1] (RGB masks: any channel)."""
    scan = read_image(path, window="full")
    m = scan.pixels
    m = m.astype(np.float32) / 255.0 if m.dtype == np.uint8 else m.astype(np.float32)
    if m.ndim == 3:
        m = m.max(axis=2)
    return m
