"""MadCLIP (MICCAI 2025): frozen CLIP, 8 dual-branch side adapters on 4 tapped layers, learnable prompts.

What it computes (docs/METHODS.md, "MadCLIP"): the residual streams after blocks 6/12/18/24 (CLS dropped) feed
one adapter per layer per branch (normal, abnormal); each gives det and seg unit vectors; with dt = t_ab - t_n
from the learnable prompts, p_ab = sigmoid((O_ab + O_n).dt). Image score AC = sum over layers of the mean det
p_ab, map AS = sum over layers of the upsampled seg p_ab. The adapters never write back into the stream, so
the tapped features are a pure function of the image: `cacheable()` returns all of them.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from madclip_runtime.contract import ANOMALY_MAP, SCORE
from madclip_runtime.errors import MadclipError

from ...backbone import Backbone, create_clip, default_taps, embed_dim
from ...config import ModelConfig
from ..base import MethodModel, copy_state_strict
from .adapters import DualAdapters
from .export import MadCLIPExport
from .head import branch_logits, score_outputs
from .losses import madclip_loss
from .options import OPTIONS
from .prompts import PromptLearner
from .reference import REFERENCE_FORMAT, convert_reference, to_reference

log = logging.getLogger(__name__)


def build_backbone(clip: nn.Module, cfg: ModelConfig) -> Backbone:
    """The frozen vision tower tapped at cfg.taps (default: 1/4, 2/4, 3/4, 4/4 of the depth): 4 taps."""
    depth = len(clip.visual.transformer.resblocks)
    taps = cfg.taps or default_taps(depth)
    if len(taps) != 4 or max(taps) >= depth:
        raise MadclipError(f"taps {taps} do not fit a {depth}-block backbone (need 4 indices < {depth})")
    return Backbone(clip.visual, taps)


class MadCLIP(MethodModel):
    """The trainable parts (adapters, prompt context) on top of a frozen open_clip model."""

    name = "madclip"
    title = "MadCLIP"
    needs_abnormal = True
    augmentation = "x16"
    # the ModelConfig / PreprocessSpec / TrainConfig defaults are MadCLIP's reference (ViT-L-14-336 at 240, exact
    # GELU, [0, 1] inputs; Adam 1e-3, betas (0.5, 0.999), 60 epochs, batch 16): nothing to override
    model_defaults: dict = {}
    train_defaults: dict = {}
    fp32_island_constants = MadCLIPExport.FP32_ISLANDS
    option_schema = OPTIONS
    reference_format = REFERENCE_FORMAT

    def __init__(self, cfg: ModelConfig, clip: nn.Module, tokenizer):
        super().__init__()
        self.cfg = cfg
        self.option_schema.validate(cfg.options)  # MadCLIP has no switches: any option is refused
        self.backbone: Backbone = build_backbone(clip, cfg)
        self.adapters = DualAdapters(self.backbone.width, embed_dim(clip), n_layers=len(self.backbone.taps))
        self.prompts = PromptLearner(
            clip, tokenizer, cfg.objective, n_ctx=cfg.n_ctx, causal=cfg.causal_prompt_mask
        )

    @classmethod
    def build(cls, cfg: ModelConfig, seed: int = 0) -> "MadCLIP":
        import open_clip

        clip = create_clip(cfg)
        torch.manual_seed(seed)
        model = cls(cfg, clip, open_clip.get_tokenizer(cfg.backbone))
        model.backbone.requires_grad_(False)
        model.prompts.token_embedding.requires_grad_(False)
        model.prompts.encoder.requires_grad_(False)
        return model

    @property
    def n_layers(self) -> int:
        return len(self.backbone.taps)

    # ---- training -----------------------------------------------------------------------------------------
    def trainable_parameters(self, has_masks: bool = True) -> list[nn.Parameter]:
        return list(self.adapters.parameters()) + list(self.prompts.ctx.parameters())

    def trainable_modules(self) -> list[nn.Module]:
        return [self.adapters]

    def cache_identity(self) -> dict:
        return {
            "backbone": self.cfg.backbone,
            "fingerprint": self.backbone.fingerprint(),
            "image_size": self.image_size,
            "taps": list(self.backbone.taps),
            "quick_gelu": self.cfg.quick_gelu,
            "boundary": "taps [B, L, P, W]",
        }

    def cacheable(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.backbone(images), dim=1)  # [B, L, P, W]

    def text_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_n, t_ab), each [E], through the frozen text tower (gradients reach the context vectors)."""
        return self.prompts()

    def branch_logits(self, taps: list[torch.Tensor], dt: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tapped features L x [B, P, W] -> S_n and S_ab per head, each [L, B, P]."""
        o = self.adapters(taps)
        det_n, det_ab = branch_logits(o["n_det"], o["ab_det"], dt)
        seg_n, seg_ab = branch_logits(o["n_seg"], o["ab_seg"], dt)
        return {"det_n": det_n, "det_ab": det_ab, "seg_n": seg_n, "seg_ab": seg_ab}

    def loss(
        self, feats: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        t_n, t_ab = self.text_embeddings()
        return madclip_loss(self.branch_logits(_taps(feats), t_ab - t_n), labels, masks, self.image_size)

    # ---- inference ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def inference_context(self) -> torch.Tensor:
        t_n, t_ab = self.text_embeddings()
        return t_ab - t_n  # dt [E]: the only text quantity inference needs

    def outputs_from_taps(self, taps: list[torch.Tensor], dt: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tapped features -> score [B], anomaly_map [B, 1, S, S], score_map_max [B]."""
        s = self.branch_logits(taps, dt)
        return score_outputs(s["det_ab"] - s["det_n"], s["seg_ab"] - s["seg_n"], self.image_size)

    def outputs(self, feats: torch.Tensor, ctx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        dt = self.inference_context() if ctx is None else ctx
        return self.outputs_from_taps(_taps(feats), dt)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:  # images [B, 3, S, S]
        t_n, t_ab = self.text_embeddings()
        return self.outputs_from_taps(self.backbone(images), t_ab - t_n)

    def output_ranges(self) -> dict[str, tuple[float, float]]:
        top = float(self.n_layers)
        return {SCORE: (0.0, top), ANOMALY_MAP: (0.0, top)}

    def output_meanings(self) -> dict[str, str]:
        n = self.n_layers
        return {
            SCORE: f"image anomaly score AC: sum over {n} layers of the mean patch P(abnormal)",
            ANOMALY_MAP: f"pixel anomaly map AS: sum over {n} layers of P(abnormal)",
        }

    # ---- state and export ---------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {f"adapters.{k}": v for k, v in self.adapters.state_dict().items()}
        state.update({f"prompts.ctx.{k}": v for k, v in self.prompts.ctx.items()})
        with torch.no_grad():
            t_n, t_ab = self.text_embeddings()
        state["text.t_n"], state["text.t_ab"] = t_n, t_ab
        return {k: v.detach().cpu().float().contiguous() for k, v in state.items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        targets = {f"adapters.{k}": v for k, v in self.adapters.state_dict().items()}
        targets.update({f"prompts.ctx.{k}": p for k, p in self.prompts.ctx.items()})
        copy_state_strict(targets, state, source)

    def export_module(self) -> nn.Module:
        return MadCLIPExport(self)

    def provenance(self) -> dict:
        return {"objective": self.cfg.objective, "causal_prompt_mask": self.cfg.causal_prompt_mask}

    # ---- the authors' released checkpoints ----------------------------------------------------------------
    @classmethod
    def convert_reference(cls, ref: dict, n_layers: int = 4) -> dict[str, torch.Tensor]:
        return convert_reference(ref, n_layers)

    def reference_checkpoint(self) -> dict:
        return to_reference(self.trainable_state(), self.n_layers)


def _taps(feats: torch.Tensor) -> list[torch.Tensor]:
    """Cached/stacked features [B, L, P, W] -> L x [B, P, W] (contiguous, float32)."""
    return [f.contiguous() for f in feats.float().unbind(1)]
