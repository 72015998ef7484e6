"""Patch logits -> pixel maps, and the pixel losses (focal, Dice) that several methods share.

The formulas are the references' (bilinear upsampling with align_corners=True; the clamped one-hot focal loss;
Dice with smooth 1 per image, then the mean), used by MadCLIP, MVFA and MediCLIP alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upsample_logits(logit: torch.Tensor, image_size: int) -> torch.Tensor:
    """Per-layer patch logits [L, B, P] -> [L, B, S, S], bilinear with align_corners=True (the reference's)."""
    n_layers, batch, n_patch = logit.shape
    grid = int(round(n_patch**0.5))
    x = logit.reshape(n_layers * batch, 1, grid, grid)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=True)
    return x.reshape(n_layers, batch, image_size, image_size)


def focal_loss(p_ab: torch.Tensor, masks: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """p_ab [B, S, S] (P_n = 1 - p_ab), masks bool [B, S, S] -> scalar (the reference's clamped one-hot form)."""
    target = masks.to(p_ab.dtype).clamp(1e-5, 1.0 - 1e-5)  # one-hot over (normal, abnormal), clamped
    p_t = (1.0 - target) * (1.0 - p_ab) + target * p_ab + 1e-5
    return (-((1.0 - p_t) ** gamma) * torch.log(p_t)).mean()


def dice_loss(p_ab: torch.Tensor, masks: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - Dice per image (smooth 1), then the mean over the batch. p_ab, masks [B, S, S]."""
    m = masks.to(p_ab.dtype).flatten(1)
    p = p_ab.flatten(1)
    dice = (2.0 * (p * m).sum(1) + smooth) / (p.sum(1) + m.sum(1) + smooth)
    return (1.0 - dice).mean()
