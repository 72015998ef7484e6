"""MVFA's training losses, per tapped layer and summed over the layers (weights 1).

- det: a = mean over patches of softmax(100 f.T)_ab (a probability). The reference feeds a to
  BCEWithLogitsLoss, i.e. sigmoid(a) with a already in [0, 1]: sigmoid(a) stays in [0.5, 0.731], so the loss
  never goes below 0.313 (y = 1) / 0.693 (y = 0). Reproduced by default (`det_loss="bce_on_prob"`); the
  clean variant `det_loss="bce"` is the plain binary cross-entropy on a.
- seg (datasets with masks): P = softmax of the upsampled 2-class logits; focal (gamma 2, clamped one-hot)
  + Dice on P_ab, the same formulas as MadCLIP's (madclip_train.maps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...maps import dice_loss, focal_loss
from .scores import patch_logits, upsample

DET_LOSSES = ("bce_on_prob", "bce")


def det_loss(
    mids: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, kind: str = "bce_on_prob"
) -> torch.Tensor:
    """mids [L, B, 1+P, E], labels [B] -> scalar, summed over layers (mean over the batch per layer)."""
    a = torch.softmax(patch_logits(mids, text), dim=-1)[..., 1].mean(dim=2)  # [L, B]
    y = labels.to(a.dtype).expand_as(a)
    if kind == "bce_on_prob":
        per = F.binary_cross_entropy_with_logits(a, y, reduction="none")
    elif kind == "bce":
        per = F.binary_cross_entropy(a.clamp(1e-7, 1 - 1e-7), y, reduction="none")
    else:
        raise ValueError(f"det_loss must be one of {DET_LOSSES}, got {kind!r}")
    return per.mean(dim=1).sum()


def seg_losses(
    mids: torch.Tensor, text: torch.Tensor, masks: torch.Tensor, image_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """mids [L, B, 1+P, E], masks [B, S, S] -> (focal, dice), each summed over layers."""
    logits = patch_logits(mids, text)  # [L, B, P, 2]
    n_layers, b, p, _ = logits.shape
    up = upsample(logits.reshape(n_layers * b, p, 2).transpose(1, 2), image_size)  # [L*B, 2, S, S]
    p_ab = torch.softmax(up, dim=1)[:, 1].reshape(n_layers, b, image_size, image_size)
    m = masks > 0.5
    focal = sum(focal_loss(p_ab[i], m) for i in range(n_layers))
    dice = sum(dice_loss(p_ab[i], m) for i in range(n_layers))
    return focal, dice
