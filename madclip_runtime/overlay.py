"""Output writing: heatmap overlays, 16-bit anomaly maps and per-image JSON records.

Colours always use the FIXED calibrated scale of the bundle (anomaly map AS lies in [0, L], L = 4 layers),
never a per-image min-max: the same map value has the same colour in every overlay, so a quiet normal scan
looks quiet instead of having its noise stretched to full red.

16-bit map PNGs store `v = round((clip(value, lo, hi) - lo) / (hi - lo) * 65535)`; recover values with
`value = v / 65535 * (hi - lo) + lo` (the scale is in the PNG text chunk "madclip_map_scale"; see
`read_map_png`). Values outside [lo, hi] are clipped; the `npy` format keeps raw float32 values instead.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from . import INTENDED_USE
from .atomic import atomic_save_npy, atomic_save_png, atomic_write_text
from .contract import ANOMALY, NORMAL
from .outputs import mark_output_dir
from .scans.imageio import ScanImage

# Anchor colours of a dark-purple-orange-pale-yellow perceptual ramp (inferno-like), evenly spaced on [0, 1].
_ANCHORS = np.array(
    [
        (0, 0, 4),
        (31, 12, 72),
        (85, 15, 109),
        (136, 34, 106),
        (186, 54, 85),
        (227, 89, 51),
        (249, 140, 10),
        (249, 201, 50),
        (252, 255, 164),
    ],
    dtype=np.float64,
)
_LUT = (
    np.stack(
        [
            np.interp(np.linspace(0.0, 1.0, 256), np.linspace(0.0, 1.0, len(_ANCHORS)), _ANCHORS[:, c])
            for c in range(3)
        ],
        axis=1,
    )
    .round()
    .astype(np.uint8)
)  # [256, 3]

CONTOUR_RGB = (0, 255, 255)  # cyan: absent from the colour ramp
_LEGEND_BG = (24, 24, 24)
_LEGEND_FG = (235, 235, 235)
_ANOMALY_FG = (255, 96, 96)
_NORMAL_FG = (120, 220, 120)
MAP_SCALE_KEY = "madclip_map_scale"
MAP_DECODE = "value = v/65535*(hi-lo)+lo"


def _check_scale(scale: tuple[float, float]) -> tuple[float, float]:
    lo, hi = float(scale[0]), float(scale[1])
    if not hi > lo:
        raise ValueError(f"map scale must have hi > lo, got {scale}")
    return lo, hi


def _unit(amap: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """Map values -> [0, 1] on the fixed scale (clipped; NaN -> 0)."""
    lo, hi = _check_scale(scale)
    u = (np.asarray(amap, dtype=np.float64) - lo) / (hi - lo)
    return np.clip(np.nan_to_num(u, nan=0.0), 0.0, 1.0)


def colorize(amap: np.ndarray, scale: tuple[float, float] = (0.0, 4.0)) -> np.ndarray:
    """Anomaly map [H, W] -> uint8 RGB [H, W, 3] on the fixed `scale` (lo dark, hi pale yellow)."""
    idx = np.round(_unit(amap, scale) * 255.0).astype(np.intp)
    return _LUT[idx]


def map_to_uint16(amap: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """Map values -> uint16 on the fixed scale: v = round((clip(x, lo, hi) - lo) / (hi - lo) * 65535)."""
    return np.round(_unit(amap, scale) * 65535.0).astype(np.uint16)


def uint16_to_map(encoded: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """Inverse of `map_to_uint16`: value = v / 65535 * (hi - lo) + lo, float32."""
    lo, hi = _check_scale(scale)
    return (np.asarray(encoded, dtype=np.float64) / 65535.0 * (hi - lo) + lo).astype(np.float32)


def read_map_png(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float]]:
    """Read a `<stem>_map.png` written by `save_prediction` -> (float32 map [H, W], scale)."""
    with Image.open(path) as img:
        img.load()
        text = dict(getattr(img, "text", {}) or {})
        raw = np.asarray(img)
    if MAP_SCALE_KEY not in text:
        raise ValueError(f"{os.fspath(path)}: no {MAP_SCALE_KEY} text chunk (not a madclip map PNG)")
    lo, hi = json.loads(text[MAP_SCALE_KEY])
    return uint16_to_map(raw.astype(np.uint16), (lo, hi)), (float(lo), float(hi))


def _to_rgb_uint8(pixels: ScanImage | np.ndarray) -> np.ndarray:
    """Scan pixels (uint8 or float in [0, 1]; grey or RGB) -> uint8 RGB [H, W, 3]."""
    p = pixels.pixels if isinstance(pixels, ScanImage) else np.asarray(pixels)
    if p.dtype == np.bool_:
        p = p.astype(np.uint8) * 255
    elif p.dtype != np.uint8:
        if not np.issubdtype(p.dtype, np.floating):
            raise ValueError(f"expected uint8 or float [0, 1] pixels, got {p.dtype}")
        p = np.round(np.clip(np.nan_to_num(p), 0.0, 1.0) * 255.0).astype(np.uint8)
    if p.ndim == 2:
        return np.repeat(p[:, :, None], 3, axis=2)
    if p.ndim == 3 and p.shape[2] == 3:
        return np.ascontiguousarray(p)
    raise ValueError(f"expected [H, W] or [H, W, 3] pixels, got shape {p.shape}")


def _shift_or(mask: np.ndarray) -> np.ndarray:
    """Dilate a bool mask by one pixel (4-neighbourhood)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def contour_mask(amap: np.ndarray, level: float, thickness: int = 1) -> np.ndarray:
    """Bool [H, W]: pixels inside {amap >= level} with a 4-neighbour outside it (the crossing line).

    The image border is not a crossing (the mask is edge-padded). `thickness` > 1 dilates the line inward
    and outward.
    """
    inside = np.nan_to_num(np.asarray(amap, dtype=np.float32), nan=-np.inf) >= level  # [H, W]
    pad = np.pad(inside, 1, mode="edge")
    eroded = pad[1:-1, 1:-1] & pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    edge = inside & ~eroded
    for _ in range(max(0, int(thickness) - 1)):
        edge = _shift_or(edge)
    return edge


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font only
        return ImageFont.load_default()


