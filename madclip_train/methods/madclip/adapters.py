"""MadCLIP's dual-branch adapters (docs/METHODS.md §3): one per tapped layer per branch, nothing shared."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEAKY = 0.01


class Adapter(nn.Module):
    """x -> LeakyReLU(W1 x) -> per-token standardisation -> two heads (det, seg), each LeakyReLU then L2-normalised."""

    def __init__(self, width: int, embed_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width, bias=False)
        self.det = nn.Linear(width, embed_dim, bias=False)
        self.seg = nn.Linear(width, embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # x [B, P, W]
        h = F.leaky_relu(self.fc1(x), LEAKY)
        # LayerNorm without affine == the reference's InstanceNorm1d over (tokens, batch, features)
        h = F.layer_norm(h, (h.shape[-1],), eps=1e-5)
        det = F.normalize(F.leaky_relu(self.det(h), LEAKY), dim=-1)  # [B, P, E]
        seg = F.normalize(F.leaky_relu(self.seg(h), LEAKY), dim=-1)  # [B, P, E]
        return det, seg


class DualAdapters(nn.Module):
    """The 8 adapters: `normal[i]` and `abnormal[i]` for tapped layer i."""

    def __init__(self, width: int, embed_dim: int, n_layers: int = 4):
        super().__init__()
        self.normal = nn.ModuleList(Adapter(width, embed_dim) for _ in range(n_layers))
        self.abnormal = nn.ModuleList(Adapter(width, embed_dim) for _ in range(n_layers))

    def forward(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """feats: 4 x [B, P, W] -> unit vectors {n_det, n_seg, ab_det, ab_seg}, each [L, B, P, E]."""
        outs = {"n_det": [], "n_seg": [], "ab_det": [], "ab_seg": []}
        for i, x in enumerate(feats):
            x = x.to(self.normal[i].fc1.weight.dtype)
            nd, ns = self.normal[i](x)
            ad, as_ = self.abnormal[i](x)
            outs["n_det"].append(nd)
            outs["n_seg"].append(ns)
            outs["ab_det"].append(ad)
            outs["ab_seg"].append(as_)
        return {k: torch.stack(v) for k, v in outs.items()}
