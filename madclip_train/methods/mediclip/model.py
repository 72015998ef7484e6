"""MediCLIP (MICCAI 2024, cnulab/MediCLIP): trained from normal shots only, on synthetic anomalies.

What it computes (docs/METHODS.md, "MediCLIP"): the raw residual streams after blocks 12/18/24 of ViT-L/14 at 224
(QuickGELU, CLIP mean/std; CLS dropped) go through one linear adapter each (with bias) and are L2-normalised;
CoOp prompts (8 class-specific context vectors before each of the reference's 10 normal / 11 abnormal words,
text tower without the causal mask) give T = [t_n, t_ab]; per layer S = f . T, the layer mean is upsampled
(bilinear, align_corners) to 224 and soft-maxed: anomaly_map = P(abnormal), score = max of the map.
Loss: focal (integer-truncated target, the reference's quirk) + Dice against the synthetic masks.

Training images are new every step (madclip_train.synthesis), so nothing is cached: `cacheable()` is the
identity and `loss()` runs the frozen backbone (no autograd) itself; `training_source` synthesises.

Options (ModelConfig.options): tasks (synthesis mixture, "cutpaste=0.25,gauss=0.25,source=0.25,identity=0.25"),
focal_target ("truncate" | "threshold"), holdout_per_shot (synthetic samples per held-out shot, 8),
prefetch (synthesise the next batch on a thread, true).
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch
from torch import nn

from madclip_runtime.contract import ANOMALY_MAP, SCORE
from madclip_runtime.errors import MadclipError
from madclip_runtime.preprocess import PreprocessSpec

from ...backbone import create_clip
from ...config import ModelConfig
from ...synthesis import DEFAULT_MIX, Synthesizer, format_mix, parse_mix
from ..base import Batch, MethodModel, copy_state_strict
from .export import FP32_ISLANDS, MediCLIPExport
from .losses import mediclip_loss
from .net import MediCLIPNet, mediclip_taps
from .options import OPTIONS
from .reference import FORMAT, convert_reference, to_reference
from .source import SynthBatches, build_batch, holdout_set

log = logging.getLogger(__name__)

CALIBRATION_SEED_OFFSET = 7919  # synthetic calibration anomalies use their own seed stream


def grey_uint8(images: torch.Tensor, spec: PreprocessSpec) -> np.ndarray:
    """Model-input or [0, 1] images [N, 3, S, S] -> grey uint8 [N, S, S] (ITU-R 601 luma, as PIL's "L")."""
    x = images.detach().cpu().double().numpy()
    if spec.normalize == "clip":
        x = x * np.asarray(spec.std)[:, None, None] + np.asarray(spec.mean)[:, None, None]
    luma = np.tensordot(np.array([0.299, 0.587, 0.114]), x, axes=([0], [1]))  # [N, S, S]
    same = np.allclose(x[:, 0], x[:, 1], atol=1e-6) and np.allclose(x[:, 0], x[:, 2], atol=1e-6)
    return np.round(np.clip(x[:, 0] if same else luma, 0, 1) * 255).astype(np.uint8)


class MediCLIP(MethodModel):
    name = "mediclip"
    title = "MediCLIP"
    needs_abnormal = False
    augmentation = "none"
    model_defaults = {
        "backbone": "ViT-L-14",
        "image_size": 224,
        "quick_gelu": True,
        "normalize": "clip",
        "interpolation": "bilinear",
    }
    train_defaults = {"epochs": 200, "batch_size": 8, "lr": 1e-3, "betas": (0.5, 0.999)}
    fp32_island_constants = FP32_ISLANDS
    option_schema = OPTIONS
    reference_format = FORMAT
    uses_objective = False  # the prompts hold no organ word (madclip-convert-reference needs no --objective)

    def __init__(self, cfg: ModelConfig, clip: nn.Module, tokenizer):
        super().__init__()
        self.cfg = cfg
        opts = self.options(cfg)
        depth = len(clip.visual.transformer.resblocks)
        taps = tuple(cfg.taps) or mediclip_taps(depth)
        if len(taps) != 3 or max(taps) >= depth:
            raise MadclipError(
                f"taps {taps} do not fit a {depth}-block backbone (MediCLIP needs 3 indices < {depth})"
            )
        self.net = MediCLIPNet(
            clip, tokenizer, taps, cfg.image_size, n_ctx=cfg.n_ctx, causal=cfg.causal_prompt_mask
        )
        self.focal_target = opts["focal_target"]
        self.mix = parse_mix(opts["tasks"])

    @classmethod
    def options(cls, cfg: ModelConfig) -> dict:
        """The run's options over the defaults, each checked (`option_schema`)."""
        return cls.option_schema.validate(cfg.options)

    @classmethod
    def build(cls, cfg: ModelConfig, seed: int = 0) -> "MediCLIP":
        import open_clip

        clip = create_clip(cfg)
        torch.manual_seed(seed)
        return cls(cfg, clip, open_clip.get_tokenizer(cfg.backbone))

    @classmethod
    def convert_reference(cls, ref: dict) -> dict[str, torch.Tensor]:
        return convert_reference(ref)

    def reference_checkpoint(self) -> dict:
        return to_reference(self.trainable_state(), len(self.net.adapters))

    @property
    def backbone(self):
        return self.net.backbone

    # ---- training -----------------------------------------------------------------------------------------
    def trainable_parameters(self, has_masks: bool = True) -> list[nn.Parameter]:
        return self.net.trainable_parameters()

    def trainable_modules(self) -> list[nn.Module]:
        return [self.net.adapters]

    def cache_identity(self) -> dict:
        return {
            "backbone": self.cfg.backbone,
            "fingerprint": self.backbone.fingerprint(),
            "image_size": self.image_size,
            "boundary": "images (nothing cacheable: synthesis every step)",
        }

    def cacheable(self, images: torch.Tensor) -> torch.Tensor:
        return images  # the training images change every step: nothing before the adapters is worth caching

    def loss(
        self, feats: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        if masks is None:
            raise MadclipError("MediCLIP trains on synthetic masks; the training source gave none")
        taps = self.net.taps(feats.float())  # frozen backbone, no autograd
        return mediclip_loss(self.net.map_logit(taps, self.net.text_dt()), masks.float(), self.focal_target)

    def training_source(
        self,
        images01: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
        augment_seed: int,
        make_cached,
        label: str,
        batch_size: int = 8,
    ):
        """Synthetic anomalies on the normal shots (abnormal shots, if any, are not used). Training shots: a new
        sample per shot per epoch; held-out shots: a fixed synthetic set."""
        normal = labels == 0
        shots = grey_uint8(images01[normal], replace_normalize(self.cfg.preprocess))
        if not len(shots):
            return _EmptySource()
        opts = self.options(self.cfg)
        synth = Synthesizer(list(shots), self.mix)
        spec = self.cfg.preprocess
        device = next(self.net.adapters.parameters()).device  # the trainer moved the model already
        if label.startswith("held"):
            fixed = holdout_set(synth, augment_seed, int(opts["holdout_per_shot"]), spec)
            return _FixedSource(*(t.to(device) for t in fixed), batch_size)
        return _SynthSource(
            SynthBatches(synth, augment_seed, batch_size, spec, prefetch=bool(opts["prefetch"])), device
        )

    def calibration_set(self, images: np.ndarray, masks: np.ndarray, labels: np.ndarray, seed: int):
        """Export calibration needs both classes: with normal shots only, add one synthetic anomalous sample per
        shot (tasks other than identity, fixed seed) with its mask. images are model inputs [N, 3, S, S]."""
        if (labels == 1).any() or not len(labels):
            return images, masks, labels, None
        mix = tuple((n, p) for n, p in self.mix if n != "identity") or DEFAULT_MIX[:3]
        synth = Synthesizer(list(grey_uint8(torch.from_numpy(images), self.cfg.preprocess)), mix)
        x, _, m = build_batch(
            synth, range(len(labels)), seed + CALIBRATION_SEED_OFFSET, 0, self.cfg.preprocess
        )
        note = (
            f"normal-only shots: the abnormal class is one synthetic anomaly per shot "
            f"({format_mix(mix)}, seed {seed + CALIBRATION_SEED_OFFSET})"
        )
        return (
            np.concatenate([images, x.numpy()]),
            np.concatenate([masks, m.numpy() >= 0.5]),
            np.concatenate([labels, np.ones(len(labels), dtype=labels.dtype)]),
            note,
        )

    # ---- inference ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def inference_context(self) -> torch.Tensor:
        return self.net.text_dt()

    def outputs(self, feats: torch.Tensor, ctx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        dt = self.inference_context() if ctx is None else ctx
        return self.net.outputs_from_logit(self.net.map_logit(self.net.taps(feats.float()), dt))

    def output_ranges(self) -> dict[str, tuple[float, float]]:
        return {SCORE: (0.0, 1.0), ANOMALY_MAP: (0.0, 1.0)}

    def output_meanings(self) -> dict[str, str]:
        return {
            SCORE: "image anomaly score: maximum of the anomaly map",
            ANOMALY_MAP: "P(abnormal) per pixel: softmax of the layer-mean similarity to (t_n, t_ab)",
        }

    # ---- state and export ---------------------------------------------------------------------------------
    def _targets(self) -> dict[str, torch.Tensor]:
        t = {f"adapters.{k}": v for k, v in self.net.adapters.state_dict().items()}
        t.update({f"prompts.ctx.{k}": p for k, p in self.net.prompts.ctx.items()})
        return t

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = dict(self._targets())
        with torch.no_grad():
            t = self.net.prompts()
        state["text.t_n"], state["text.t_ab"] = t[:, 0], t[:, 1]
        return {k: v.detach().cpu().float().contiguous() for k, v in state.items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        copy_state_strict(self._targets(), state, source)

    def export_module(self) -> nn.Module:
        dt = self.inference_context()
        self.net.backbone.truncate()
        return MediCLIPExport(self.net, dt)

    def provenance(self) -> dict:
        return {
            "reference": "cnulab/MediCLIP",
            "trained_on": "normal shots + synthetic anomalies",
            "synthesis_tasks": format_mix(self.mix),
            "focal_target": self.focal_target,
            "causal_prompt_mask": self.cfg.causal_prompt_mask,
        }


def replace_normalize(spec: PreprocessSpec) -> PreprocessSpec:
    """The training source receives [0, 1] images."""
    from dataclasses import replace

    return replace(spec, normalize="none")


class _SynthSource:
    def __init__(self, batches: SynthBatches, device: torch.device):
        self.src, self.device = batches, device
        self.info = {"mode": "synthesis every step", "tasks": format_mix(batches.synth.mix)}

    def __len__(self) -> int:
        return len(self.src)

    def batches(self, epoch: int, generator: torch.Generator) -> Iterator[Batch]:
        for images, labels, masks in self.src.batches(epoch, generator):
            yield Batch(images.to(self.device), labels.to(self.device), masks.to(self.device))


class _FixedSource:
    """The fixed held-out synthetic set."""

    def __init__(self, images, labels, masks, batch_size: int):
        self.images, self.labels, self.masks, self.batch_size = images, labels, masks, batch_size
        self.info = {"mode": "fixed synthetic held-out set", "n": int(len(labels))}

    def __len__(self) -> int:
        return int(len(self.labels))

    def in_order(self) -> Iterator[Batch]:
        for s in range(0, len(self), self.batch_size):
            yield Batch(
                self.images[s : s + self.batch_size],
                self.labels[s : s + self.batch_size],
                self.masks[s : s + self.batch_size],
            )

    def batches(self, epoch: int, generator: torch.Generator) -> Iterator[Batch]:
        yield from self.in_order()


class _EmptySource(_FixedSource):
    def __init__(self):
        super().__init__(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0), 1)
