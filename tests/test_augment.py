"""Offline x16 augmentation (madclip_train.augment)."""

from __future__ import annotations

import math

import pytest
import torch

from madclip_train.augment import (
    N_VARIANTS,
    VARIANTS,
    augment_x16,
    jitter_factors,
    jitter_reference,
    reference_jitter_factors,
    zoom_crop,
)

S = 32


def _batch(n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand((n, 3, S, S), generator=g)  # [N, 3, S, S]
    masks = torch.zeros((n, S, S), dtype=torch.bool)
    for i in range(n):  # an off-centre box so flips and shifts move it
        masks[i, 4 + i : 12 + i, 6 : 16 + i] = True
    return images, masks


def test_counts_order_and_index():
    images, masks = _batch(3)
    out, out_m, idx = augment_x16(images, masks, seed=1)
    assert len(VARIANTS) == N_VARIANTS == 16
    assert out.shape == (48, 3, S, S) and out.dtype == images.dtype
    assert out_m.shape == (48, S, S) and out_m.dtype == torch.bool
    assert idx.dtype == torch.long and idx.tolist() == [i for i in range(3) for _ in range(16)]
    for i in range(3):
        assert torch.equal(out[16 * i], images[i])  # variant 0 is the original
        assert torch.equal(out_m[16 * i], masks[i])
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_flips_follow_images_and_masks():
    images, masks = _batch(2)
    out, out_m, _ = augment_x16(images, masks, seed=0)
    h, v = VARIANTS.index("hflip"), VARIANTS.index("vflip")
    for i in range(2):
        torch.testing.assert_close(out[16 * i + h], images[i].flip(-1), atol=1e-6, rtol=0)
        torch.testing.assert_close(out[16 * i + v], images[i].flip(-2), atol=1e-6, rtol=0)
        assert torch.equal(out_m[16 * i + h], masks[i].flip(-1))
        assert torch.equal(out_m[16 * i + v], masks[i].flip(-2))


def test_geometric_variants_move_masks_with_images():
    # The image is its own mask (a bright box on black): after any geometric variant, the thresholded image
    # must coincide with the transformed mask except along the interpolated border.
    masks = torch.zeros((1, S, S), dtype=torch.bool)
    masks[0, 6:20, 8:18] = True
    images = masks.float().unsqueeze(1).repeat(1, 3, 1, 1)
    out, out_m, _ = augment_x16(images, masks, seed=0)
    jitter = VARIANTS.index("jitter")
    for k in range(16):
        if k == jitter:
            assert torch.equal(out_m[k], masks[0])  # photometric jitter leaves the mask alone
            continue
        img_bin = out[k, 0] > 0.5
        disagree = (img_bin != out_m[k]).sum().item()
        assert disagree <= 2, (VARIANTS[k], disagree)
        assert out_m[k].any()
    # Geometric variants really change the mask (except the original).
    for k in range(1, 16):
        if k != jitter:
            assert not torch.equal(out_m[k], masks[0]), VARIANTS[k]
    # Zooms enlarge the lesion, by about the zoom factor squared.
    area0 = masks[0].sum().item()
    for z in (1.1, 1.15, 1.2, 1.3):
        area = out_m[VARIANTS.index(f"zoom{z:g}")].sum().item()
        assert area == pytest.approx(area0 * z * z, rel=0.15)
    # Masks stay binary tensors and translations keep the area.
    t = VARIANTS.index("translate(+0.1,+0.1)")
    assert out_m[t].sum().item() == pytest.approx(area0, rel=0.1)


def test_rotation_angle():
    # A horizontal bar through the centre rotated by pi/8 must have its principal axis at +-pi/8.
    img = torch.zeros((1, 3, 64, 64))
    img[0, :, 30:34, 8:56] = 1.0
    mask = img[:, 0] > 0.5
    out, out_m, _ = augment_x16(img, mask, seed=0)
    for name, expected in (("rotate-0.3927", math.pi / 8), ("rotate+0.1963", math.pi / 16)):
        m = out_m[VARIANTS.index(name)]
        ys, xs = torch.nonzero(m, as_tuple=True)
        ys, xs = ys.double() - ys.double().mean(), xs.double() - xs.double().mean()
        angle = 0.5 * math.atan2(2 * (xs * ys).mean().item(), ((xs * xs).mean() - (ys * ys).mean()).item())
        assert abs(abs(angle) - expected) < 0.03, (name, angle)


def test_jitter_is_photometric_and_seeded():
    images, masks = _batch(2)
    a, am, _ = augment_x16(images, masks, seed=5, variant="exact")
    b, bm, _ = augment_x16(images, masks, seed=5, variant="exact")
    c, _, _ = augment_x16(images, masks, seed=6, variant="exact")
    assert torch.equal(a, b) and torch.equal(am, bm)
    j = VARIANTS.index("jitter")
    assert not torch.equal(a[j], c[j])
    others = [k for k in range(16) if k != j]
    assert torch.equal(a[others], c[others])  # only the jitter depends on the seed
    f = jitter_factors(2, 5)
    assert f.shape == (2, 2) and ((f >= 0.8) & (f <= 1.2)).all()
    x = images[0]
    expected = (((x - x.mean()) * f[0, 1].float() + x.mean()) * f[0, 0].float()).clamp(0, 1)
    torch.testing.assert_close(a[j], expected, atol=1e-6, rtol=0)


def test_chunking_does_not_change_results():
    images, masks = _batch(5)
    a = augment_x16(images, masks, seed=3, chunk=2)
    b = augment_x16(images, masks, seed=3, chunk=64)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_bad_shapes():
    images, masks = _batch(2)
    with pytest.raises(ValueError):
        augment_x16(images, masks[:1], seed=0)
    with pytest.raises(ValueError):
        augment_x16((images * 255).to(torch.uint8), masks, seed=0)


# --- the reference variant (default): the authors' zoom crop and colour jitter, pinned on small tensors ----------


def test_reference_zoom_crops_int_size_and_resizes_back():
    # 4x4, x2: crop int(4 / 2) = 2 rows/columns [1, 3) and upsample 2 -> 4 bilinear (align_corners=False):
    # source positions -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1).
    x = torch.zeros((1, 1, 4, 4))
    x[0, 0, 1:3, 1:3] = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    w = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])  # [4 out, 2 in]
    expected = w @ torch.tensor([[0.0, 1.0], [2.0, 3.0]]) @ w.T
    torch.testing.assert_close(zoom_crop(x, 2.0)[0, 0], expected, atol=1e-6, rtol=0)
    # 240 pixels: the crops are 218, 208, 200 and 184 pixels (x1.15 is really 240 / 208 = x1.154).
    img = torch.rand((1, 3, 240, 240), generator=torch.Generator().manual_seed(0))
    for z, (a, b) in zip((1.1, 1.15, 1.2, 1.3), ((11, 229), (16, 224), (20, 220), (28, 212))):
        want = torch.nn.functional.interpolate(
            img[:, :, a:b, a:b], size=(240, 240), mode="bilinear", align_corners=False
        )
        assert torch.equal(zoom_crop(img, z), want), z
    # augment_x16's zoom variants are these crops, by default
    m = torch.zeros((1, 240, 240), dtype=torch.bool)
    out, _, _ = augment_x16(img, m, seed=0)
    # (batched interpolation may differ from the single-image one in the last bits with one thread: 1.8e-7;
    # the neighbouring crop, 1.1 or 1.2, differs by ~0.1)
    torch.testing.assert_close(out[VARIANTS.index("zoom1.15")], zoom_crop(img, 1.15)[0], atol=1e-6, rtol=0)


