"""The one preprocessing implementation, used by training, export (golden inputs) and serving.

MadCLIP (docs/METHODS.md §2): PIL bicubic resize to 240x240 (aspect not kept), RGB with grey
replicated, values in [0, 1], no CLIP mean/std normalisation by default (a switch turns it on).
8-bit sources take exactly the reference path (uint8 PIL resize, then /255). Higher bit depths are
windowed to [0, 1] by `madclip_runtime.scans.imageio` and resized in float ('F' mode) so no precision is lost.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from .scans.imageio import ScanImage

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_INTERP = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything needed to turn a scan into the model's input tensor. Stored in config.json and metadata.json."""

    image_size: int = 240
    interpolation: str = "bicubic"
    channels: str = "rgb_replicate_grey"  # grey is replicated to 3 channels; alpha dropped; palette expanded
    value_range: tuple[float, float] = (0.0, 1.0)
    normalize: str = "none"  # "none" (reference) or "clip" (CLIP mean/std)
    mean: tuple[float, float, float] = field(default=CLIP_MEAN)
    std: tuple[float, float, float] = field(default=CLIP_STD)
    # Intensity windowing for >8-bit sources and DICOM: "auto" = DICOM VOI window when the file has one,
    # else per-image min/max; "minmax" = per-image min/max; "full" = divide by the dtype's maximum.
    window: str = "auto"
    mask_threshold: float = 0.5  # masks: nearest resize, then > threshold (values scaled to [0, 1])

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERP:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if self.normalize not in ("none", "clip"):
            raise ValueError(f"unknown normalize {self.normalize!r}")
        if self.window not in ("auto", "minmax", "full"):
            raise ValueError(f"unknown window {self.window!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        d = dict(d)
        for k in ("value_range", "mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _resize_plane(plane: np.ndarray, size: int, interp: int) -> np.ndarray:
    """Resize one [H, W] plane; uint8 stays on the reference uint8 path, float uses PIL 'F' mode."""
    if plane.dtype == np.uint8:
        out = Image.fromarray(plane, mode="L").resize((size, size), interp)
        return np.asarray(out, dtype=np.float32) / 255.0
    out = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F").resize(
        (size, size), interp
    )
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def preprocess(image: ScanImage | np.ndarray, spec: PreprocessSpec = PreprocessSpec()) -> np.ndarray:
    """Scan -> model input, float32 [3, S, S].

    `image` is a ScanImage from `read_image` or an array: uint8 [H, W] / [H, W, 3], or float in [0, 1].
    """
    pixels = image.pixels if isinstance(image, ScanImage) else np.asarray(image)
    if pixels.dtype != np.uint8:
        pixels = pixels.astype(np.float32, copy=False)
    interp = _INTERP[spec.interpolation]
    s = spec.image_size
    if pixels.ndim == 2:
        grey = _resize_plane(
            pixels, s, interp
        )  # [S, S]; resizing then replicating == replicating then resizing
        out = np.repeat(grey[None], 3, axis=0)
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        out = np.stack([_resize_plane(pixels[..., c], s, interp) for c in range(3)])
    else:
        raise ValueError(f"expected [H, W] or [H, W, 3] pixels, got shape {pixels.shape}")
    return normalize_array(out, spec)  # [3, S, S]


def normalize_array(images: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Apply the spec's normalisation to [0, 1] images [..., 3, S, S] (identity for normalize="none").

    Separate from `preprocess` so the trainer can augment in [0, 1] first and normalise afterwards.
    """
    out = np.asarray(images, dtype=np.float32)
    if spec.normalize == "clip":
        out = (out - np.asarray(spec.mean, np.float32)[:, None, None]) / np.asarray(spec.std, np.float32)[
            :, None, None
        ]
    return np.ascontiguousarray(out, dtype=np.float32)


def preprocess_mask(mask: np.ndarray, spec: PreprocessSpec = PreprocessSpec()) -> np.ndarray:
    """Mask (bool, or values scaled to [0, 1]) -> bool [S, S]: nearest resize, then > threshold."""
    m = np.asarray(mask, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"expected a [H, W] mask, got shape {m.shape}")
    out = Image.fromarray(m, mode="F").resize((spec.image_size, spec.image_size), Image.Resampling.NEAREST)
    return np.asarray(out) > spec.mask_threshold


def resize_map(amap: np.ndarray, height: int, width: int) -> np.ndarray:
    """Model-resolution map [S, S] -> native resolution [height, width] (bilinear, float32)."""
    img = Image.fromarray(np.ascontiguousarray(amap, dtype=np.float32), mode="F")
    return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
