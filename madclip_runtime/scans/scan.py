"""The scan types and checks shared by every reader: `ScanImage`, size/finiteness/window checks, windowing.

A leaf module (numpy only): `madclip_runtime.scans.imageio` (2-D images, dispatch) and `madclip_runtime.scans.medical`
(DICOM, NIfTI) both import it, so neither has to import the other's module at load time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

WINDOW_MODES = ("auto", "minmax", "full")

MIN_SIDE = 8  # smaller images are almost certainly not scans (and break the 240x240 resize's meaning)
MAX_PIXELS = 100_000_000  # per 2-D image/slice; checked from the header before decoding


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


def one_line(text: object) -> str:
    """Collapse a (possibly multi-line) message from a third-party library into one line."""
    return " ".join(str(text).split())


def check_window(window: str) -> None:
    if window not in WINDOW_MODES:
        raise ValueError(f"unknown window {window!r}; expected one of {WINDOW_MODES}")


def check_regular_file(path: str) -> None:
    """Missing, directory and zero-byte inputs -> InputError before any reader touches them."""
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, expected a scan file")
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise InputError(f"{path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: empty file (0 bytes)")


def check_size(path: str, width: int, height: int) -> None:
    """Reject images too small to be scans or too large to decode safely (call before decoding)."""
    if width * height > MAX_PIXELS:
        raise InputError(
            f"{path}: image is {width}x{height} = {width * height} pixels, over the limit of {MAX_PIXELS} "
            "(refusing to decode; possible decompression bomb)"
        )
    if min(width, height) < MIN_SIDE:
        raise InputError(f"{path}: image is {width}x{height} pixels; need at least {MIN_SIDE} on each side")


def check_finite(path: str, values: np.ndarray, what: str = "pixel") -> None:
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise InputError(f"{path}: contains NaN or infinite {what} values")


def window_to_unit(values: np.ndarray, mode: str, dtype_max: float | None = None) -> np.ndarray:
    """High-bit-depth values -> float32 [0, 1].

    "minmax": per image (a constant image gives zeros). "full": divide by `dtype_max`; float sources
    (dtype_max None) are taken to be in [0, 1] already and only clipped. "auto" means "minmax" here;
    the DICOM/NIfTI readers resolve "auto" to the file's display window first when it has one.
    """
    v = values.astype(np.float32, copy=False)
    if mode == "full":
        if dtype_max:
            return np.clip(v / np.float32(dtype_max), 0.0, 1.0)
        return np.clip(v, 0.0, 1.0)
    lo, hi = float(np.min(v)), float(np.max(v))
    if hi <= lo:
        return np.zeros_like(v, dtype=np.float32)
    return np.clip((v - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)