def label_font(size: int) -> Any:
    """The font of the overlay's labels at `size` pixels (madclip-synth's preview labels its tiles alike)."""
    return _font(size)


def _text_w(draw: ImageDraw.ImageDraw, text: str, font: Any) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return int(right - left)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{float(x):.3f}"


def render_overlay(
    pixels: ScanImage | np.ndarray,
    amap_native: np.ndarray,
    score: float,
    threshold: float | None,
    decision: str | None,
    map_threshold: float | None,
    scale: tuple[float, float],
    label: str | None = None,
    alpha: float = 0.45,
) -> Image.Image:
    """Heatmap on the scan at native resolution, contour at `map_threshold`, legend strip below.

    The top-left H x W block of the result is the scan (grey or RGB, [H, W(, 3)]) blended 1:1 with the
    colourised map (float32 [H, W], already resized to native resolution) on the fixed `scale`; the strip
    under it shows the score against the threshold, a colour bar with the scale ends and the intended use.
    The canvas is widened only when the scan is too narrow for the legend text.
    """
    base = _to_rgb_uint8(pixels)  # [H, W, 3]
    amap = np.asarray(amap_native, dtype=np.float32)
    h, w = base.shape[:2]
    if amap.shape != (h, w):
        raise ValueError(f"anomaly map shape {amap.shape} does not match the scan's {(h, w)}")
    lo, hi = _check_scale(scale)
    heat = colorize(amap, (lo, hi)).astype(np.float32)  # [H, W, 3]
    blended = np.round((1.0 - alpha) * base.astype(np.float32) + alpha * heat).astype(np.uint8)
    if map_threshold is not None:
        line = contour_mask(amap, float(map_threshold), thickness=max(1, round(min(h, w) / 300)))
        blended[line] = CONTOUR_RGB

    fs = int(min(28, max(11, round(w / 40))))
    font, pad = _font(fs), max(3, fs // 3)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    if decision == ANOMALY:  # the label decided by the predictor (contract.decide), shown, not re-decided
        verdict, verdict_fg = "ANOMALY", _ANOMALY_FG
    elif decision == NORMAL:
        verdict, verdict_fg = "normal", _NORMAL_FG
    else:
        verdict, verdict_fg = (
            "(no calibrated threshold)" if threshold is None else "(no decision)",
            _LEGEND_FG,
        )
    score_text = f"score {_fmt(score)}  threshold {_fmt(threshold)}  "
    lo_text, hi_text = f"{lo:g}", f"{hi:g}"
    contour_text = f"  contour {map_threshold:.3f}" if map_threshold is not None else ""
    bar_w = 8 * fs
    bar_line_w = (
        _text_w(probe, lo_text, font) + bar_w + _text_w(probe, hi_text + contour_text, font) + 2 * pad
    )
    lines_w = [
        _text_w(probe, label, font) if label else 0,
        _text_w(probe, score_text + verdict, font),
        bar_line_w,
        _text_w(probe, INTENDED_USE, font),
    ]
    row = fs + pad
    n_rows = 4 if label else 3
    canvas_w = max(w, max(lines_w) + 2 * pad)
    canvas = Image.new("RGB", (canvas_w, h + n_rows * row + pad), _LEGEND_BG)
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)

    y = h + pad
    if label:
        draw.text((pad, y), label, fill=_LEGEND_FG, font=font)
        y += row
    draw.text((pad, y), score_text, fill=_LEGEND_FG, font=font)
    draw.text((pad + _text_w(probe, score_text, font), y), verdict, fill=verdict_fg, font=font)
    y += row
    x = pad
    draw.text((x, y), lo_text, fill=_LEGEND_FG, font=font)
    x += _text_w(probe, lo_text, font) + pad
    ramp = _LUT[np.round(np.linspace(0, 255, bar_w)).astype(np.intp)]  # [bar_w, 3]
    bar = np.repeat(ramp[None], fs, axis=0)  # [fs, bar_w, 3]
    canvas.paste(Image.fromarray(np.ascontiguousarray(bar)), (x, y))
    if map_threshold is not None and lo <= map_threshold <= hi:
        tx = x + int(round((map_threshold - lo) / (hi - lo) * (bar_w - 1)))
        draw.line([(tx, y), (tx, y + fs - 1)], fill=CONTOUR_RGB, width=max(1, fs // 8))
    x += bar_w + pad
    draw.text((x, y), hi_text + contour_text, fill=_LEGEND_FG, font=font)
    y += row
    draw.text((pad, y), INTENDED_USE, fill=_LEGEND_FG, font=font)
    return canvas


def blend_map(
    pixels: ScanImage | np.ndarray,
    amap: np.ndarray,
    scale: tuple[float, float],
    map_threshold: float | None,
    alpha: float = 0.45,
    thickness: int = 1,
) -> np.ndarray:
    """The scan [H, W] blended with the colourised map on the fixed scale, contour at `map_threshold`."""
    base = _to_rgb_uint8(pixels)
    amap = np.asarray(amap, dtype=np.float32)
    if amap.shape != base.shape[:2]:
        raise ValueError(f"anomaly map shape {amap.shape} does not match the scan's {base.shape[:2]}")
    heat = colorize(amap, _check_scale(scale)).astype(np.float32)
    out = np.round((1.0 - alpha) * base.astype(np.float32) + alpha * heat).astype(np.uint8)
    if map_threshold is not None:
        out[contour_mask(amap, float(map_threshold), thickness)] = CONTOUR_RGB
    return out


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    """Split `text` at double spaces into lines no wider than `width` (a part wider than that stays whole)."""
    lines: list[str] = []
    for part in text.split("  "):
        if lines and _text_w(draw, lines[-1] + "  " + part, font) <= width:
            lines[-1] += "  " + part
        else:
            lines.append(part)
    return lines


def render_montage_tiles(
    tiles: list[tuple[np.ndarray, np.ndarray, str, str | None]],
    scale: tuple[float, float],
    map_threshold: float | None,
    legend: list[tuple[str, tuple[int, int, int]]],
    min_side: int = 240,
    max_side: int = 512,
    columns: int = 3,
) -> Image.Image:
    """Several slices with their maps in one picture, one shared legend below.

    `tiles`: (scan pixels [H, W(, 3)], map [H, W], caption, decision) per slice. Each slice is shown at its
    native resolution, enlarged by a whole factor (nearest neighbour, pixels stay square and sharp) until
    its longer side reaches `min_side` (the model's input size), or reduced when longer than `max_side`;
    the map is blended on the fixed `scale` with its contour at `map_threshold`. The caption (slice, its
    position, its score) is drawn above each slice; the legend (volume score, threshold, colour bar with
    the contour level, research-use line) once under the grid.
    """
    lo, hi = _check_scale(scale)
    fs = 15
    font, pad = _font(fs), 5
    row = fs + pad
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    panels = []
    for pixels, amap, caption, decision in tiles:
        h, w = np.asarray(amap).shape[:2]
        longer = max(h, w)
        if longer < min_side:
            f = -(-min_side // longer)  # ceil: a whole factor
            size, resample = (w * f, h * f), Image.Resampling.NEAREST
        elif longer > max_side:
            f = max_side / longer
            size, resample = (max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.LANCZOS
        else:
            size, resample = (w, h), None
        if resample is Image.Resampling.NEAREST:  # contour drawn at display size: one screen pixel wide
            base = np.asarray(Image.fromarray(_to_rgb_uint8(pixels)).resize(size, resample))
            big = np.asarray(Image.fromarray(np.asarray(amap, np.float32), mode="F").resize(size, resample))
            img = Image.fromarray(blend_map(base, big, (lo, hi), map_threshold, thickness=2))
        else:
            img = Image.fromarray(
                blend_map(
                    pixels, amap, (lo, hi), map_threshold, thickness=max(1, round(longer / max(size) * 1.5))
                )
            )
            if resample is not None:
                img = img.resize(size, resample)
        lines = _wrap(probe, caption, font, img.width - 2 * pad)
        panel = Image.new("RGB", (img.width, img.height + len(lines) * row), _LEGEND_BG)
        panel.paste(img, (0, len(lines) * row))
        d = ImageDraw.Draw(panel)
        colour = _ANOMALY_FG if decision == ANOMALY else (_NORMAL_FG if decision == NORMAL else _LEGEND_FG)
        for i, line in enumerate(lines):
            d.text((pad, pad // 2 + i * row), line, fill=colour, font=font)
        panels.append(panel)
    cols = max(1, min(columns, len(panels)))
    n_rows = -(-len(panels) // cols)
    cw, ch = max(p.width for p in panels), max(p.height for p in panels)
    gap = 6
    grid_w = cols * cw + (cols - 1) * gap
    bar_w = 200
    lines_w = [_text_w(probe, text, font) for text, _ in legend] + [_text_w(probe, INTENDED_USE, font)]
    width = max(grid_w, max(lines_w) + 2 * pad, bar_w + 300)
    legend_h = (len(legend) + 2) * row + pad
    canvas = Image.new("RGB", (width, n_rows * ch + (n_rows - 1) * gap + legend_h), _LEGEND_BG)
    for i, panel in enumerate(panels):
        canvas.paste(panel, ((i % cols) * (cw + gap), (i // cols) * (ch + gap)))
    draw = ImageDraw.Draw(canvas)
    y = n_rows * ch + (n_rows - 1) * gap + pad
    for text, colour in legend:
        draw.text((pad, y), text, fill=colour, font=font)
        y += row
    x = pad
    lo_text = f"map {lo:g}"
    draw.text((x, y), lo_text, fill=_LEGEND_FG, font=font)
    x += _text_w(probe, lo_text, font) + pad
    ramp = _LUT[np.round(np.linspace(0, 255, bar_w)).astype(np.intp)]
    canvas.paste(Image.fromarray(np.ascontiguousarray(np.repeat(ramp[None], fs, axis=0))), (x, y))
    if map_threshold is not None and lo <= map_threshold <= hi:
        tx = x + int(round((map_threshold - lo) / (hi - lo) * (bar_w - 1)))
        draw.line([(tx, y), (tx, y + fs - 1)], fill=CONTOUR_RGB, width=2)
    x += bar_w + pad
    tail = f"{hi:g}" + (f"   cyan contour: map >= {map_threshold:.3f}" if map_threshold is not None else "")
    draw.text((x, y), tail, fill=_LEGEND_FG, font=font)
    y += row
    draw.text((pad, y), INTENDED_USE, fill=_LEGEND_FG, font=font)
    return canvas


def verdict_colour(decision: str | None) -> tuple[int, int, int]:
    return _ANOMALY_FG if decision == ANOMALY else (_NORMAL_FG if decision == NORMAL else _LEGEND_FG)


def jsonable(obj: Any) -> Any:
    """numpy scalars/arrays -> Python; NaN/inf -> None (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def save_prediction(
    out_dir: str | os.PathLike,
    stem: str,
    pixels: ScanImage | np.ndarray,
    pred: Any,
    record: dict[str, Any],
    scale: tuple[float, float],
    map_threshold: float | None = None,
    map_format: str = "png16",
) -> dict[str, str]:
    """Write `<stem>_map.png` (16-bit, fixed scale) or `<stem>_map.npy` (float32), `<stem>_overlay.png` and
    `<stem>.json` (the record plus file names, map encoding and intended use), each atomically; the JSON
    is written last, so its presence means the set is complete. `pred` is the scan's Prediction (its native
    anomaly map, decision score, threshold and label are shown); `record` is `pred.record(...)`.
    Returns {"json", "overlay", "map"} -> path.
    """
    if map_format not in ("png16", "npy"):
        raise ValueError(f"map_format must be 'png16' or 'npy', got {map_format!r}")
    if not stem or "/" in stem or os.sep in stem:
        raise ValueError(f"stem must be a plain file-name stem, got {stem!r}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    mark_output_dir(out_dir)  # so input expansion never takes these files for scans
    lo, hi = _check_scale(scale)
    amap = np.asarray(pred.anomaly_map, dtype=np.float32)  # [H, W]

    if map_format == "png16":
        map_path = os.path.join(out_dir, f"{stem}_map.png")
        info = PngInfo()
        info.add_text(MAP_SCALE_KEY, json.dumps([lo, hi]))
        info.add_text("madclip_map_decode", MAP_DECODE)
        info.add_text("intended_use", INTENDED_USE)
        atomic_save_png(map_path, Image.fromarray(map_to_uint16(amap, (lo, hi))), pnginfo=info)
        encoding = f"16-bit PNG, {MAP_DECODE} with [lo, hi] = [{lo:g}, {hi:g}]"
    else:
        map_path = os.path.join(out_dir, f"{stem}_map.npy")
        atomic_save_npy(map_path, amap)
        encoding = "float32 npy, raw anomaly map values"

    overlay_path = os.path.join(out_dir, f"{stem}_overlay.png")
    overlay = render_overlay(
        pixels,
        amap,
        float(pred.decision_score),
        pred.threshold,
        pred.label,
        map_threshold,
        (lo, hi),
        os.path.basename(pred.source),
    )
    atomic_save_png(overlay_path, overlay)

    json_path = os.path.join(out_dir, f"{stem}.json")
    doc = dict(record)
    doc.update(
        map_file=os.path.basename(map_path),
        map_encoding=encoding,
        map_scale=[lo, hi],
        overlay_file=os.path.basename(overlay_path),
        intended_use=INTENDED_USE,
    )
    atomic_write_text(json_path, json.dumps(jsonable(doc), indent=2, allow_nan=False) + "\n")
    return {"json": json_path, "overlay": overlay_path, "map": map_path}
