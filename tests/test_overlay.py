"""Overlays on the fixed calibrated scale, contour lines, 16-bit maps, and save_prediction."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from madclip_runtime import INTENDED_USE
from madclip_runtime.overlay import (
    CONTOUR_RGB,
    colorize,
    contour_mask,
    map_to_uint16,
    read_map_png,
    render_overlay,
    save_prediction,
    uint16_to_map,
)
from madclip_runtime.scans.imageio import ScanImage

SCALE = (0.0, 4.0)


def _blob(h, w, peak, cy=None, cx=None, sigma=None):
    """A Gaussian bump, float32 [h, w], max = peak."""
    cy = h / 2 if cy is None else cy
    cx = w / 2 if cx is None else cx
    sigma = min(h, w) / 6 if sigma is None else sigma
    yy, xx = np.mgrid[0:h, 0:w]
    return (peak * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))).astype(np.float32)


def test_colorize_fixed_scale_not_minmax():
    a = np.array([[0.0, 1.0, 2.0]], np.float32)  # max 2
    b = np.array([[1.0, 3.9, 0.5]], np.float32)  # max 3.9, shares the value 1.0
    ca, cb = colorize(a, SCALE), colorize(b, SCALE)
    assert ca.dtype == np.uint8 and ca.shape == (1, 3, 3)
    np.testing.assert_array_equal(ca[0, 1], cb[0, 0])  # same value, same colour, whatever the image max
    assert not np.array_equal(ca[0, 2], colorize(np.array([[4.0]]), SCALE)[0, 0])  # 2 is not "full scale"
    # clipped outside the scale; NaN goes to the low end
    np.testing.assert_array_equal(
        colorize(np.array([[-1.0, 9.0, np.nan]]), SCALE)[0], colorize(np.array([[0.0, 4.0, 0.0]]), SCALE)[0]
    )
    # monotone brightness along the ramp
    ramp = colorize(np.linspace(0, 4, 50)[None], SCALE)[0].astype(float).sum(axis=1)
    assert np.all(np.diff(ramp) >= -3)


@pytest.mark.parametrize("shape", [(300, 410), (57, 33), (240, 240, 3)])
def test_overlay_native_size(shape):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    amap = _blob(shape[0], shape[1], 3.0)
    im = render_overlay(pixels, amap, 1.7, 1.5, "anomaly", 2.0, SCALE, label="scan.png")
    assert im.mode == "RGB"
    assert im.width >= shape[1] and im.height > shape[0]  # legend strip under the image
    if shape[1] >= 300:
        assert im.width == shape[1]  # wide enough scans are not widened
    # the top-left block is the scan blended 1:1 at native resolution: no resampling
    block = np.asarray(im)[: shape[0], : shape[1]]
    base = pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=2)
    expect = np.round(0.55 * base + 0.45 * colorize(amap, SCALE).astype(np.float32)).astype(np.uint8)
    off_contour = ~contour_mask(amap, 2.0, thickness=max(1, round(min(shape[:2]) / 300)))
    np.testing.assert_allclose(
        block[off_contour].astype(int), expect[off_contour].astype(int), atol=1
    )  # rounding


def test_overlay_float_scanimage():
    scan = ScanImage(np.linspace(0, 1, 64 * 80, dtype=np.float32).reshape(64, 80), "x.png", 16)
    im = render_overlay(scan, np.zeros((64, 80), np.float32), 0.2, None, None, None, SCALE)
    block = np.asarray(im)[:64, :80]
    expect = np.round(0.55 * np.round(scan.pixels * 255) + 0.45 * colorize(np.zeros((1, 1)), SCALE)[0, 0, 0])
    np.testing.assert_allclose(block[..., 0], expect, atol=1)


def test_overlay_same_value_same_colour_across_images():
    px = np.full((64, 64), 100, np.uint8)
    a = np.full((64, 64), 1.0, np.float32)
    b = a.copy()
    b[:8, :8] = 3.9  # different maximum elsewhere
    ia = np.asarray(render_overlay(px, a, 1.0, 2.0, "normal", None, SCALE))[:64, :64]
    ib = np.asarray(render_overlay(px, b, 1.0, 2.0, "normal", None, SCALE))[:64, :64]
    np.testing.assert_array_equal(ia[40:, 40:], ib[40:, 40:])


def test_contour_present_when_map_crosses_threshold():
    px = np.full((120, 120), 60, np.uint8)
    amap = _blob(120, 120, 3.0)
    block = np.asarray(render_overlay(px, amap, 2.0, 1.0, "anomaly", 2.0, SCALE))[:120, :120]
    is_contour = np.all(block == np.array(CONTOUR_RGB, np.uint8), axis=2)
    line = contour_mask(amap, 2.0)
    assert line.sum() > 20
    np.testing.assert_array_equal(is_contour, line)
    # the line is the boundary of {amap >= 2}: inside, and with a neighbour outside
    ys, xs = np.nonzero(line)
    assert np.all(amap[ys, xs] >= 2.0)
    assert (amap >= 2.0).sum() > line.sum()  # interior pixels are not on the line
    # no crossing -> no contour pixels
    block2 = np.asarray(render_overlay(px, amap * 0.5, 2.0, 1.0, "anomaly", 2.0, SCALE))[:120, :120]
    assert not np.any(np.all(block2 == np.array(CONTOUR_RGB, np.uint8), axis=2))


def test_contour_ignores_image_border():
    m = contour_mask(np.full((10, 10), 3.0, np.float32), 2.0)
    assert not m.any()


def test_overlay_map_shape_mismatch():
    with pytest.raises(ValueError, match="does not match"):
        render_overlay(
            np.zeros((10, 10), np.uint8), np.zeros((12, 10), np.float32), 0.0, 1.0, "normal", 1.0, SCALE
        )


def test_uint16_roundtrip():
    rng = np.random.default_rng(1)
    amap = rng.uniform(0, 4, size=(50, 70)).astype(np.float32)
    u = map_to_uint16(amap, SCALE)
    assert u.dtype == np.uint16 and u.min() >= 0
    back = uint16_to_map(u, SCALE)
    tol = (SCALE[1] - SCALE[0]) / 65535
    assert np.max(np.abs(back - amap)) <= tol
    assert map_to_uint16(np.array([0.0, 4.0, 5.0, -1.0]), SCALE).tolist() == [0, 65535, 65535, 0]


def _pred(amap, score=1.8, smax=3.3, threshold=1.5, source="scan.png"):
    from madclip_runtime.contract import decide
    from madclip_runtime.predictor import Prediction

    return Prediction(
        source, score, smax, decide(score, threshold), threshold, "score", amap, amap, {"inference": 1.0}
    )


@pytest.mark.parametrize("map_format", ["png16", "npy"])
def test_save_prediction(tmp_path, map_format):
    rng = np.random.default_rng(2)
    h, w = 90, 130
    pixels = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
    amap = _blob(h, w, 3.3)
    pred = _pred(amap)
    record = {**pred.record(backend="ort-cpu"), "anomalous": True}
    out = tmp_path / "out"
    paths = save_prediction(out, "scan", pixels, pred, record, SCALE, 2.0, map_format=map_format)
    ext = ".png" if map_format == "png16" else ".npy"
    assert paths == {
        "json": str(out / "scan.json"),
        "overlay": str(out / "scan_overlay.png"),
        "map": str(out / f"scan_map{ext}"),
    }
    # no temp files; the results marker tells input expansion these are outputs (madclip_runtime.outputs)
    assert sorted(os.listdir(out)) == sorted(
        [".madclip-output", *(os.path.basename(p) for p in paths.values())]
    )

    doc = json.load(open(paths["json"]))
    assert doc["intended_use"] == INTENDED_USE
    assert doc["score"] == pytest.approx(1.8) and doc["anomalous"] is True and doc["label"] == "anomaly"
    assert doc["backend"] == "ort-cpu" and doc["height"] == h and doc["width"] == w
    assert doc["map_file"] == f"scan_map{ext}" and doc["map_scale"] == [0.0, 4.0]

    ov = Image.open(paths["overlay"])
    assert ov.mode == "RGB" and ov.width >= w and ov.height > h

    if map_format == "png16":
        with Image.open(paths["map"]) as im:
            assert im.mode.startswith("I") and im.size == (w, h)
            assert im.text["intended_use"] == INTENDED_USE
        back, scale = read_map_png(paths["map"])
        assert scale == SCALE
        assert np.max(np.abs(back - amap)) <= 4.0 / 65535
    else:
        np.testing.assert_array_equal(np.load(paths["map"]), amap)


def test_save_prediction_nan_score_is_null(tmp_path):
    pred = _pred(np.zeros((8, 8), np.float32), score=float("nan"), threshold=1.0)
    assert pred.label is None  # a NaN score is never decided
    paths = save_prediction(tmp_path, "s", np.zeros((8, 8), np.uint8), pred, pred.record(), SCALE)
    assert json.load(open(paths["json"]))["score"] is None


def test_save_prediction_bad_args(tmp_path):
    pred = _pred(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="map_format"):
        save_prediction(
            tmp_path, "s", np.zeros((8, 8), np.uint8), pred, pred.record(), SCALE, 1.0, map_format="tiff"
        )
    with pytest.raises(ValueError, match="stem"):
        save_prediction(tmp_path, "a/b", np.zeros((8, 8), np.uint8), pred, pred.record(), SCALE, 1.0)
