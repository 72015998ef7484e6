"""The CLIP vision tower with MVFA's residual adapters written back into the stream.

After each tapped block i (0-based `taps`, the reference's blocks 6/12/18/24 of 24), two bottleneck adapters
(seg, det) read the full token stream x [B, 1+P, W]: mid = LeakyReLU(W1 x) (W -> E, the text width) and
out = LeakyReLU(W2 mid) (E -> W). Then x <- 0.8 x + 0.1 out_seg + 0.1 out_det feeds block i+1, so every block
after the first tap depends on the adapters and must run at every training step. The blocks up to and
including the first tap are a pure function of the image: `prefix()` is the cache boundary, `suffix()` the
rest. The write-back after the last tap only feeds the reference's unused pooled output and is skipped.
open_clip's `forward_intermediates` cannot express the write-back, hence this explicit block loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...backbone import FrozenVisual

LEAKY = 0.01  # nn.LeakyReLU() default slope
WRITE_BACK = (0.8, 0.1, 0.1)  # (stream, seg out, det out): the reference's fixed coefficients


class ResidualAdapter(nn.Module):
    """x [.., W] -> (mid [.., E], out [.., W]); two bias-free linear layers, LeakyReLU after each."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.fc1 = nn.Linear(width, bottleneck, bias=False)
        self.fc2 = nn.Linear(bottleneck, width, bias=False)

    def forward(self, x: torch.Tensor, with_out: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        mid = F.leaky_relu(self.fc1(x), LEAKY)
        return mid, (F.leaky_relu(self.fc2(mid), LEAKY) if with_out else None)


class AdaptedTower(FrozenVisual):
    """Frozen open_clip VisionTransformer + 2 x len(taps) residual adapters.

    `seg_write_back` False drops the seg term (x <- 0.9 x + 0.1 out_det), a non-reference variant for
    image-only datasets whose seg adapters the reference never trains.
    """

    def __init__(
        self, visual: nn.Module, taps: tuple[int, ...], bottleneck: int, seg_write_back: bool = True
    ):
        super().__init__()
        self.visual = visual
        self.taps = tuple(int(t) for t in taps)
        width = int(visual.conv1.out_channels)
        self.seg = nn.ModuleList(ResidualAdapter(width, bottleneck) for _ in self.taps)
        self.det = nn.ModuleList(ResidualAdapter(width, bottleneck) for _ in self.taps)
        self.seg_write_back = bool(seg_write_back)
        self._batch_first = bool(getattr(visual.transformer, "batch_first", True))

    def _block(self, i: int, x: torch.Tensor) -> torch.Tensor:  # x [B, N, W]
        blk = self.visual.transformer.resblocks[i]
        if self._batch_first:
            return blk(x)
        return blk(x.transpose(0, 1)).transpose(0, 1)

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> stream after the first tapped block, before any write-back: [B, 1+P, W]."""
        x = self.visual._embeds(images)  # conv stem, CLS, positions, (inert) patch dropout, ln_pre
        for i in range(self.taps[0] + 1):
            x = self._block(i, x)
        return x

    def suffix(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stream after the first tap [B, 1+P, W] -> (seg mids, det mids), each [L, B, 1+P, E] (CLS included)."""
        seg_mids, det_mids = [], []
        last = self.taps[-1]
        a, b, c = WRITE_BACK
        for i in range(self.taps[0], last + 1):
            if i > self.taps[0]:
                x = self._block(i, x)
            if i in self.taps:
                j = self.taps.index(i)
                keep = i != last  # the last write-back feeds nothing we use
                s_mid, s_out = self.seg[j](x, with_out=keep)
                d_mid, d_out = self.det[j](x, with_out=keep)
                seg_mids.append(s_mid)
                det_mids.append(d_mid)
                if keep:
                    x = (a * x + b * s_out + c * d_out) if self.seg_write_back else ((a + b) * x + c * d_out)
        return torch.stack(seg_mids), torch.stack(det_mids)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.suffix(self.prefix(images))
