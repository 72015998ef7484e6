"""Offline x16 augmentation of the few shots (docs/METHODS.md §7), done once before training.

Per source image, 16 consecutive variants (VARIANTS gives their names, in order): the original; rotations by
-pi/8, -pi/16, +pi/16, +pi/8; translations by (+-0.1, +-0.1) normalised grid units; centre zooms x1.1, x1.15,
x1.2, x1.3; one brightness/contrast jitter (+-20 %, clamped to [0, 1]); horizontal flip; vertical flip.
Geometric variants resample with affine_grid/grid_sample (bilinear, reflection padding, align_corners=False);
masks follow the same geometry (resampled as float, then > 0.5) and are untouched by the jitter. Flips are
exact index flips (the same as the affine x -> -x under align_corners=False, without resampling error).

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

VARIANTS = (
    ("original",)
    + tuple(f"rotate{a:+.4f}" for a in _ROTATIONS)
    + tuple(f"translate({tx:+.1f},{ty:+.1f})" for tx, ty in _TRANSLATIONS)
    + tuple(f"zoom{z:g}" for z in _ZOOMS)
    + ("jitter", "hflip", "vflip")
)
assert len(VARIANTS) == N_VARIANTS


def _affine_thetas() -> torch.Tensor:
    """The 12 geometric (non-flip) transforms as affine_grid matrices, output -> input coords: [12, 2, 3]."""
    mats = []
    for a in _ROTATIONS:
        c, s = math.cos(a), math.sin(a)
        mats.append([[c, -s, 0.0], [s, c, 0.0]])
    for tx, ty in _TRANSLATIONS:
        mats.append([[1.0, 0.0, tx], [0.0, 1.0, ty]])
    for z in _ZOOMS:  # zoom in about the centre: output samples a 1/z-sized centre window
        mats.append([[1.0 / z, 0.0, 0.0], [0.0, 1.0 / z, 0.0]])
    return torch.tensor(mats, dtype=torch.float64)  # [12, 2, 3]


def _warp(x: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
    """Apply every theta to every image: x [B, C, H, W], thetas [T, 2, 3] -> [B, T, C, H, W]."""
    b, c, h, w = x.shape
    t = thetas.shape[0]
    grid = F.affine_grid(thetas.to(x.dtype), [t, c, h, w], align_corners=False)  # [T, H, W, 2]
    grid = grid.repeat(b, 1, 1, 1)  # [B*T, H, W, 2]
    src = x.repeat_interleave(t, dim=0)  # [B*T, C, H, W]
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.view(b, t, c, h, w)


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
    images: torch.Tensor, masks: torch.Tensor, seed: int, chunk: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """images float [N, 3, S, S] in [0, 1], masks bool [N, S, S] -> ([16N, 3, S, S], bool [16N, S, S], long [16N]).

    The third output is the source index of each variant (0,0,...,0,1,...). Deterministic for a fixed seed;
    `chunk` source images are transformed at a time to bound peak memory.
    """
    if images.dim() != 4 or masks.dim() != 3 or images.shape[0] != masks.shape[0] or images.shape[2:] != masks.shape[1:]:
        raise ValueError(f"expected images [N, C, H, W] and masks [N, H, W], got {tuple(images.shape)} and {tuple(masks.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")
    n, c, h, w = images.shape
    thetas = _affine_thetas()  # [12, 2, 3]
    factors = jitter_factors(n, seed)  # [N, 2]; drawn for all images at once, so chunking does not change them
    out_img = torch.empty((n, N_VARIANTS, c, h, w), dtype=images.dtype, device=images.device)
    out_mask = torch.empty((n, N_VARIANTS, h, w), dtype=torch.bool, device=images.device)
    for start in range(0, n, max(1, int(chunk))):
        x = images[start : start + chunk]  # [B, C, H, W]
        m = masks[start : start + chunk].bool()  # [B, H, W]
        mf = m.to(images.dtype).unsqueeze(1)  # [B, 1, H, W]
        sl = slice(start, start + x.shape[0])
        out_img[sl, 0] = x
        out_mask[sl, 0] = m
        warped = _warp(torch.cat([x, mf], dim=1), thetas)  # [B, 12, C+1, H, W]: mask rides as an extra channel
        out_img[sl, 1:13] = warped[:, :, :c]
        out_mask[sl, 1:13] = warped[:, :, c] > 0.5
        out_img[sl, 13] = _jitter(x, factors[sl])
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


def augment_shots(kind: str, images: torch.Tensor, masks: torch.Tensor, seed: int):
    """Offline augmentation `kind` of [0, 1] shots: (images, masks, source index), see AUGMENTATIONS."""
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r} (known: {', '.join(AUGMENTATIONS)})")
    return AUGMENTATIONS[kind](images, masks, seed)
