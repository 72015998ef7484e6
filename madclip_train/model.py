"""MadCLIP assembled: frozen CLIP backbone, 8 dual-branch adapters, learnable prompts, the one score head.

Training runs `forward_features` on cached tapped features (the backbone is a pure function of the image);
`forward` runs the whole image -> (score, anomaly_map, score_map_max) path used by evaluation and export.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .adapters import DualAdapters
from .backbone import Backbone, build_backbone, create_clip
from .config import ModelConfig
from .head import branch_logits, score_outputs
from .prompts import PromptLearner

log = logging.getLogger(__name__)


class MadCLIP(nn.Module):
    """The trainable parts (adapters, prompt context) on top of a frozen open_clip model."""

    def __init__(self, cfg: ModelConfig, clip: nn.Module, tokenizer):
        super().__init__()
        self.cfg = cfg
        self.backbone: Backbone = build_backbone(clip, cfg)
        embed_dim = _embed_dim(clip)
        self.adapters = DualAdapters(self.backbone.width, embed_dim, n_layers=len(self.backbone.taps))
        self.prompts = PromptLearner(clip, tokenizer, cfg.objective, n_ctx=cfg.n_ctx, causal=cfg.causal_prompt_mask)

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    @property
    def n_layers(self) -> int:
        return len(self.backbone.taps)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.adapters.parameters()) + list(self.prompts.ctx.parameters())

    def text_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_n, t_ab), each [E], through the frozen text tower (gradients reach the context vectors)."""
        return self.prompts()

    def branch_logits(self, feats: list[torch.Tensor], dt: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tapped features 4 x [B, P, W] -> S_n and S_ab per head, each [L, B, P] (METHOD.md section 5)."""
        o = self.adapters(feats)
        det_n, det_ab = branch_logits(o["n_det"], o["ab_det"], dt)
        seg_n, seg_ab = branch_logits(o["n_seg"], o["ab_seg"], dt)
        return {"det_n": det_n, "det_ab": det_ab, "seg_n": seg_n, "seg_ab": seg_ab}

    def outputs_from_features(self, feats: list[torch.Tensor], dt: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tapped features -> score [B], anomaly_map [B, 1, S, S], score_map_max [B]."""
        s = self.branch_logits(feats, dt)
        return score_outputs(s["det_ab"] - s["det_n"], s["seg_ab"] - s["seg_n"], self.image_size)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:  # images [B, 3, S, S]
        t_n, t_ab = self.text_embeddings()
        return self.outputs_from_features(self.backbone(images), t_ab - t_n)


def _embed_dim(clip: nn.Module) -> int:
    proj = clip.text_projection
    return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])


def tokenizer_for(cfg: ModelConfig):
    import open_clip

    return open_clip.get_tokenizer(cfg.backbone)


def build_model(cfg: ModelConfig, seed: int = 0) -> MadCLIP:
    """Create the frozen CLIP (weights per cfg.pretrained, never substituted) and fresh adapters/prompts."""
    clip = create_clip(cfg)
    torch.manual_seed(seed)
    model = MadCLIP(cfg, clip, tokenizer_for(cfg))
    model.backbone.requires_grad_(False)
    model.prompts.token_embedding.requires_grad_(False)
    model.prompts.encoder.requires_grad_(False)
    return model
