"""MVFA's offline x11 augmentation of the few shots, on the same resampling arithmetic as MadCLIP's x16
(madclip_train.augment: affine_grid + grid_sample, bilinear, reflection padding, align_corners=False; masks
resampled as float then > 0.5; flips as exact index flips).

Per source image, 11 consecutive variants (VARIANTS): the original; rotations by -pi/8, -pi/16, +pi/16, +pi/8;
translations by (+.1,+.1), (-.1,+.1), (-.1,-.1), (+.1,-.1) normalised grid units (the reference's order);
horizontal flip; vertical flip. No zoom and no jitter (MadCLIP's recipe adds those). Deterministic.
"""

from __future__ import annotations

import math

import torch

from ...augment import AUGMENTATIONS, warp_batch

N_VARIANTS = 11
_ROTATIONS = (-math.pi / 8, -math.pi / 16, math.pi / 16, math.pi / 8)
_TRANSLATIONS = ((0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))
VARIANTS = (
    ("original",)
    + tuple(f"rotate{a:+.4f}" for a in _ROTATIONS)
    + tuple(f"translate({tx:+.1f},{ty:+.1f})" for tx, ty in _TRANSLATIONS)
    + ("hflip", "vflip")
)


def _thetas() -> torch.Tensor:
    """The 8 rotations/translations as affine_grid matrices [8, 2, 3] (output -> input coordinates)."""
    mats = [[[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]] for a in _ROTATIONS]
    mats += [[[1.0, 0.0, tx], [0.0, 1.0, ty]] for tx, ty in _TRANSLATIONS]
    return torch.tensor(mats, dtype=torch.float64)


@torch.no_grad()
def augment_x11(
    images: torch.Tensor, masks: torch.Tensor, chunk: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """images float [N, 3, S, S] in [0, 1], masks bool [N, S, S] -> ([11N, 3, S, S], bool [11N, S, S], long [11N]).

    The third output is the source index of each variant (0 x 11, 1 x 11, ...).
    """
    if (
        images.dim() != 4
        or masks.dim() != 3
        or images.shape[0] != masks.shape[0]
        or images.shape[2:] != masks.shape[1:]
    ):
        raise ValueError(
            f"expected images [N, C, H, W] and masks [N, H, W], got {tuple(images.shape)} and {tuple(masks.shape)}"
        )
    n, c, h, w = images.shape
    thetas = _thetas()
    out_img = torch.empty((n, N_VARIANTS, c, h, w), dtype=images.dtype, device=images.device)
    out_mask = torch.empty((n, N_VARIANTS, h, w), dtype=torch.bool, device=images.device)
    for start in range(0, n, max(1, int(chunk))):
        x = images[start : start + chunk]
        m = masks[start : start + chunk].bool()
        sl = slice(start, start + x.shape[0])
        out_img[sl, 0], out_mask[sl, 0] = x, m
        warped = warp_batch(torch.cat([x, m.to(x.dtype).unsqueeze(1)], dim=1), thetas)  # [B, 8, C+1, H, W]
        out_img[sl, 1:9] = warped[:, :, :c]
        out_mask[sl, 1:9] = warped[:, :, c] > 0.5
        out_img[sl, 9], out_mask[sl, 9] = torch.flip(x, dims=(3,)), torch.flip(m, dims=(2,))
        out_img[sl, 10], out_mask[sl, 10] = torch.flip(x, dims=(2,)), torch.flip(m, dims=(1,))
    index = torch.arange(n, device=images.device).repeat_interleave(N_VARIANTS)
    return out_img.view(n * N_VARIANTS, c, h, w), out_mask.view(n * N_VARIANTS, h, w), index


def _x11(images: torch.Tensor, masks: torch.Tensor, seed: int):
    return augment_x11(images, masks)  # deterministic: the seed is not used


AUGMENTATIONS.setdefault("x11", _x11)  # MethodModel.augmentation = "x11" (madclip_train.augment's registry)
