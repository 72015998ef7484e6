"""MVFA (Huang et al., CVPR 2024) as a madclip method: residual adapters written back into the CLIP stream,
a fixed prompt-ensemble text side, and a few-shot memory bank mixed 0.5/0.5 with the zero-shot map.

Faithful by default (the authors' code where it differs from the paper); non-reference variants are switches in
`ModelConfig.options`:
- det_loss: "bce_on_prob" (reference: BCE-with-logits applied to a probability) | "bce"
- image_only_seg: "frozen" (reference: on datasets without masks the seg adapters stay at their random init but
  are still written back) | "trained" | "off" (not written back: x <- 0.9 x + 0.1 out_det)
- bank_cls: True (reference: the bank holds all 1+P tokens, CLS included) | False
Deployable deviation (the reference cannot run on one image): the zero-/few-shot normalisers are fixed
constants estimated from the training views (cross-fitted), see bank.py; `madclip-eval --transductive`
reproduces the reference's test-set min-max instead.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from madclip_runtime.contract import ANOMALY_MAP, SCORE, SCORE_MAP_MAX
from madclip_runtime.errors import MadclipError

from ...backbone import create_clip, default_taps
from ..base import MethodModel, ReferenceShots, ShotSource, check_state_shapes
from .augment import augment_x11
from .bank import build_bank_and_normalisers
from .export import FP32_ISLANDS, MVFAExport
from .losses import det_loss, seg_losses
from .options import OPTIONS
from .reference import REFERENCE_FORMAT, convert_reference, rebuild_from_shots, to_reference
from .scores import few_shot, mix, zero_shot
from .text import encode_ensemble
from .tower import AdaptedTower

log = logging.getLogger(__name__)


class MVFAModel(MethodModel):
    """Frozen vision tower + 8 residual adapters + constants: text T [E, 2], bank [L, N, E], normalisers."""

    name = "mvfa"
    title = "MVFA"
    needs_abnormal = True
    augmentation = "x11"
    train_defaults = {"epochs": 50, "batch_size": 1, "lr": 1e-3, "betas": (0.5, 0.999)}
    model_defaults = {"backbone": "ViT-L-14-336", "image_size": 240, "quick_gelu": False, "normalize": "none"}
    fp32_island_constants = FP32_ISLANDS  # see export.py
    option_schema = OPTIONS
    supports_transductive = True
    reference_format = REFERENCE_FORMAT
    reference_needs_shots = (
        "the authors' release holds no memory bank, it is rebuilt from the dataset's valid/ "
        "shots (--shot-list for the authors' exact shots)"
    )

    def __init__(
        self, cfg, visual: nn.Module, taps: tuple[int, ...], text: torch.Tensor, options: dict | None = None
    ):
        super().__init__()
        self.cfg = cfg
        self.options = self.option_schema.validate(options if options is not None else cfg.options)
        embed_dim = int(text.shape[0])
        self.tower = AdaptedTower(
            visual, taps, embed_dim, seg_write_back=True
        )  # set per dataset by set_has_masks()
        self.register_buffer("text", text.float().clone())  # [E, 2]
        self.register_buffer("bank", torch.zeros(len(taps), 0, embed_dim))  # [L, N, E], filled by finalize()
        self.register_buffer("norm_lo", torch.zeros(4))  # (Z, F, z, f)
        self.register_buffer("norm_scale", torch.ones(4))
        self.register_buffer("has_masks", torch.ones(1))  # 1: seg head, pixel maps; 0: det head, image scores

    # --- construction --------------------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg, seed: int = 0) -> "MVFAModel":
        """Frozen CLIP per cfg (weights never substituted), T from the ensemble, fresh adapters from `seed`."""
        import open_clip

        clip = create_clip(cfg)
        depth = len(clip.visual.transformer.resblocks)
        taps = tuple(cfg.taps) or default_taps(depth)
        if len(taps) != 4 or max(taps) >= depth or list(taps) != sorted(taps):
            raise MadclipError(
                f"taps {taps} do not fit a {depth}-block backbone (need 4 increasing indices < {depth})"
            )
        text = encode_ensemble(clip, open_clip.get_tokenizer(cfg.backbone), cfg.objective)
        torch.manual_seed(seed)
        model = cls(cfg, clip.visual, taps, text)
        model.tower.visual.requires_grad_(False)
        return model.eval()

    @property
    def backbone(self) -> AdaptedTower:
        """The tower (taps, fingerprint()), under the name the trainer and converter use for every method."""
        return self.tower

    def trainable_modules(self) -> list[nn.Module]:
        return [self.tower.seg, self.tower.det]

    @property
    def masks_mode(self) -> bool:
        return bool(self.has_masks.item() > 0.5)

    def set_has_masks(self, has_masks: bool) -> None:
        """Dataset type: with masks the seg head scores (pixel maps); without, the det head (image scores)."""
        self.has_masks.fill_(1.0 if has_masks else 0.0)
        self.tower.seg_write_back = bool(has_masks) or self.options["image_only_seg"] != "off"

    def trainable_parameters(self, has_masks: bool) -> list[nn.Parameter]:
        """What Adam steps. Reference quirk: without masks only the det adapters (seg stay random)."""
        self.set_has_masks(has_masks)
        params = list(self.tower.det.parameters())
        if has_masks or self.options["image_only_seg"] == "trained":
            params += list(self.tower.seg.parameters())
        return params

    # --- the cache boundary and training ---------------------------------------------------------------------
    def cache_identity(self) -> dict:
        return {
            "method": self.name,
            "backbone": self.cfg.backbone,
            "fingerprint": self.tower.fingerprint(),
            "image_size": self.image_size,
            "quick_gelu": self.cfg.quick_gelu,
            "boundary": f"after block {self.tower.taps[0]} (0-based)",
        }

    @torch.no_grad()
    def cacheable(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> stream after the first tapped block [B, 1+P, W] (pure function of the image)."""
        return self.tower.prefix(images)

    def head_mids(self, feats: torch.Tensor) -> torch.Tensor:
        """Mid tokens of the head that scores this dataset type: [L, B, 1+P, E]."""
        seg, det = self.tower.suffix(feats.float())
        return seg if self.masks_mode else det

    def loss(
        self, feats: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Sum over layers of det (+ focal + dice with masks). feats [B, 1+P, W] from `cacheable`."""
        seg, det = self.tower.suffix(feats.float())
        parts = {"det": det_loss(det, self.text, labels, self.options["det_loss"])}
        if masks is not None:
            parts["focal"], parts["dice"] = seg_losses(seg, self.text, masks, self.image_size)
        parts["total"] = sum(parts.values())
        return parts

    # --- memory bank ------------------------------------------------------------------------------------------
    def training_source(self, images01, masks, labels, augment_seed, make_cached, label, batch_size: int = 1):
        """x11 views of every shot, cached up to the first tap; remembers each view's source shot (`groups`) so
        finalize() can cross-fit the normalisers."""
        if len(labels):
            images01, masks, groups = augment_x11(images01, masks)
            labels = labels[groups]
        else:
            groups = torch.arange(0)
        source = make_cached(images01, masks, labels, label)
        source.groups = groups
        return source

    @torch.no_grad()
    def finalize(self, source: ShotSource, device, progress=None) -> dict:
        """Build the bank from the normal training views and the cross-fitted normalisers (training views only).

        The views are re-run in fp32 from their images (not from the fp16 cache), as the reference builds its
        bank with a fresh forward pass. Views of one shot share a group (`source.groups`; without augmentation
        every image is its own group)."""
        n = len(source)
        groups = source.groups
        if groups is None or len(groups) != n:
            groups = torch.arange(n)
        self.set_training(False)
        build = build_bank_and_normalisers(
            lambda x: self.head_mids(self.cacheable(x.to(device))),
            source.images,
            source.labels.cpu(),
            groups.cpu(),
            self.text.to(device),
            self.image_size,
            with_cls=self.options["bank_cls"],
            batch_size=8,
            progress=progress,
        )
        self.bank = build.bank.to(self.text.device)
        self.norm_lo = torch.cat([build.map_lo, build.img_lo]).to(self.text.device)
        self.norm_scale = torch.cat([build.map_scale, build.img_scale]).to(self.text.device)
        log.info(
            "MVFA bank: %d rows x %d layers (%.1f MB fp32)",
            build.info["bank_rows"],
            build.info["bank_layers"],
            build.info["bank_mb_fp32"],
        )
        return build.info

    # --- scoring ------------------------------------------------------------------------------------------------
    def raw_scores(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """Un-normalised Z [B,S,S], F [B,S,S], z [B], f [B] (what `--transductive` evaluation min-maxes)."""
        if self.bank.shape[1] == 0:
            raise MadclipError("this MVFA model has no memory bank (finalize() was not run)")
        mids = self.head_mids(feats)
        zmap, z = zero_shot(mids, self.text, self.image_size)
        fmap, f = few_shot(mids, self.bank, self.image_size)
        return {"Z": zmap, "F": fmap, "z": z, "f": f}

    def outputs(self, feats: torch.Tensor, ctx=None) -> dict[str, torch.Tensor]:
        """-> score [B], anomaly_map [B, 1, S, S] (the mixed map A), score_map_max [B] = max A.

        score = max A with masks (the reference's seg-head image score), else 0.5 z' + 0.5 f' (det head)."""
        if self.bank.shape[1] == 0:  # during training (held-out monitoring): the zero-shot half only
            zmap, z = zero_shot(self.head_mids(feats), self.text, self.image_size)
            amap = zmap.unsqueeze(1)
            amax = amap.flatten(1).amax(dim=1)
            return {SCORE: amax if self.masks_mode else z, ANOMALY_MAP: amap, SCORE_MAP_MAX: amax}
        r = self.raw_scores(feats)
        amap = mix(r["Z"], r["F"], self.norm_lo[:2], self.norm_scale[:2]).unsqueeze(1)  # [B, 1, S, S]
        amax = amap.flatten(1).amax(dim=1)
        score = amax if self.masks_mode else mix(r["z"], r["f"], self.norm_lo[2:], self.norm_scale[2:])
        return {SCORE: score, ANOMALY_MAP: amap, SCORE_MAP_MAX: amax}

    def predict_transductive(self, split, batch_size: int = 16, device="cpu", progress=None) -> dict:
        """The reference's evaluation (test-set min-max), predict_split's keys: see eval.py."""
        from .eval import predict_split_transductive

        return predict_split_transductive(self, split, batch_size, device, progress)

    def inference_context(self):
        return None

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.outputs(self.cacheable(images))

    def output_ranges(self) -> dict:
        # with fixed normalisers the training views span [0, 1]; unseen images may fall outside
        return {SCORE: (0.0, 1.0), ANOMALY_MAP: (0.0, 1.0)}

    @classmethod
    def convert_reference(cls, ref: dict, n_layers: int = 4) -> dict[str, torch.Tensor]:
        return convert_reference(ref, n_layers)

    def reference_checkpoint(self) -> dict:
        return to_reference(self.trainable_state(), len(self.tower.taps))

    def load_reference(
        self, state: dict[str, torch.Tensor], source: str, shots: ReferenceShots | None
    ) -> dict:
        """The release's adapters, then the bank and normalisers rebuilt from the shots (finalize)."""
        return rebuild_from_shots(self, state, source, shots)

    @torch.no_grad()
    def load_adapters(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Copy converted adapter tensors (no bank, no normalisers) into the model, shapes checked."""
        for head, mods in (("seg", self.tower.seg), ("det", self.tower.det)):
            for k, v in mods.state_dict().items():
                got = state.get(f"adapters.{head}.{k}")
                if got is None:
                    raise MadclipError(f"{source}: lacks adapters.{head}.{k}")
                if got.shape != v.shape:
                    raise MadclipError(
                        f"{source}: adapters.{head}.{k} has shape {tuple(got.shape)}, "
                        f"this backbone expects {tuple(v.shape)}"
                    )
                v.copy_(got)

    def export_module(self) -> nn.Module:
        """image [B, 3, S, S] -> (score [B], anomaly_map [B, 1, S, S], score_map_max [B]); bank as constants."""
        if self.bank.shape[1] == 0:
            raise MadclipError("this MVFA model has no memory bank (finalize() was not run)")
        return MVFAExport(self).eval()

    # --- state ----------------------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {f"adapters.{k}": v for k, v in self.tower.seg.state_dict(prefix="seg.").items()}
        state.update({f"adapters.{k}": v for k, v in self.tower.det.state_dict(prefix="det.").items()})
        for k in ("text", "bank", "norm_lo", "norm_scale", "has_masks"):
            state[f"mvfa.{k}"] = getattr(self, k)
        return {k: v.detach().cpu().float().contiguous() for k, v in state.items()}

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        expected = self.trainable_state()
        # the bank's row count depends on the shots
        check_state_shapes(expected, state, source, variable="mvfa.bank")
        adapters = {k[len("adapters.") :]: state[k] for k in expected if k.startswith("adapters.")}
        self.tower.seg.load_state_dict({k[4:]: v for k, v in adapters.items() if k.startswith("seg.")})
        self.tower.det.load_state_dict({k[4:]: v for k, v in adapters.items() if k.startswith("det.")})
        dev = self.text.device
        self.text = state["mvfa.text"].float().to(dev)
        self.bank = state["mvfa.bank"].float().to(dev)
        self.norm_lo = state["mvfa.norm_lo"].float().to(dev)
        self.norm_scale = state["mvfa.norm_scale"].float().to(dev)
        self.has_masks = state["mvfa.has_masks"].float().to(dev)
        self.set_has_masks(self.masks_mode)

    def provenance(self) -> dict:
        return {
            "mvfa_options": dict(self.options),
            "mvfa_bank_rows": int(self.bank.shape[1]),
            "mvfa_head": "seg" if self.masks_mode else "det",
            "mvfa_normalisers": "fixed, cross-fitted on the training views",
        }
