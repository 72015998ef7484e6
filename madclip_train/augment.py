"""Offline x16 augmentation of the few shots (docs/METHODS.md §7), done once before training.

Per source image, 16 consecutive variants (VARIANTS gives their names, in order): the original; rotations by
-pi/8, -pi/16, +pi/16, +pi/8; translations by (+-0.1, +-0.1) normalised grid units; centre zooms x1.1, x1.15,
x1.2, x1.3; one brightness/contrast jitter (+-20 %, clamped to [0, 1]); horizontal flip; vertical flip.
Rotations and translations resample with affine_grid/grid_sample (bilinear, reflection padding,
align_corners=False); masks follow the same geometry (resampled as float, then > 0.5) and are untouched by
the jitter. Flips are exact index flips (the same as the affine x -> -x under align_corners=False).

Two variants of the zoom and the jitter (`variant`, the trainer's `--augment-variant`):

* "reference" (default): what the authors' utils.py computes. Zoom x s crops the centre ``int(H / s)`` rows
  (and ``int(W / s)`` columns), ``[(H - h') // 2, (H + h') // 2)``, and resizes it back with bilinear
  interpolation (align_corners=False), so x1.15 on 240 pixels crops 208 and is really x1.154. The jitter
  multiplies by a brightness factor b first, then scales contrast by c about the mean of each pixel COLUMN
  over channels and rows (the reference's ``x.mean(dim=[1, 2])`` on a [B, C, H, W] batch), then clamps to
  [0, 1]. One (b, c) pair is drawn per batch, and a batch there is one call of its augment(): all abnormal
  shots, then all normal shots. Here the pair is drawn per class from ``torch.Generator().manual_seed(seed)``,
  abnormal class first, b then c, each as ``1 + u * 0.4 - 0.2`` with u = torch.rand(1). (The reference draws
  from the global torch RNG after model construction, so its exact values cannot be reproduced; the
  arithmetic and the sharing across a class are.)
* "exact": the zoom is the exact affine x s about the centre (grid_sample, like the rotations), and the jitter
  draws one pair per image and applies contrast about the image's overall mean, then brightness.

Images must be in [0, 1] (preprocessed with normalize="none"): the jitter clamps to that range.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

N_VARIANTS = 16
_ROTATIONS = (-math.pi / 8, -math.pi / 16, math.pi / 16, math.pi / 8)
_TRANSLATIONS = ((0.1, 0.1), (0.1, -0.1), (-0.1, 0.1), (-0.1, -0.1))
_ZOOMS = (1.1, 1.15, 1.2, 1.3)
JITTER_RANGE = 0.2  # brightness and contrast factors uniform in [1 - 0.2, 1 + 0.2]
AUGMENT_VARIANTS = ("reference", "exact")

VARIANTS = (
    ("original",)
    + tuple(f"rotate{a:+.4f}" for a in _ROTATIONS)
    + tuple(f"translate({tx:+.1f},{ty:+.1f})" for tx, ty in _TRANSLATIONS)
    + tuple(f"zoom{z:g}" for z in _ZOOMS)
    + ("jitter", "hflip", "vflip")
)
assert len(VARIANTS) == N_VARIANTS


def _affine_thetas(with_zooms: bool = True) -> torch.Tensor:
    """The geometric (non-flip) transforms as affine_grid matrices, output -> input coords: [12, 2, 3]
    (rotations, translations, exact zooms), or [8, 2, 3] without the zooms."""
    mats = []
    for a in _ROTATIONS:
        c, s = math.cos(a), math.sin(a)
        mats.append([[c, -s, 0.0], [s, c, 0.0]])
    for tx, ty in _TRANSLATIONS:
        mats.append([[1.0, 0.0, tx], [0.0, 1.0, ty]])
    if with_zooms:
        for z in _ZOOMS:  # zoom in about the centre: output samples a 1/z-sized centre window
            mats.append([[1.0 / z, 0.0, 0.0], [0.0, 1.0 / z, 0.0]])
    return torch.tensor(mats, dtype=torch.float64)


def zoom_crop(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference's zoom: crop the centre int(H/scale) x int(W/scale) and resize back (bilinear).

    x [B, C, H, W] -> [B, C, H, W]. Index arithmetic as in the authors' code: rows (H - h') // 2 to
    (H + h') // 2 (h' rows when H - h' is even; one fewer when odd, as there).
    """
    _, _, h, w = x.shape
    nh, nw = int(h / scale), int(w / scale)
    crop = x[:, :, (h - nh) // 2 : (h + nh) // 2, (w - nw) // 2 : (w + nw) // 2]
    return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)


