"""The frozen CLIP vision tower as APRIL-GAN reads it: the raw residual stream after each tapped block.

Nothing trained writes back into the stream, so the tower is a pure function of the image: its output is the
feature cache. The CLS token is kept (the last tap's CLS, through ln_post and the projection, is CLIP's image
embedding, which gives the text probability), so the last tap must be the last block. An explicit block loop
(as the reference's tower) instead of open_clip's forward_intermediates, which splits off the CLS token.
"""

from __future__ import annotations

import torch
from torch import nn

from madclip_runtime.errors import MadclipError

from ...backbone import FrozenVisual, default_taps


def aprilgan_taps(depth: int, taps: tuple[int, ...] = ()) -> tuple[int, ...]:
    """0-based tap indices (default: blocks 6/12/18/24 of 24, i.e. 1/4 .. 4/4 of the depth), checked."""
    taps = tuple(int(t) for t in taps) or default_taps(depth)
    if len(taps) != 4 or list(taps) != sorted(set(taps)) or taps[-1] != depth - 1:
        raise MadclipError(
            f"taps {taps} do not fit a {depth}-block backbone (APRIL-GAN needs 4 increasing block "
            f"indices, the last one {depth - 1}: its CLS token is the image embedding)"
        )
    return taps


class TappedTower(FrozenVisual):
    """images [B, 3, S, S] -> taps [B, L, 1+P, W] (raw stream after each tapped block, CLS first)."""

    def __init__(self, visual: nn.Module, taps: tuple[int, ...]):
        super().__init__()
        self.visual = visual
        self.taps = tuple(int(t) for t in taps)
        self._batch_first = bool(getattr(visual.transformer, "batch_first", True))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.visual._embeds(images)  # conv stem, CLS, positions, (inert) patch dropout, ln_pre
        out = []
        blocks = self.visual.transformer.resblocks
        for i in range(self.taps[-1] + 1):
            x = blocks[i](x) if self._batch_first else blocks[i](x.transpose(0, 1)).transpose(0, 1)
            if i in self.taps:
                out.append(x)
        return torch.stack(out, dim=1)
