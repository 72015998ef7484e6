"""MVFA's exported computation: image -> (score, anomaly_map, score_map_max) in one graph.

The text embeddings T, the memory bank and the four (eight) normalisers are buffers, so the ONNX graph holds
them as initializers: `text` [E, 2], `bank_{l}` [E, N] per layer (unit columns, pre-transposed so the
nearest-neighbour search is MatMul + ReduceMax + (1 - x)), `norm_lo`, `norm_scale` [4]. The vision tower runs
only up to the last tap, with the residual write-back inline.

Mixed precision (the exporter keeps the consumers of `fp32_island_constants` and everything downstream in
FP32): the bank matmuls stay FP16 (the bank is the largest constant: FP16 halves it); their ReduceMax is an FP32
op, and `1 - max` reads the constant `one`, so it and the rest of the few-shot tail (upsampling, sums, mixing)
are FP32, as is everything reading `text` (the zero-shot head).
"""

from __future__ import annotations

import torch
from torch import nn

from .scores import mix, upsample, zero_shot

FP32_ISLANDS = ("text", "one", "norm_lo", "norm_scale")  # the FP32 tail starts at their consumers
BANK_PREFIX = "bank_"


class MVFAExport(nn.Module):
    def __init__(self, model):
        super().__init__()
        tower = model.tower
        last = tower.taps[-1]
        blocks = tower.visual.transformer.resblocks
        tower.visual.transformer.resblocks = nn.ModuleList(
            list(blocks)[: last + 1]
        )  # nothing after the last tap
        self.tower = tower
        self.image_size = model.image_size
        self.masks_mode = model.masks_mode
        self.n_layers = len(tower.taps)
        self.register_buffer("text", model.text.detach().float().clone())
        for layer in range(self.n_layers):
            bank = model.bank[layer].detach().float().t().contiguous()  # [E, N]
            self.register_buffer(f"{BANK_PREFIX}{layer}", bank)
        self.register_buffer("one", torch.ones(1))  # starts the FP32 few-shot tail (see the module docstring)
        self.register_buffer("norm_lo", model.norm_lo.detach().float().clone())
        self.register_buffer("norm_scale", model.norm_scale.detach().float().clone())

    def forward(self, image: torch.Tensor):  # image [B, 3, S, S]
        seg, det = self.tower.suffix(self.tower.prefix(image))
        mids = seg if self.masks_mode else det  # [L, B, 1+P, E]
        zmap, z = zero_shot(mids, self.text, self.image_size)
        dists = []
        for layer in range(self.n_layers):
            q = torch.nn.functional.normalize(mids[layer, :, 1:], dim=-1)  # [B, P, E]
            sim = q @ getattr(self, f"{BANK_PREFIX}{layer}")  # [B, P, N]
            dists.append(self.one - sim.amax(dim=-1))  # [B, P]
        d = torch.stack(dists)  # [L, B, P]
        n_layers, b, p = d.shape
        fmap = upsample(d.reshape(n_layers * b, 1, p), self.image_size)
        fmap = fmap.reshape(n_layers, b, self.image_size, self.image_size).sum(dim=0)
        amap = mix(zmap, fmap, self.norm_lo[:2], self.norm_scale[:2]).unsqueeze(1)  # [B, 1, S, S]
        amax = amap.flatten(1).amax(dim=1)
        score = (
            amax if self.masks_mode else mix(z, fmap.mean(dim=(1, 2)), self.norm_lo[2:], self.norm_scale[2:])
        )
        return score, amap, amax
