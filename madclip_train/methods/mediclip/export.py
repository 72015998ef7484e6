"""MediCLIP's exported computation: image -> (score, anomaly_map, score_map_max), the prompts baked as dt."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...maps import upsample_logits

FP32_ISLANDS = ("dt",)  # the constant whose consumers start the FP32 tail (the map head)


class MediCLIPExport(nn.Module):
    """image [B, 3, S, S] -> (score [B], anomaly_map [B, 1, S, S], score_map_max [B]); dt a constant buffer."""

    def __init__(self, net, dt: torch.Tensor):
        super().__init__()
        self.backbone = net.backbone
        self.adapters = net.adapters
        self.image_size = net.image_size
        self.register_buffer("dt", dt.detach().clone().float())

    def forward(self, image: torch.Tensor):  # the ONNX input is named "image"
        feats = self.backbone(image)  # L x [B, P, W]
        mean = torch.stack([F.normalize(a(f), dim=-1) @ self.dt for a, f in zip(self.adapters, feats)]).mean(
            dim=0
        )
        amap = torch.sigmoid(upsample_logits(mean.unsqueeze(0), self.image_size)[0]).unsqueeze(
            1
        )  # [B, 1, S, S]
        peak = amap.flatten(1).amax(dim=1)
        return peak, amap, peak
