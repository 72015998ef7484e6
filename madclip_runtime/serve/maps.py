"""Anomaly maps in JSON: float32 [H, W] <-> {"format", "shape", "scale", "data": base64}.

"png16" is the 16-bit PNG on the bundle's fixed scale that `madclip-infer --out` writes (one step is
(hi - lo) / 65535); "npy" is the raw float32 array, exact. Used by the server's responses and the client.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np

MAP_FORMATS = ("png16", "npy")


def encode_map(amap: np.ndarray, fmt: str, scale: tuple[float, float]) -> dict[str, Any]:
    """float32 [H, W] -> {"format", "shape", "scale", "data": base64} (png16: 16-bit PNG on `scale`)."""
    buf = io.BytesIO()
    if fmt == "npy":
        np.save(buf, np.asarray(amap, np.float32), allow_pickle=False)
    elif fmt == "png16":
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        from ..overlay import MAP_SCALE_KEY, map_to_uint16

        info = PngInfo()
        info.add_text(MAP_SCALE_KEY, json.dumps([float(scale[0]), float(scale[1])]))
        Image.fromarray(map_to_uint16(amap, scale)).save(buf, format="PNG", pnginfo=info)
    else:
        raise ValueError(f"map format must be one of {MAP_FORMATS}, got {fmt!r}")
    return {
        "format": fmt,
        "shape": [int(amap.shape[0]), int(amap.shape[1])],
        "scale": [float(scale[0]), float(scale[1])],
        "data": base64.b64encode(buf.getvalue()).decode("ascii"),
    }


def decode_map(doc: dict[str, Any]) -> np.ndarray:
    """The inverse of `encode_map` -> float32 [H, W] (png16 values are quantised to the 16-bit scale)."""
    raw = base64.b64decode(doc["data"])
    if doc["format"] == "npy":
        return np.load(io.BytesIO(raw), allow_pickle=False).astype(np.float32)
    from PIL import Image

    from ..overlay import uint16_to_map

    with Image.open(io.BytesIO(raw)) as img:
        return uint16_to_map(np.asarray(img), tuple(doc["scale"]))
