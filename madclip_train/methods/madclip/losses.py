"""MadCLIP's losses (docs/METHODS.md §6), per tapped layer and summed over the layers.

- Detection ("SigLIP") loss on the det logits, no temperature or bias: with z = 2y - 1,
  L_det = -(1/B) sum_b [mean_p log sigmoid(-z_b S_n) + mean_p log sigmoid(z_b S_ab)].
- With masks, on the upsampled seg probabilities P = softmax([S_n, S_ab]): focal loss (gamma 2, one-hot target
  clamped to [1e-5, 1 - 1e-5], p_t = sum_c onehot_c P_c + 1e-5, mean over all pixels) and Dice on p_ab
  (smooth 1, per image, then mean; normal images with empty masks included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...maps import dice_loss, focal_loss, upsample_logits


def siglip_detection_loss(s_n: torch.Tensor, s_ab: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """S_n, S_ab [B, P] for one layer, labels [B] in {0, 1} -> scalar."""
    z = (2.0 * labels.to(s_n.dtype) - 1.0).unsqueeze(1)  # [B, 1]
    per_image = F.logsigmoid(-z * s_n).mean(dim=1) + F.logsigmoid(z * s_ab).mean(dim=1)  # [B]
    return -per_image.mean()


def madclip_loss(
    logits: dict[str, torch.Tensor], labels: torch.Tensor, masks: torch.Tensor | None, image_size: int
) -> dict[str, torch.Tensor]:
    """Total loss and its parts from `MadCLIP.branch_logits` output ([L, B, P] each).

    masks None (datasets without masks) -> detection loss only.
    """
    n_layers = logits["det_n"].shape[0]
    det = sum(siglip_detection_loss(logits["det_n"][i], logits["det_ab"][i], labels) for i in range(n_layers))
    parts = {"det": det}
    if masks is not None:
        p_ab = torch.sigmoid(upsample_logits(logits["seg_ab"] - logits["seg_n"], image_size))  # [L, B, S, S]
        parts["focal"] = sum(focal_loss(p_ab[i], masks) for i in range(n_layers))
        parts["dice"] = sum(dice_loss(p_ab[i], masks) for i in range(n_layers))
    parts["total"] = sum(parts.values())
    return parts
