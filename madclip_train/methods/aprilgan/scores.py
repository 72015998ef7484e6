"""APRIL-GAN's maps and scores, from the tapped residual streams of the frozen tower.

Shapes: taps [B, L, 1+P, W] (the raw residual stream after each tapped block, CLS first); T [E, 2] unit columns
(normal, abnormal); P patches on a g x g grid; S the input size.

- zero-shot map Z (the trained part): per layer the patch tokens go through that layer's linear layer (W -> E,
  with bias), are L2-normalised and compared with T at logit scale 100; the two-class logits are upsampled
  bilinearly (align_corners=True) to S x S, soft-maxed, and P(abnormal) is summed over the layers: Z in [0, L].
- few-shot map F (no training): per layer, the *raw* patch tokens (W-d, not the linear outputs) against a bank of
  the normal shots' raw patch tokens: 1 - max cosine per patch, upsampled the same way, summed: F in [0, 2L].
- anomaly map A = Z + F (Z alone without a bank).
- text probability p: the CLS token of the last block through ln_post and the projection, L2-normalised,
  softmax(100 p . T)[abnormal]: in [0, 1].
- image score = 0.5 (p + (max A - lo) / (hi - lo)): the reference takes lo, hi as the min and max of max A over
  the whole test set (transductive, `transductive_score`); the deployable default uses constants fixed on the
  training shots (bank.py). Without a bank the score is p.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOGIT_SCALE = 100.0


def upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """[N, C, P] patch values -> [N, C, S, S], bilinear with align_corners=True (the reference's)."""
    n, c, p = x.shape
    g = int(round(p**0.5))
    return F.interpolate(x.reshape(n, c, g, g), size=(size, size), mode="bilinear", align_corners=True)


def layer_logits(taps: torch.Tensor, linear: nn.ModuleList, text: torch.Tensor) -> torch.Tensor:
    """-> 100 <normalise(linear_l(patch tokens)), T>: [L, B, P, 2]."""
    out = [LOGIT_SCALE * (F.normalize(fc(taps[:, j, 1:]), dim=-1) @ text) for j, fc in enumerate(linear)]
    return torch.stack(out)


def layer_probs(logits: torch.Tensor, image_size: int) -> torch.Tensor:
    """[L, B, P, 2] logits -> per-layer two-class probability maps [L, B, 2, S, S] (upsample, then softmax)."""
    n_layers, b, p, _ = logits.shape
    up = upsample(logits.reshape(n_layers * b, p, 2).transpose(1, 2), image_size)
    return torch.softmax(up, dim=1).reshape(n_layers, b, 2, image_size, image_size)


def zero_shot_map(
    taps: torch.Tensor, linear: nn.ModuleList, text: torch.Tensor, image_size: int
) -> torch.Tensor:
    """Z [B, S, S] = sum over layers of P(abnormal)."""
    return layer_probs(layer_logits(taps, linear, text), image_size)[:, :, 1].sum(dim=0)


def patch_distances(
    taps: torch.Tensor, bank: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """1 - max cosine of each raw patch token against the bank: taps [B, L, 1+P, W], bank [L, N, W] unit rows
    -> [L, B, P]. exclude: bool [B, N], True where a bank row may not match that image (cross-fitting)."""
    out = []
    for j in range(bank.shape[0]):
        sim = F.normalize(taps[:, j, 1:], dim=-1) @ bank[j].transpose(0, 1)  # [B, P, N]
        if exclude is not None:
            sim = sim.masked_fill(exclude[:, None, :], float("-inf"))
        out.append(1.0 - sim.amax(dim=-1))
    return torch.stack(out)


def few_shot_map(dist: torch.Tensor, image_size: int) -> torch.Tensor:
    """[L, B, P] distances -> F [B, S, S] (per layer upsampled, summed)."""
    n_layers, b, p = dist.shape
    return (
        upsample(dist.reshape(n_layers * b, 1, p), image_size)
        .reshape(n_layers, b, image_size, image_size)
        .sum(0)
    )


def image_embedding(taps: torch.Tensor, visual: nn.Module) -> torch.Tensor:
    """CLIP's image embedding from the last tap's CLS token (the last tap is the last block): ln_post, proj."""
    pooled = visual.ln_post(taps[:, -1, 0])
    return pooled @ visual.proj if visual.proj is not None else pooled


def text_probability(taps: torch.Tensor, visual: nn.Module, text: torch.Tensor) -> torch.Tensor:
    """p [B] = softmax(100 normalise(image embedding) . T)[abnormal]."""
    emb = F.normalize(image_embedding(taps, visual), dim=-1)
    return torch.softmax(LOGIT_SCALE * (emb @ text), dim=-1)[:, 1]


def fixed_score(p: torch.Tensor, amax: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """0.5 (p + (max A - lo) scale) with fixed normalisers (scale = 1 / (hi - lo))."""
    return 0.5 * (p + (amax - lo) * scale)


def minmax_constants(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo [1], scale [1]) from the min and max of a set of values (a constant set gets scale 1)."""
    lo = values.min().float().reshape(1)
    rng = values.max().float().reshape(1) - lo
    return lo, torch.where(rng > 0, 1.0 / rng.clamp_min(1e-12), torch.ones_like(rng))


def transductive_score(p: np.ndarray, amax: np.ndarray) -> np.ndarray:
    """The reference's image score: max A min-max normalised over the whole test set, averaged with p."""
    amax = np.asarray(amax, dtype=np.float64)
    rng = amax.max() - amax.min()
    return 0.5 * (np.asarray(p, dtype=np.float64) + (amax - amax.min()) / (rng if rng > 0 else 1.0))