def test_reference_jitter_arithmetic_per_column_mean():
    # B=1, C=2, H=2, W=3; brightness 1.1 first, then contrast 0.8 about each column's mean over channels and rows.
    x = torch.tensor([[[[0.1, 0.2, 0.9], [0.3, 0.4, 0.8]], [[0.5, 0.6, 0.7], [0.7, 0.0, 0.2]]]])
    y = [[[1.1 * v for v in row] for row in ch] for ch in x[0].tolist()]
    col_mean = [sum(y[c][r][k] for c in range(2) for r in range(2)) / 4 for k in range(3)]
    expected = torch.tensor(
        [
            [
                [
                    [min(1.0, max(0.0, (y[c][r][k] - col_mean[k]) * 0.8 + col_mean[k])) for k in range(3)]
                    for r in range(2)
                ]
                for c in range(2)
            ]
        ]
    )
    got = jitter_reference(x, torch.tensor([[1.1, 0.8]], dtype=torch.float64))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert got.max() <= 1.0  # 0.9 * 1.1 and contrast push above 1: clamped


def test_reference_jitter_one_factor_pair_per_class_abnormal_first():
    labels = torch.tensor([0, 1, 1, 0])
    f = reference_jitter_factors(labels, seed=7)
    g = torch.Generator().manual_seed(7)
    u = [torch.rand(1, generator=g).item() for _ in range(4)]  # abnormal (b, c), then normal (b, c)
    ab = torch.tensor([1.0 + u[0] * 0.4 - 0.2, 1.0 + u[1] * 0.4 - 0.2], dtype=torch.float64)
    no = torch.tensor([1.0 + u[2] * 0.4 - 0.2, 1.0 + u[3] * 0.4 - 0.2], dtype=torch.float64)
    assert torch.equal(f[1], ab) and torch.equal(f[2], ab) and torch.equal(f[0], no) and torch.equal(f[3], no)
    # augment_x16 applies them: images of one class share the pair
    images, masks = _batch(4)
    out, _, _ = augment_x16(images, masks, seed=7, groups=labels)
    j = VARIANTS.index("jitter")
    for i in range(4):
        torch.testing.assert_close(
            out[16 * i + j], jitter_reference(images[i : i + 1], f[i : i + 1])[0], atol=0, rtol=0
        )


def test_unknown_variant_refused():
    images, masks = _batch(1)
    with pytest.raises(ValueError, match="variant"):
        augment_x16(images, masks, seed=0, variant="nope")