def warp_batch(x: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
    """Apply every theta to every image: x [B, C, H, W], thetas [T, 2, 3] -> [B, T, C, H, W]."""
    b, c, h, w = x.shape
    t = thetas.shape[0]
    grid = F.affine_grid(thetas.to(x.dtype), [t, c, h, w], align_corners=False)  # [T, H, W, 2]
    grid = grid.repeat(b, 1, 1, 1)  # [B*T, H, W, 2]
    src = x.repeat_interleave(t, dim=0)  # [B*T, C, H, W]
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.view(b, t, c, h, w)


def reference_jitter_factors(groups: torch.Tensor, seed: int) -> torch.Tensor:
    """One (brightness, contrast) pair per class, shared by all its images: float64 [n, 2] for labels `groups` [n].

    Drawn from torch.Generator(seed) in the reference's call order (abnormal shots first, then normal; any
    other group values after, ascending), each factor as 1 + u * 2 * 0.2 - 0.2 with u = torch.rand(1).
    """
    g = torch.Generator().manual_seed(int(seed))
    out = torch.empty((len(groups), 2), dtype=torch.float64)
    values = sorted({int(v) for v in groups.tolist()}, key=lambda v: (v != 1, v != 0, v))
    for v in values:
        pair = []
        for _ in range(2):  # brightness, then contrast, as the reference draws them
            u = torch.rand(1, generator=g).item()
            pair.append(1.0 + u * JITTER_RANGE * 2 - JITTER_RANGE)
        out[groups == v] = torch.tensor(pair, dtype=torch.float64)
    return out


def jitter_reference(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """The reference's colour jitter: x * b, then contrast c about each column's mean over channels and rows,
    then clamp [0, 1]. x [B, C, H, W], factors [B, 2] (b, c)."""
    bright = factors[:, 0].to(x.dtype).view(-1, 1, 1, 1)
    contrast = factors[:, 1].to(x.dtype).view(-1, 1, 1, 1)
    y = x * bright
    mean = y.mean(dim=(1, 2), keepdim=True)  # [B, 1, 1, W]: per column, over channels and rows
    return ((y - mean) * contrast + mean).clamp_(0.0, 1.0)


def jitter_factors(n: int, seed: int) -> torch.Tensor:
    """Brightness and contrast factors per source image, float64 [n, 2], from torch.Generator(seed)."""
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand((n, 2), generator=g, dtype=torch.float64)  # [n, 2] in [0, 1)
    return 1.0 + JITTER_RANGE * (2.0 * u - 1.0)


def _jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Contrast about each image's mean, then brightness, clamp [0, 1]: x [B, C, H, W], factors [B, 2]."""
    bright = factors[:, 0].to(x.dtype).view(-1, 1, 1, 1)
    contrast = factors[:, 1].to(x.dtype).view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (((x - mean) * contrast + mean) * bright).clamp_(0.0, 1.0)


@torch.no_grad()
def augment_x16(
    images: torch.Tensor,
    masks: torch.Tensor,
    seed: int,
    chunk: int = 8,
    variant: str = "reference",
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """images float [N, 3, S, S] in [0, 1], masks bool [N, S, S] -> ([16N, 3, S, S], bool [16N, S, S], long [16N]).

    The third output is the source index of each variant (0,0,...,0,1,...). Deterministic for a fixed seed;
    `chunk` source images are transformed at a time to bound peak memory. `variant`: "reference" or "exact"
    (module docstring). `groups` [N] (the labels): images sharing a group share the reference's jitter
    factors (default: one group for all).
    """
    if variant not in AUGMENT_VARIANTS:
        raise ValueError(f"unknown augmentation variant {variant!r} (expected one of {AUGMENT_VARIANTS})")
    if (
        images.dim() != 4
        or masks.dim() != 3
        or images.shape[0] != masks.shape[0]
        or images.shape[2:] != masks.shape[1:]
    ):
        raise ValueError(
            f"expected images [N, C, H, W] and masks [N, H, W], got {tuple(images.shape)} and {tuple(masks.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")
    n, c, h, w = images.shape
    reference = variant == "reference"
    thetas = _affine_thetas(with_zooms=not reference)  # [8 or 12, 2, 3]
    if reference:
        grp = torch.zeros(n, dtype=torch.long) if groups is None else torch.as_tensor(groups).long().cpu()
        factors = reference_jitter_factors(grp, seed)  # [N, 2], shared within a group
    else:
        factors = jitter_factors(
            n, seed
        )  # [N, 2]; drawn for all images at once, so chunking does not change them
    out_img = torch.empty((n, N_VARIANTS, c, h, w), dtype=images.dtype, device=images.device)
    out_mask = torch.empty((n, N_VARIANTS, h, w), dtype=torch.bool, device=images.device)
    for start in range(0, n, max(1, int(chunk))):
        x = images[start : start + chunk]  # [B, C, H, W]
        m = masks[start : start + chunk].bool()  # [B, H, W]
        mf = m.to(images.dtype).unsqueeze(1)  # [B, 1, H, W]
        sl = slice(start, start + x.shape[0])
        out_img[sl, 0] = x
        out_mask[sl, 0] = m
        xm = torch.cat([x, mf], dim=1)  # [B, C+1, H, W]: the mask rides as an extra channel
        warped = warp_batch(xm, thetas)  # [B, 8 or 12, C+1, H, W]
        if reference:
            zooms = torch.stack([zoom_crop(xm, z) for z in _ZOOMS], dim=1)  # [B, 4, C+1, H, W]
            warped = torch.cat([warped, zooms], dim=1)  # [B, 12, C+1, H, W]
        out_img[sl, 1:13] = warped[:, :, :c]
        out_mask[sl, 1:13] = warped[:, :, c] > 0.5
        out_img[sl, 13] = jitter_reference(x, factors[sl]) if reference else _jitter(x, factors[sl])
        out_mask[sl, 13] = m
        out_img[sl, 14] = torch.flip(x, dims=(3,))
        out_mask[sl, 14] = torch.flip(m, dims=(2,))
        out_img[sl, 15] = torch.flip(x, dims=(2,))
        out_mask[sl, 15] = torch.flip(m, dims=(1,))
    index = torch.arange(n, device=images.device).repeat_interleave(N_VARIANTS)  # [16N]
    return out_img.view(n * N_VARIANTS, c, h, w), out_mask.view(n * N_VARIANTS, h, w), index


def _no_augmentation(images: torch.Tensor, masks: torch.Tensor, seed: int):
    return images, masks, torch.arange(images.shape[0], device=images.device)


# The offline augmentations a method can name (`MethodModel.augmentation`): kind -> fn(images, masks, seed)
# returning (images, masks, source index of each output).
AUGMENTATIONS = {"x16": augment_x16, "none": _no_augmentation}


def augment_shots(
    kind: str,
    images: torch.Tensor,
    masks: torch.Tensor,
    seed: int,
    variant: str = "reference",
    groups: torch.Tensor | None = None,
):
    """Offline augmentation `kind` of [0, 1] shots: (images, masks, source index), see AUGMENTATIONS.

    `variant` and `groups` (the shots' labels: the reference draws one jitter pair per class) apply to "x16".
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r} (known: {', '.join(AUGMENTATIONS)})")
    if kind == "x16":
        return augment_x16(images, masks, seed, variant=variant, groups=groups)
    return AUGMENTATIONS[kind](images, masks, seed)
