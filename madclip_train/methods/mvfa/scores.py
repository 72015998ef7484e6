"""MVFA's zero-shot (text) and few-shot (memory bank) maps and how they are mixed.

All functions take the adapters' mid tokens of one head, mids [L, B, 1+P, E] (CLS first, not normalised), and
return sums over the L layers, as the reference does:
- zero-shot: per layer the logits 100 f.T (f unit patch tokens, T [E, 2]) are upsampled bilinear
  (align_corners=True) to S x S *before* the softmax; Z = sum_l p_ab, in [0, L]. The image-level z is
  sum_l mean_p softmax(100 f.T)_ab on the patch grid (no upsampling).
- few-shot: per patch 1 - max cosine similarity against the layer's bank (a nearest neighbour, computed as a
  matmul + reduce on unit vectors), 17 x 17 -> S x S bilinear (align_corners=True); F = sum_l, in [0, 2L];
  the image-level f is the mean of F over S x S.
- mixing: A = 0.5 (Z - Zlo) / (Zhi - Zlo) + 0.5 (F - Flo) / (Fhi - Flo) with fixed normalisers (deployable) or
  the test set's min/max (the reference; `transductive_mix`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

LOGIT_SCALE = 100.0


def upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """[N, C, P] patch values -> [N, C, S, S] bilinear, align_corners=True (the reference's)."""
    n, c, p = x.shape
    g = int(round(p**0.5))
    return F.interpolate(x.reshape(n, c, g, g), size=(size, size), mode="bilinear", align_corners=True)


def patch_logits(mids: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """mids [L, B, 1+P, E], text [E, 2] -> 100 f.T on the patches: [L, B, P, 2]."""
    f = F.normalize(mids[:, :, 1:], dim=-1)
    return LOGIT_SCALE * (f @ text)


def zero_shot(mids: torch.Tensor, text: torch.Tensor, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (Z [B, S, S], z [B])."""
    logits = patch_logits(mids, text)  # [L, B, P, 2]
    n_layers, b, p, _ = logits.shape
    z = torch.softmax(logits, dim=-1)[..., 1].mean(dim=2).sum(dim=0)  # [B]
    up = upsample(logits.reshape(n_layers * b, p, 2).transpose(1, 2), image_size)  # [L*B, 2, S, S]
    zmap = torch.softmax(up, dim=1)[:, 1].reshape(n_layers, b, image_size, image_size).sum(dim=0)
    return zmap, z


def nearest_distance(
    queries: torch.Tensor, bank: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """1 - max cosine similarity: queries [B, P, E] (any norm), bank [N, E] unit rows -> [B, P].

    exclude: bool [B, N], True where a bank row must not be matched by that query image (cross-fitting).
    """
    sim = F.normalize(queries, dim=-1) @ bank.transpose(0, 1)  # [B, P, N]
    if exclude is not None:
        sim = sim.masked_fill(exclude[:, None, :], float("-inf"))
    return 1.0 - sim.amax(dim=-1)


def few_shot(
    mids: torch.Tensor, banks: torch.Tensor, image_size: int, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """mids [L, B, 1+P, E], banks [L, N, E] unit rows -> (F [B, S, S], f [B])."""
    n_layers, b = mids.shape[:2]
    d = torch.stack(
        [nearest_distance(mids[i, :, 1:], banks[i], exclude) for i in range(n_layers)]
    )  # [L, B, P]
    fmap = upsample(d.reshape(n_layers * b, 1, -1), image_size).reshape(n_layers, b, image_size, image_size)
    fmap = fmap.sum(dim=0)  # [B, S, S]
    return fmap, fmap.mean(dim=(1, 2))


def mix(zv: torch.Tensor, fv: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """0.5 (Z - lo0) scale0 + 0.5 (F - lo1) scale1 with lo, scale [2] (scale = 1 / (hi - lo))."""
    return 0.5 * (zv - lo[0]) * scale[0] + 0.5 * (fv - lo[1]) * scale[1]


def minmax_constants(zv: torch.Tensor, fv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo [2], scale [2]) from the min and max of two sets of values (a constant set gets scale 1)."""
    lo = torch.stack([zv.min(), fv.min()]).float()
    rng = torch.stack([zv.max(), fv.max()]).float() - lo
    return lo, torch.where(rng > 0, 1.0 / rng.clamp_min(1e-12), torch.ones_like(rng))


def transductive_mix(zv: np.ndarray, fv: np.ndarray) -> np.ndarray:
    """The reference's evaluation: min-max each of Z and F over the whole test set, then 0.5/0.5 (any shape)."""
    zv, fv = np.asarray(zv, dtype=np.float64), np.asarray(fv, dtype=np.float64)
    zr, fr = zv.max() - zv.min(), fv.max() - fv.min()
    zn = (zv - zv.min()) / (zr if zr > 0 else 1.0)
    fn = (fv - fv.min()) / (fr if fr > 0 else 1.0)
    return 0.5 * zn + 0.5 * fn
