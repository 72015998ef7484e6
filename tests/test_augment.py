"""Offline x16 augmentation (madclip_train.augment)."""
from __future__ import annotations

import math

import pytest
import torch

from madclip_train.augment import N_VARIANTS, VARIANTS, augment_x16, jitter_factors

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
    a, am, _ = augment_x16(images, masks, seed=5)
    b, bm, _ = augment_x16(images, masks, seed=5)
    c, _, _ = augment_x16(images, masks, seed=6)
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
