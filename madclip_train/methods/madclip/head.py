"""The one score head (docs/METHODS.md §5), used by training, evaluation and the exported graph.

S_n = O_n.t_n - O_n.t_ab = -O_n.dt and S_ab = O_ab.t_ab - O_ab.t_n = O_ab.dt with dt = t_ab - t_n, so
p_ab = softmax([S_n, S_ab])[1] = sigmoid(S_ab - S_n) = sigmoid((O_ab + O_n).dt). Only dt matters at inference.
"""

from __future__ import annotations

import torch

from madclip_runtime.contract import ANOMALY_MAP, SCORE, SCORE_MAP_MAX

from ...maps import upsample_logits


def branch_logits(
    o_n: torch.Tensor, o_ab: torch.Tensor, dt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors [..., P, E] of both branches and dt [E] -> (S_n, S_ab), each [..., P]. No temperature."""
    return -(o_n @ dt), o_ab @ dt


def score_outputs(
    det_logit: torch.Tensor, seg_logit: torch.Tensor, image_size: int
) -> dict[str, torch.Tensor]:
    """Image score AC [B] (sum over layers of mean p_ab, det head), map AS [B, 1, S, S] (sum over layers of the
    upsampled seg p_ab) and its maximum [B]. Inputs are anomaly logits [L, B, P]. Ranges [0, L]."""
    score = torch.sigmoid(det_logit).mean(dim=2).sum(dim=0)  # [B]
    amap = torch.sigmoid(upsample_logits(seg_logit, image_size)).sum(dim=0)  # [B, S, S]
    amap = amap.unsqueeze(1)  # [B, 1, S, S]
    return {SCORE: score, ANOMALY_MAP: amap, SCORE_MAP_MAX: amap.flatten(1).amax(dim=1)}
