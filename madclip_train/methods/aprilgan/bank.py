"""APRIL-GAN's few-shot memory bank and the fixed (deployable) normalisers of its image score.

Bank (as the reference builds it): per tapped layer, the raw patch tokens (CLS dropped, W-d, before any trained
layer) of the k normal shots, un-augmented; stored unit-normalised so the nearest-neighbour search is a matmul
and a max: [L, N, W]. It does not depend on training.

Normalisers: the reference min-max normalises max A over the whole test set. The deployable default fixes lo and
hi from the training shots only, cross-fitted: a normal shot is scored against the bank *without its own
tokens* (leave one shot out), an abnormal shot against the full bank (it is never in it). So no image is
scored against itself and no test image is ever seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from madclip_runtime.errors import MadclipError

from .scores import few_shot_map, minmax_constants, patch_distances


@dataclass
class BankBuild:
    bank: torch.Tensor  # [L, N, W] unit rows
    lo: torch.Tensor  # [1]
    scale: torch.Tensor  # [1]
    info: dict


def bank_from_taps(taps: torch.Tensor) -> torch.Tensor:
    """taps [M, L, 1+P, W] of M normal images -> bank [L, M*P, W] unit rows (CLS dropped)."""
    m, n_layers, t, w = taps.shape
    return F.normalize(taps[:, :, 1:].transpose(0, 1).reshape(n_layers, m * (t - 1), w).float(), dim=-1)


@torch.no_grad()
def build_bank_and_normalisers(
    run_taps: Callable[[torch.Tensor], torch.Tensor],
    zero_map: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    originals: torch.Tensor,
    image_size: int,
    batch_size: int = 8,
) -> BankBuild:
    """run_taps(images [b, 3, S, S]) -> taps [b, L, 1+P, W]; zero_map(taps) -> Z [b, S, S] (the trained part).

    images: the preprocessed training images (views); labels [N] (1 = abnormal); groups [N] the source shot of each
    view; originals [N] bool: the un-augmented shots (the bank is built from the normal ones).
    """
    labels, groups, originals = labels.cpu(), groups.cpu(), originals.cpu().bool()
    normal = torch.nonzero((labels == 0) & originals).flatten()
    if len(torch.unique(groups[normal])) < 2:
        raise MadclipError(
            "APRIL-GAN needs at least 2 normal shots: the image score's normalisers are "
            "cross-fitted (leave one shot out), so a shot is never scored against itself"
        )

    def taps_of(index: torch.Tensor) -> torch.Tensor:
        return run_taps(images[index]).float()

    parts = [taps_of(normal[s : s + batch_size]).cpu() for s in range(0, len(normal), batch_size)]
    n_patches = parts[0].shape[2] - 1
    bank = bank_from_taps(torch.cat(parts))
    del parts
    row_groups = groups[normal].repeat_interleave(n_patches)
    maxima, on_device = [], None
    for start in range(0, images.shape[0], batch_size):
        idx = torch.arange(start, min(start + batch_size, images.shape[0]))
        taps = taps_of(idx)
        if on_device is None:  # the bank on the model's device, once
            on_device = bank.to(taps.device)
        exclude = (groups[idx, None] == row_groups[None, :]) & (labels[idx, None] == 0)  # [b, N]
        dist = patch_distances(taps, on_device, exclude.to(taps.device))
        amap = zero_map(taps) + few_shot_map(dist, image_size)
        maxima.append(amap.flatten(1).amax(dim=1).cpu())
    maxima = torch.cat(maxima)
    lo, scale = minmax_constants(maxima)
    info = {
        "bank_rows": int(bank.shape[1]),
        "bank_layers": int(bank.shape[0]),
        "bank_dim": int(bank.shape[2]),
        "bank_shots": int(len(normal)),
        "bank_mb_fp32": bank.numel() * 4 / 1e6,
        "normaliser_images": int(images.shape[0]),
        "normalisers": "cross-fitted min/max of max(map) on the training images (leave one normal shot out)",
        "max_map_lo": float(lo),
        "max_map_hi": float(lo + 1.0 / scale),
    }
    return BankBuild(bank, lo, scale, info)
