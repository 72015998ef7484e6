"""MediCLIP's loss on the single (layer-mean) map: focal + Dice, weight 1 each.

Focal (the reference's FocalLoss: gamma 2, alpha 1, one-hot clamped to [1e-5, 1 - 1e-5],
p_t = sum_c onehot_c P_c + 1e-5, mean over all pixels). The class index of a pixel is `label.long()`:
integer TRUNCATION, so any soft label below 1.0 counts as normal (faithful default, `focal_target="truncate"`);
`"threshold"` uses label >= 0.5 instead. Dice (BinaryDiceLoss: smooth 1, per image, mean) uses the soft labels.
"""

from __future__ import annotations

import torch

from ...maps import dice_loss

SMOOTH = 1e-5
FOCAL_TARGETS = ("truncate", "threshold")


def focal_target(labels: torch.Tensor, mode: str = "truncate") -> torch.Tensor:
    """Soft labels [B, S, S] in [0, 1] -> class index (0 normal, 1 abnormal), long."""
    if mode == "truncate":
        return labels.long()
    if mode == "threshold":
        return (labels >= 0.5).long()
    raise ValueError(f"focal_target must be one of {FOCAL_TARGETS}, got {mode!r}")


def focal_loss(
    p_n: torch.Tensor, p_ab: torch.Tensor, target: torch.Tensor, gamma: float = 2.0
) -> torch.Tensor:
    """p_n, p_ab [B, S, S] (softmax over the two classes), target long [B, S, S] -> scalar."""
    t = target.to(p_ab.dtype)
    p_t = (1.0 - t).clamp(SMOOTH, 1 - SMOOTH) * p_n + t.clamp(SMOOTH, 1 - SMOOTH) * p_ab + SMOOTH
    return (-((1.0 - p_t) ** gamma) * torch.log(p_t)).mean()


def mediclip_loss(
    logit: torch.Tensor, labels: torch.Tensor, mode: str = "truncate"
) -> dict[str, torch.Tensor]:
    """logit [B, S, S] = upsampled mean-over-layers (S_ab - S_n); labels [B, S, S] soft in [0, 1].

    softmax([S_n, S_ab]) = (sigmoid(-logit), sigmoid(logit)).
    """
    p_ab, p_n = torch.sigmoid(logit), torch.sigmoid(-logit)
    focal = focal_loss(p_n, p_ab, focal_target(labels, mode))
    dice = dice_loss(p_ab, labels)
    return {"focal": focal, "dice": dice, "total": focal + dice}
