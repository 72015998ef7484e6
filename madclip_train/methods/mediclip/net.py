"""MediCLIP's network: frozen CLIP taps -> one linear adapter per tap (+ L2) -> cosine with T -> map and score.

Reference (models/Necker.py, Adapter.py, MapMaker.py): the raw residual streams after blocks 12, 18 and 24 of
ViT-L/14 (CLS dropped) go through a 1x1 Conv2d (1024 -> 768, with bias: a linear layer per token, here
nn.Linear with the same default initialisation), L2-normalised per token; per layer S = f . T (no
temperature) [B, P, 2]; the mean over the layers is upsampled bilinearly (align_corners=True) to the input
size and soft-maxed over (normal, abnormal). anomaly_map = p_ab; image score = max of the map.

softmax([S_n, S_ab])[1] = sigmoid(S_ab - S_n) and the layer mean and the upsampling are linear, so the map is
sigmoid(upsample(mean_l f_l . dt)) with dt = t_ab - t_n: only dt is needed once training is over.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from madclip_runtime.contract import ANOMALY_MAP, SCORE, SCORE_MAP_MAX

from ...backbone import Backbone
from ...maps import upsample_logits
from .prompts import MediPrompts


def mediclip_taps(depth: int) -> tuple[int, int, int]:
    """0-based blocks at 2/4, 3/4 and 4/4 of the depth: 24 -> (11, 17, 23) (the reference's 12/18/24)."""
    return (depth // 2 - 1, 3 * depth // 4 - 1, depth - 1)


def embed_dim(clip: nn.Module) -> int:
    proj = clip.text_projection
    return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])


class MediCLIPNet(nn.Module):
    """Frozen backbone (truncatable), 3 adapters, learnable prompts."""

    def __init__(
        self,
        clip: nn.Module,
        tokenizer,
        taps: tuple[int, ...],
        image_size: int,
        n_ctx: int = 8,
        causal: bool = False,
    ):
        super().__init__()
        self.backbone = Backbone(clip.visual, tuple(taps))
        self.image_size = int(image_size)
        self.adapters = nn.ModuleList(nn.Linear(self.backbone.width, embed_dim(clip)) for _ in taps)
        self.prompts = MediPrompts(clip, tokenizer, n_ctx=n_ctx, causal=causal)
        self.backbone.requires_grad_(False)
        self.prompts.token_embedding.requires_grad_(False)
        self.prompts.encoder.requires_grad_(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.prompts.ctx.parameters()) + list(self.adapters.parameters())

    @torch.no_grad()
    def taps(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] (CLIP-normalised) -> stacked tapped tokens [L, B, P, W], no autograd."""
        return torch.stack(self.backbone(images))

    def adapt(self, feats: torch.Tensor) -> list[torch.Tensor]:
        """[L, B, P, W] -> L x [B, P, E], unit vectors per token."""
        return [F.normalize(a(f), dim=-1) for a, f in zip(self.adapters, feats.unbind(0))]

    def map_logit(self, feats: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """Tapped tokens [L, B, P, W], dt [E] -> upsampled mean-over-layers logit S_ab - S_n, [B, S, S]."""
        mean = torch.stack([o @ dt for o in self.adapt(feats)]).mean(dim=0)  # [B, P]
        return upsample_logits(mean.unsqueeze(0), self.image_size)[0]  # [B, S, S]

    def text_dt(self) -> torch.Tensor:
        """dt = t_ab - t_n [E] through the frozen text tower (gradients reach the context vectors)."""
        t = self.prompts()  # [E, 2]
        return t[:, 1] - t[:, 0]

    @staticmethod
    def outputs_from_logit(logit: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B, S, S] logit -> score [B] (max of the map), anomaly_map [B, 1, S, S] = p_ab, score_map_max [B]."""
        amap = torch.sigmoid(logit).unsqueeze(1)  # [B, 1, S, S]
        peak = amap.flatten(1).amax(dim=1)  # [B]
        return {SCORE: peak, ANOMALY_MAP: amap, SCORE_MAP_MAX: peak}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.outputs_from_logit(self.map_logit(self.taps(images), self.text_dt()))
