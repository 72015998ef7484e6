"""The preview grid of madclip-synth: per sample the normal shot and the synthetic image with its label.

Each tile pair is (shot | synthetic image with the label blended in the runtime's overlay colour ramp and a
cyan contour), captioned with the task, the number of anomalies and the labelled area. Label values use the
fixed scale [0, 1], so the colours mean the same in every tile.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from madclip_runtime.overlay import CONTOUR_RGB, colorize, contour_mask, label_font

from .synthesizer import SynthSample

_BG = (24, 24, 24)
_FG = (235, 235, 235)
_DIM = (150, 150, 150)
_TASK_RGB = {
    "cutpaste": (255, 170, 90),
    "gauss": (120, 200, 255),
    "source": (190, 150, 255),
    "sink": (255, 130, 200),
    "smooth": (140, 230, 160),
    "identity": (170, 170, 170),
}


def label_overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.3) -> np.ndarray:
    """Grey uint8 [H, W] + label [H, W] in [0, 1] -> RGB uint8 [H, W, 3]: ramp blended where label > 0, contour."""
    base = np.repeat(image[:, :, None], 3, axis=2).astype(np.float32)
    heat = colorize(label, (0.0, 1.0)).astype(np.float32)
    a = (alpha * (label > 0))[:, :, None]
    out = np.round(base * (1 - a) + heat * a).astype(np.uint8)
    out[contour_mask(label, 0.5)] = CONTOUR_RGB
    return out


def _fit(arr: np.ndarray, tile: int) -> Image.Image:
    img = Image.fromarray(arr)
    return img if img.size == (tile, tile) else img.resize((tile, tile), Image.Resampling.BILINEAR)


def preview_grid(
    samples: Sequence[SynthSample],
    originals: Sequence[np.ndarray],
    names: Sequence[str],
    columns: int = 4,
    tile: int = 224,
) -> Image.Image:
    """Grid of (original | overlay) pairs, `columns` pairs per row, with a caption under each pair."""
    n = len(samples)
    if n == 0:
        raise ValueError("no samples to preview")
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    fs = max(10, tile // 16)
    font, small = label_font(fs), label_font(max(9, fs - 3))
    gap, cap = max(4, tile // 40), 2 * fs + 10
    pair_w = 2 * tile + gap // 2
    width = columns * pair_w + (columns + 1) * gap
    height = rows * (tile + cap) + (rows + 1) * gap
    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)
    for k, (s, orig, name) in enumerate(zip(samples, originals, names)):
        r, c = divmod(k, columns)
        x = gap + c * (pair_w + gap)
        y = gap + r * (tile + cap + gap)
        canvas.paste(_fit(np.repeat(orig[:, :, None], 3, axis=2), tile), (x, y))
        canvas.paste(_fit(label_overlay(s.image, s.label), tile), (x + tile + gap // 2, y))
        area = 100.0 * float(np.mean(s.label > 0))
        what = (
            "normal (no anomaly)"
            if s.rounds == 0
            else f"{s.rounds} anomal{'y' if s.rounds == 1 else 'ies'}, {area:.1f} % of the image"
        )
        draw.text((x, y + tile + 3), s.task, fill=_TASK_RGB.get(s.task, _FG), font=font)
        tw = draw.textbbox((0, 0), s.task + "  ", font=font)[2]
        draw.text((x + tw, y + tile + 3), what, fill=_FG, font=small)
        draw.text((x, y + tile + 5 + fs), name, fill=_DIM, font=small)
    return canvas
