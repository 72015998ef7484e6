"""The exported computation: image -> (score, anomaly_map, score_map_max), text tower replaced by a constant dt.

dt = t_ab - t_n is computed once from the learned prompts (the only text quantity inference needs, METHOD.md
section 5) and registered as a buffer, so the ONNX graph holds it as an initializer named `dt`. The backbone
is truncated after the last tap; the head is `madclip_train.head.score_outputs`, the same code training and
evaluation use.
"""
from __future__ import annotations

import torch
from torch import nn

from madclip_train.model import MadCLIP

OUTPUT_NAMES = ("score", "anomaly_map", "score_map_max")


class ExportModule(nn.Module):
    def __init__(self, model: MadCLIP):
        super().__init__()
        with torch.no_grad():
            t_n, t_ab = model.text_embeddings()
        self.model = model
        self.register_buffer("dt", (t_ab - t_n).detach().float().clone())  # [E]
        model.backbone.truncate()
        self.model.prompts = None  # the text tower is not part of the graph

    def forward(self, image: torch.Tensor):  # image [B, 3, S, S] float32
        out = self.model.outputs_from_features(self.model.backbone(image), self.dt)
        return out["score"], out["anomaly_map"], out["score_map_max"]  # [B], [B, 1, S, S], [B]
