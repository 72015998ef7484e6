"""The one preprocessing: shapes, value ranges, the reference uint8 path, masks, maps, and no torch."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from madclip_runtime.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    PreprocessSpec,
    preprocess,
    preprocess_mask,
    resize_map,
)
from madclip_runtime.scans.imageio import ScanImage


def _rgb(h: int = 61, w: int = 83, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)  # [H, W, 3]


def test_output_shape_dtype_range():
    for pixels in (_rgb(), _rgb()[..., 0], np.random.default_rng(1).random((50, 70), dtype=np.float32)):
        out = preprocess(ScanImage(pixels, "x", 8))
        assert out.shape == (3, 240, 240) and out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
        assert out.min() >= 0.0 and out.max() <= 1.0


def test_grey_is_replicated():
    grey = _rgb()[..., 0]  # [H, W]
    out = preprocess(grey)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])
    # same as replicating first, then resizing as RGB
    np.testing.assert_array_equal(out, preprocess(np.stack([grey] * 3, axis=2)))


def test_uint8_path_is_the_reference_exactly():
    rgb = _rgb()
    ref = (
        np.asarray(Image.fromarray(rgb).resize((240, 240), Image.Resampling.BICUBIC), dtype=np.float32)
        / 255.0
    )
    np.testing.assert_array_equal(preprocess(rgb), ref.transpose(2, 0, 1))
    grey = rgb[..., 2]
    ref_g = (
        np.asarray(
            Image.fromarray(grey).convert("RGB").resize((240, 240), Image.Resampling.BICUBIC), np.float32
        )
        / 255.0
    )
    np.testing.assert_array_equal(preprocess(grey), ref_g.transpose(2, 0, 1))


def test_float_path_keeps_precision_and_range():
    ramp = np.tile(np.linspace(0.0, 1.0, 300, dtype=np.float32), (300, 1))  # [300, 300], smooth
    out = preprocess(ramp)
    assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(out[0, 120], np.linspace(0, 1, 240), atol=5e-3)
    assert len(np.unique(out[0, 120])) > 200  # not quantised to 8 bits by the way


def test_normalize_clip_applies_mean_std():
    rgb = _rgb()
    plain = preprocess(rgb)
    normed = preprocess(rgb, PreprocessSpec(normalize="clip"))
    expected = (plain - np.array(CLIP_MEAN, np.float32)[:, None, None]) / np.array(CLIP_STD, np.float32)[
        :, None, None
    ]
    np.testing.assert_allclose(normed, expected, rtol=1e-6, atol=1e-6)
    assert normed.dtype == np.float32 and normed.min() < 0.0


def test_spec_validation_and_roundtrip():
    spec = PreprocessSpec(image_size=32, normalize="clip", window="full")
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    assert preprocess(_rgb(), spec).shape == (3, 32, 32)
    for bad in ({"interpolation": "lanczos"}, {"normalize": "imagenet"}, {"window": "wide"}):
        with pytest.raises(ValueError):
            PreprocessSpec(**bad)
    with pytest.raises(ValueError):
        preprocess(np.zeros((10, 10, 4), np.uint8))


def test_preprocess_mask_nearest_and_threshold():
    m = np.zeros((10, 10), np.float32)  # [10, 10]
    m[:5, :5] = 1.0
    m[5:, 5:] = 0.5  # exactly at the threshold: not lesion (strictly greater)
    m[0, 9] = 0.6
    out = preprocess_mask(m, PreprocessSpec(image_size=20))
    assert out.dtype == bool and out.shape == (20, 20)
    assert out[:10, :10].all() and not out[10:, 10:].any()
    assert out[0:2, 18:20].all() and out.sum() == 100 + 4  # nearest: each source pixel -> a 2x2 block
    assert preprocess_mask(m > 0.7).shape == (240, 240)


def test_resize_map_shape():
    amap = np.random.default_rng(0).random((240, 240), dtype=np.float32)
    out = resize_map(amap, 512, 384)
    assert out.shape == (512, 384) and out.dtype == np.float32
    assert out.min() >= amap.min() - 1e-6 and out.max() <= amap.max() + 1e-6  # bilinear does not overshoot
    const = resize_map(np.full((240, 240), 0.25, np.float32), 31, 17)
    np.testing.assert_allclose(const, 0.25, atol=1e-6)
