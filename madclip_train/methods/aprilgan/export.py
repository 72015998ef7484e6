"""APRIL-GAN's exported computation: image -> (score, anomaly_map, score_map_max) in one graph.

Constants (graph initializers): `text` [E, 2]; the memory bank, one `bank_<layer>` [W, N] per layer (unit
columns, pre-transposed so the nearest-neighbour search is MatMul + ReduceMax + (1 - x)); `one`; `norm_lo`,
`norm_scale` [1]. The tower runs to the last tap (the last block; its CLS gives the image embedding).

Mixed precision (the exporter keeps the consumers of `fp32_island_constants` and everything downstream FP32):
the bank matmuls stay FP16 (the bank is the largest constant: FP16 halves it); `1 - max` reads `one`, so the
few-shot tail (upsampling, sums) is FP32, as is everything reading `text` (both softmaxes) and the score.
"""

from __future__ import annotations

import torch
from torch import nn

from .scores import few_shot_map, fixed_score, text_probability, zero_shot_map

FP32_ISLANDS = ("text", "one", "norm_lo", "norm_scale")  # the graph constants that start the FP32 tail
BANK_PREFIX = "bank_"


class AprilGANExport(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.tower = model.tower
        self.linear = model.linear
        self.image_size = model.image_size
        self.few_shot = model.few_shot
        self.n_layers = len(model.tower.taps)
        self.register_buffer("text", model.text.detach().float().clone())
        if self.few_shot:
            for j in range(self.n_layers):
                self.register_buffer(f"{BANK_PREFIX}{j}", model.bank[j].detach().float().t().contiguous())
        self.register_buffer("one", torch.ones(1))  # starts the FP32 few-shot tail (see the module docstring)
        self.register_buffer("norm_lo", model.norm_lo.detach().float().clone())
        self.register_buffer("norm_scale", model.norm_scale.detach().float().clone())

    def forward(self, image: torch.Tensor):  # image [B, 3, S, S]
        taps = self.tower(image)
        amap = zero_shot_map(taps, self.linear, self.text, self.image_size)
        p = text_probability(taps, self.tower.visual, self.text)
        if self.few_shot:
            dists = []
            for j in range(self.n_layers):
                q = torch.nn.functional.normalize(taps[:, j, 1:], dim=-1)  # [B, P, W]
                dists.append(self.one - (q @ getattr(self, f"{BANK_PREFIX}{j}")).amax(dim=-1))  # [B, P]
            amap = amap + few_shot_map(torch.stack(dists), self.image_size)
        amax = amap.flatten(1).amax(dim=1)
        score = fixed_score(p, amax, self.norm_lo, self.norm_scale) if self.few_shot else p
        return score, amap.unsqueeze(1), amax
