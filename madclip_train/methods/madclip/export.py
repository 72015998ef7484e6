"""MadCLIP's exported computation: image -> (score, anomaly_map, score_map_max), the text tower baked as dt."""

from __future__ import annotations

import torch
from torch import nn

from madclip_runtime.contract import ANOMALY_MAP, SCORE, SCORE_MAP_MAX


class MadCLIPExport(nn.Module):
    """image -> (score, anomaly_map, score_map_max) with the text tower replaced by the constant dt.

    dt = t_ab - t_n is registered as a buffer, so the ONNX graph holds it as the initializer `dt` (the FP16
    conversion starts its FP32 tail at dt's consumers); the backbone is truncated after the last tap.
    """

    FP32_ISLANDS = ("dt",)  # the constant whose consumers start the FP32 tail (the score head)

    def __init__(self, model):
        super().__init__()
        self.register_buffer("dt", model.inference_context().detach().float().clone())  # [E]
        model.backbone.truncate()
        model.prompts = None  # the text tower is not part of the graph
        self.model = model

    def forward(self, image: torch.Tensor):  # image [B, 3, S, S] float32
        out = self.model.outputs_from_taps(self.model.backbone(image), self.dt)
        return out[SCORE], out[ANOMALY_MAP], out[SCORE_MAP_MAX]  # [B], [B, 1, S, S], [B]
