"""The frozen CLIP backbone: creation through open_clip, weights resolution, and the tapped features.

The adapters never write back into the residual stream (docs/METHODS.md §2), so the backbone is a pure
function of the image: `Backbone.forward` returns the 4 tapped token maps and nothing downstream changes them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from madclip_runtime.errors import MadclipError

from .config import ModelConfig

log = logging.getLogger(__name__)

TINY_NAME = "madclip-tiny"
_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False

WEIGHTS_HELP = (
    "CLIP weights for {backbone} ({pretrained}) could not be loaded: {reason}. This machine cannot download "
    "them. Either run once where the internet is reachable (open_clip caches the file under "
    "~/.cache/huggingface, and `--pretrained openai` then works offline), or download the OpenAI checkpoint "
    "for {backbone} elsewhere (e.g. open_clip.create_model('{backbone}', pretrained='openai') and save "
    "model.state_dict() with safetensors) and pass `--pretrained /path/to/weights.safetensors` (or the "
    "open_clip .bin/.pt file). For an offline pipeline check without CLIP weights use "
    "`--backbone madclip-tiny --pretrained none` (random weights: the scores are meaningless)."
)


def register_tiny() -> None:
    """Register `madclip-tiny` (and any other config in model_configs/) with open_clip. Idempotent."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


def default_taps(depth: int) -> tuple[int, ...]:
    """0-based indices of the blocks at 1/4, 2/4, 3/4 and 4/4 of the depth (24 -> 5, 11, 17, 23)."""
    return tuple(depth * q // 4 - 1 for q in (1, 2, 3, 4))


def create_clip(cfg: ModelConfig) -> nn.Module:
    """Build the open_clip model named in `cfg`, at cfg.image_size, with the requested weights. Never substitutes."""
    import open_clip

    register_tiny()
    if cfg.backbone not in open_clip.list_models():
        raise MadclipError(f"unknown backbone {cfg.backbone!r} (open_clip models, or {TINY_NAME})")
    kwargs = dict(force_image_size=cfg.image_size, force_quick_gelu=cfg.quick_gelu)
    if cfg.pretrained == "none":
        torch.manual_seed(cfg.init_seed)  # deterministic random init, so export can rebuild the same backbone
        model = open_clip.create_model(cfg.backbone, pretrained=None, **kwargs)
    else:
        if cfg.pretrained != "openai" and not os.path.isfile(cfg.pretrained):
            raise MadclipError(
                WEIGHTS_HELP.format(backbone=cfg.backbone, pretrained=cfg.pretrained, reason="no such file")
            )
        try:
            model = open_clip.create_model(cfg.backbone, pretrained=cfg.pretrained, **kwargs)
        except Exception as exc:  # download failure, missing tag, wrong file: one clear paragraph
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise MadclipError(
                WEIGHTS_HELP.format(backbone=cfg.backbone, pretrained=cfg.pretrained, reason=reason)
            ) from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over the parameters and buffers (names, shapes, bytes): identifies backbone weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


class FrozenVisual(nn.Module):
    """What every method's wrapper of the frozen open_clip vision tower (`self.visual`) shares."""

    visual: nn.Module

    @property
    def width(self) -> int:
        return int(self.visual.conv1.out_channels)

    @property
    def grid(self) -> int:
        return int(self.visual.grid_size[0])

    def fingerprint(self) -> str:
        """`weights_fingerprint` of the frozen vision tower, computed once (hashing ViT-L takes seconds)."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = weights_fingerprint(self.visual)
        return self._fingerprint


class Backbone(FrozenVisual):
    """Frozen vision tower returning the tapped residual streams, CLS dropped: list of 4 x [B, P, W]."""

    def __init__(self, visual: nn.Module, taps: tuple[int, ...]):
        super().__init__()
        self.visual = visual
        self.taps = tuple(taps)

    def truncate(self) -> "Backbone":
        """Drop blocks after the last tap and the unused pooling head (for export)."""
        self.visual.prune_intermediate_layers(list(self.taps), prune_norm=True, prune_head=True)
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:  # images [B, 3, S, S]
        out = self.visual.forward_intermediates(
            images,
            indices=list(self.taps),
            stop_early=True,
            intermediates_only=True,
            normalize_intermediates=False,
            output_fmt="NLC",
        )
        return out["image_intermediates"]  # 4 x [B, P, W]


def embed_dim(clip: nn.Module) -> int:
    """Width of the joint image-text embedding (the text projection's output)."""
    proj = clip.text_projection
    return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])
