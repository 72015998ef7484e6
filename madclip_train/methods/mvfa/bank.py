"""MVFA's few-shot memory bank and its fixed (deployable) normalisers.

Bank (as the reference builds it): the adapted mid tokens of the augmented *normal* shots, per tapped layer,
all 1+P tokens of each image (CLS included by default; `bank_cls=False` drops it), stored unit-normalised so
the nearest-neighbour search is a matmul + max: [L, N, E].

Normalisers: the reference min-max normalises the zero-shot map Z and the few-shot map F over the whole test
set before mixing them, which needs the test set at once. The deployable default estimates the four constants
(and the four image-level ones for datasets without masks) from the training images only, cross-fitted: a
normal shot's views are scored against the bank *without that shot's views* (leave-one-shot-out), abnormal
shots against the full bank (they are never in it). So no shot is ever scored against itself, and no test
image is ever seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from madclip_runtime.errors import MadclipError

from .scores import few_shot, minmax_constants, zero_shot


@dataclass
class BankBuild:
    bank: torch.Tensor  # [L, N, E] unit rows
    groups: torch.Tensor  # [N] long: source shot of every bank row
    map_lo: torch.Tensor  # [2] (Z, F) pixel-level
    map_scale: torch.Tensor  # [2]
    img_lo: torch.Tensor  # [2] (z, f) image-level
    img_scale: torch.Tensor  # [2]
    info: dict


def bank_from_mids(
    mids: torch.Tensor, groups: torch.Tensor, with_cls: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """mids [L, M, 1+P, E] of M normal images, groups [M] -> (bank [L, M*T, E] unit rows, row groups [M*T])."""
    tokens = mids if with_cls else mids[:, :, 1:]
    n_layers, m, t, e = tokens.shape
    bank = F.normalize(tokens.reshape(n_layers, m * t, e).float(), dim=-1)
    return bank, groups.repeat_interleave(t)


def build_bank_and_normalisers(
    run_mids,
    images: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    text: torch.Tensor,
    image_size: int,
    with_cls: bool = True,
    batch_size: int = 8,
    progress=None,
) -> BankBuild:
    """run_mids(images [b, 3, S, S]) -> head mids [L, b, 1+P, E] (the trained model, no grad).

    images: the augmented, preprocessed training images; labels [N] (1 = abnormal); groups [N]: source shot of
    each view (views of one shot share a group).
    """
    normal = torch.nonzero(labels == 0).flatten()
    if len(torch.unique(groups[normal])) < 2:
        raise MadclipError(
            "MVFA needs at least 2 normal shots: its normalisers are cross-fitted (leave one "
            "shot out), so a shot is never scored against its own views"
        )

    def mids_of(index: torch.Tensor) -> torch.Tensor:  # [L, b, 1+P, E] on the CPU
        with torch.no_grad():
            out = run_mids(images[index]).float().cpu()
        if progress is not None:
            progress(len(index))
        return out

    # pass 1: the bank from the normal views
    bank_parts = [mids_of(normal[s : s + batch_size]) for s in range(0, len(normal), batch_size)]
    bank, row_groups = bank_from_mids(torch.cat(bank_parts, dim=1), groups[normal], with_cls)
    del bank_parts
    # pass 2: every training view scored, cross-fitted
    zs, zmaps_lo, zmaps_hi, fs, fmaps_lo, fmaps_hi = [], [], [], [], [], []
    for start in range(0, images.shape[0], batch_size):
        idx = torch.arange(start, min(start + batch_size, images.shape[0]))
        mids = mids_of(idx)
        # a normal view may not match rows of its own shot; abnormal views are never in the bank
        exclude = (groups[idx, None] == row_groups[None, :]) & (labels[idx, None] == 0)  # [b, N]
        with torch.no_grad():
            zmap, z = zero_shot(mids, text, image_size)
            fmap, f = few_shot(mids, bank, image_size, exclude)
        zs.append(z)
        fs.append(f)
        zmaps_lo.append(zmap.amin(dim=(1, 2)))
        zmaps_hi.append(zmap.amax(dim=(1, 2)))
        fmaps_lo.append(fmap.amin(dim=(1, 2)))
        fmaps_hi.append(fmap.amax(dim=(1, 2)))
    zr = torch.cat(zmaps_lo + zmaps_hi)
    fr = torch.cat(fmaps_lo + fmaps_hi)
    map_lo, map_scale = minmax_constants(zr, fr)
    img_lo, img_scale = minmax_constants(torch.cat(zs), torch.cat(fs))
    info = {
        "bank_rows": int(bank.shape[1]),
        "bank_layers": int(bank.shape[0]),
        "bank_dim": int(bank.shape[2]),
        "bank_mb_fp32": bank.numel() * 4 / 1e6,
        "normaliser_images": int(images.shape[0]),
        "normalisers": "cross-fitted min/max on the training views (leave one normal shot out)",
        "map_lo": map_lo.tolist(),
        "map_hi": (map_lo + 1.0 / map_scale).tolist(),
        "img_lo": img_lo.tolist(),
        "img_hi": (img_lo + 1.0 / img_scale).tolist(),
    }
    return BankBuild(bank, row_groups, map_lo, map_scale, img_lo, img_scale, info)
