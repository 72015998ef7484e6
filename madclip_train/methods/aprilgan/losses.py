"""APRIL-GAN's training loss: per tapped layer, focal + Dice on the upsampled two-class probability map, summed
over the layers (weights 1).

- focal (gamma 2): target one-hot over (normal, abnormal) from the binarised mask, clamped to [1e-5, 1 - 1e-5];
  p_t = sum_c onehot_c P_c + 1e-5; mean of -(1 - p_t)^2 log p_t over every pixel of the batch. Computed on both
  channels of the softmax, as the reference (not on 1 - P_ab: the last bits differ).
- Dice on P_ab: 1 - (2 sum P m + 1) / (sum P + sum m + 1) per image, mean over the batch (normal images with
  empty masks included).
"""

from __future__ import annotations

import torch

from .scores import layer_probs

SMOOTH = 1e-5


def focal_loss(probs: torch.Tensor, masks: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """probs [B, 2, S, S] (softmax over the channel), masks bool [B, S, S] -> scalar."""
    m = masks.to(probs.dtype)
    onehot = torch.stack([1.0 - m, m], dim=1).clamp(SMOOTH, 1.0 - SMOOTH)
    p_t = (onehot * probs).sum(dim=1) + SMOOTH
    return (-((1.0 - p_t) ** gamma) * torch.log(p_t)).mean()


def dice_loss(p_ab: torch.Tensor, masks: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    m = masks.to(p_ab.dtype).flatten(1)
    p = p_ab.flatten(1)
    dice = (2.0 * (p * m).sum(1) + smooth) / (p.sum(1) + m.sum(1) + smooth)
    return 1.0 - dice.sum() / p.shape[0]


def aprilgan_loss(logits: torch.Tensor, masks: torch.Tensor, image_size: int) -> dict[str, torch.Tensor]:
    """logits [L, B, P, 2] (scores.layer_logits), masks [B, S, S] (binarised at 0.5) -> {focal, dice, total}."""
    probs = layer_probs(logits, image_size)  # [L, B, 2, S, S]
    m = masks > 0.5 if masks.dtype != torch.bool else masks
    focal = sum(focal_loss(probs[j], m) for j in range(probs.shape[0]))
    dice = sum(dice_loss(probs[j, :, 1], m) for j in range(probs.shape[0]))
    return {"focal": focal, "dice": dice, "total": focal + dice}
