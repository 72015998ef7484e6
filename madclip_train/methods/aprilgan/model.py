"""APRIL-GAN (Chen, Han, Zhang: VAND challenge, CVPR 2023 workshop) as a madclip method.

What it computes (docs/methods/aprilgan.md): a frozen CLIP ViT-L-14-336 at 518 px, the raw residual stream after
blocks 6/12/18/24; per tap one trained linear layer (with bias) maps the patch tokens into the text space, where
a fixed prompt ensemble gives T = [t_n, t_ab]; per layer softmax(100 f . T) after bilinear upsampling, summed
over the layers: the zero-shot map Z. Few-shot adds a memory bank of the k normal shots' raw patch tokens:
F = sum over layers of (1 - max cosine), upsampled. Map A = Z + F. Image score: the CLS embedding's text
probability of "abnormal", averaged with max A min-max normalised (see scores.py). Trained with focal + Dice on
the per-layer maps (Adam, lr 1e-3, betas (0.5, 0.999)).

Deployable deviation (the reference cannot score one image alone): the min-max of max A uses constants fixed on
the training shots (bank.py); `madclip-eval --transductive` reproduces the reference's test-set min-max.
Options (ModelConfig.options): few_shot (true: the memory bank, the reference's few-shot mode; false: its
zero-shot mode, map Z and score p).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from madclip_runtime.contract import ANOMALY_MAP, SCORE, SCORE_MAP_MAX

from ...config import ModelConfig
from ..base import MethodModel, ReferenceShots, ShotSource, check_state_shapes, copy_state_strict
from .bank import build_bank_and_normalisers
from .export import FP32_ISLANDS, AprilGANExport
from .losses import aprilgan_loss
from .options import OPTIONS
from .reference import REFERENCE_FORMAT, convert_linear_layers, rebuild_from_shots, to_reference
from .scores import few_shot_map, fixed_score, layer_logits, patch_distances, text_probability, zero_shot_map
from .text import encode_ensemble
from .tower import TappedTower, aprilgan_taps

log = logging.getLogger(__name__)


class AprilGANModel(MethodModel):
    """Frozen tapped tower + 4 linear layers + constants: text T [E, 2], bank [L, N, W], normalisers."""

    name = "aprilgan"
    title = "APRIL-GAN"
    needs_abnormal = True
    augmentation = "none"  # the reference trains on the images as they are
    model_defaults = {
        "backbone": "ViT-L-14-336",
        "image_size": 518,
        "quick_gelu": False,
        "normalize": "clip",
        "interpolation": "bicubic",
    }
    train_defaults = {"epochs": 50, "batch_size": 8, "lr": 1e-3, "betas": (0.5, 0.999)}
    fp32_island_constants = FP32_ISLANDS
    option_schema = OPTIONS
    supports_transductive = True
    reference_format = REFERENCE_FORMAT
    reference_needs_shots = (
        "the authors' release holds no memory bank, it is built from the dataset's valid/ "
        "shots (--shot-list for exact shots); without --data the run is the zero-shot mode"
    )
    reference_shots_optional = True

    def __init__(
        self,
        cfg: ModelConfig,
        visual: nn.Module,
        taps: tuple[int, ...],
        text: torch.Tensor,
        options: dict | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.options = self.option_schema.validate(options if options is not None else cfg.options)
        self.tower = TappedTower(visual, taps)
        width, embed = self.tower.width, int(text.shape[0])
        self.linear = nn.ModuleList(nn.Linear(width, embed) for _ in taps)
        self.register_buffer("text", text.float().clone())  # [E, 2]
        self.register_buffer("bank", torch.zeros(len(taps), 0, width))  # [L, N, W], filled by finalize()
        self.register_buffer("norm_lo", torch.zeros(1))
        self.register_buffer("norm_scale", torch.ones(1))

    # --- construction --------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: ModelConfig, seed: int = 0) -> "AprilGANModel":
        """Frozen CLIP per cfg (weights never substituted), T from the ensemble, fresh linear layers from `seed`."""
        import open_clip

        from ...backbone import create_clip

        cls.option_schema.validate(cfg.options)  # before the (slow) CLIP build
        clip = create_clip(cfg)
        taps = aprilgan_taps(len(clip.visual.transformer.resblocks), tuple(cfg.taps))
        text = encode_ensemble(clip, open_clip.get_tokenizer(cfg.backbone), cfg.objective)
        torch.manual_seed(seed)
        model = cls(cfg, clip.visual, taps, text)
        model.tower.visual.requires_grad_(False)
        return model.eval()

    @property
    def backbone(self) -> TappedTower:
        """The tower (taps, fingerprint()), under the name the trainer and converter use for every method."""
        return self.tower

    @property
    def few_shot(self) -> bool:
        return bool(self.bank.shape[1] > 0)

    def trainable_modules(self) -> list[nn.Module]:
        return [self.linear]

    def trainable_parameters(self, has_masks: bool = True) -> list[nn.Parameter]:
        return list(self.linear.parameters())

    # --- cache boundary and training -----------------------------------------------------------------------------
    def cache_identity(self) -> dict:
        return {
            "method": self.name,
            "backbone": self.cfg.backbone,
            "fingerprint": self.tower.fingerprint(),
            "image_size": self.image_size,
            "quick_gelu": self.cfg.quick_gelu,
            "taps": list(self.tower.taps),
            "boundary": "raw residual stream after each tapped block, CLS kept",
        }

    @torch.no_grad()
    def cacheable(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> taps [B, L, 1+P, W] (pure function of the image)."""
        return self.tower(images)

    def loss(
        self, feats: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Focal + Dice per layer, summed. masks None (a dataset without masks): an abnormal shot counts as
        abnormal at every pixel, a normal one as normal everywhere."""
        if masks is None:
            s = self.image_size
            masks = labels.to(torch.bool)[:, None, None].expand(-1, s, s)
        return aprilgan_loss(layer_logits(feats.float(), self.linear, self.text), masks, self.image_size)

    def training_source(self, images01, masks, labels, augment_seed, make_cached, label, batch_size: int = 8):
        """The shots as they are (the reference does not augment); remembers each image's shot (`groups`) and
        which images are un-augmented (`originals`), for the bank and the cross-fitted normalisers."""
        from ...augment import augment_shots

        if len(labels):
            images01, masks, index = augment_shots(
                self.augmentation, images01, masks, augment_seed, variant=self.augment_variant, groups=labels
            )
            labels = labels[index]
        else:
            index = torch.arange(0)
        source = make_cached(images01, masks, labels, label)
        source.groups = index
        source.originals = torch.ones(len(index), dtype=torch.bool)
        if len(index):
            source.originals[1:] = index[1:] != index[:-1]  # each shot's first image is the original
        return source

    @torch.no_grad()
    def finalize(self, source: ShotSource, device, progress=None) -> dict:
        """Few-shot: the bank from the normal shots and the cross-fitted normalisers (training images only).

        The images are re-run in fp32 from the source's images (not from the fp16 feature cache)."""
        if not self.options["few_shot"]:
            self.bank = self.bank[:, :0]
            return {"mode": "zero-shot (no memory bank): score = text probability"}
        n = len(source)
        groups = getattr(source, "groups", None)
        originals = getattr(source, "originals", None)
        if groups is None or len(groups) != n:
            groups, originals = torch.arange(n), torch.ones(n, dtype=torch.bool)
        self.set_training(False)
        build = build_bank_and_normalisers(
            lambda x: self.cacheable(x.to(device)),
            lambda taps: zero_shot_map(taps, self.linear, self.text.to(taps.device), self.image_size),
            source.images,
            source.labels.cpu(),
            groups,
            originals,
            self.image_size,
        )
        dev = self.text.device
        self.bank, self.norm_lo, self.norm_scale = build.bank.to(dev), build.lo.to(dev), build.scale.to(dev)
        log.info(
            "APRIL-GAN bank: %d rows x %d layers (%.1f MB fp32)",
            build.info["bank_rows"],
            build.info["bank_layers"],
            build.info["bank_mb_fp32"],
        )
        return build.info

    # --- scoring -------------------------------------------------------------------------------------------------
    def raw_scores(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """A [B, S, S] (Z + F, or Z without a bank), max A [B], text probability p [B]."""
        taps = feats.float()
        amap = zero_shot_map(taps, self.linear, self.text, self.image_size)
        if self.few_shot:
            amap = amap + few_shot_map(patch_distances(taps, self.bank), self.image_size)
        p = text_probability(taps, self.tower.visual, self.text)
        return {"map": amap, "max": amap.flatten(1).amax(dim=1), "p": p}

    def outputs(self, feats: torch.Tensor, ctx=None) -> dict[str, torch.Tensor]:
        """-> score [B] (0.5 (p + normalised max A); p without a bank), anomaly_map [B, 1, S, S] = A, max A."""
        r = self.raw_scores(feats)
        score = fixed_score(r["p"], r["max"], self.norm_lo, self.norm_scale) if self.few_shot else r["p"]
        return {SCORE: score, ANOMALY_MAP: r["map"].unsqueeze(1), SCORE_MAP_MAX: r["max"]}

    def predict_transductive(self, split, batch_size: int = 16, device="cpu", progress=None) -> dict:
        """The reference's evaluation (test-set min-max of max A), predict_split's keys: see evaluate.py."""
        from .evaluate import predict_split_transductive

        return predict_split_transductive(self, split, batch_size, device, progress)

    def output_ranges(self) -> dict:
        """Exact bounds: Z in [0, L], F in [0, 2L]; the score 0.5 (p + (max A - lo) scale) with p in [0, 1] and
        max A in [0, 3L] (the normalisers span the training shots, so an unseen image may leave [0, 1])."""
        n = len(self.tower.taps)
        if not self.few_shot:
            return {SCORE: (0.0, 1.0), ANOMALY_MAP: (0.0, float(n))}
        lo, scale = float(self.norm_lo[0]), float(self.norm_scale[0])
        return {
            SCORE: (0.5 * (0.0 - lo) * scale, 0.5 * (1.0 + (3.0 * n - lo) * scale)),
            ANOMALY_MAP: (0.0, 3.0 * n),
        }

    def output_meanings(self) -> dict[str, str]:
        if not self.few_shot:
            return {
                SCORE: "P(abnormal) of the image embedding against the prompt ensemble",
                ANOMALY_MAP: "sum over the tapped layers of P(abnormal) per pixel",
            }
        return {
            SCORE: "0.5 (P(abnormal) of the image embedding + max of the map, normalised with constants "
            "fixed on the training shots)",
            ANOMALY_MAP: "sum over layers of P(abnormal) per pixel + sum over layers of (1 - max cosine) "
            "to the normal shots' patch tokens",
        }

    # --- reference checkpoints -----------------------------------------------------------------------------------
    @classmethod
    def convert_reference(cls, ref: dict, n_layers: int = 4) -> dict[str, torch.Tensor]:
        """The authors' {'trainable_linearlayer': {fc.{i}.weight, fc.{i}.bias}} -> `linear.{i}.weight/bias`."""
        return convert_linear_layers(ref, n_layers)

    def reference_checkpoint(self) -> dict:
        return to_reference(self.trainable_state(), len(self.linear))

    def load_reference(
        self, state: dict[str, torch.Tensor], source: str, shots: ReferenceShots | None
    ) -> dict:
        """The release's linear layers, then the bank and normalisers from the shots (none: zero-shot mode)."""
        return rebuild_from_shots(self, state, source, shots)

    @torch.no_grad()
    def load_linear(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Copy converted linear-layer tensors (no text, bank or normalisers) into the model, shapes checked."""
        copy_state_strict({f"linear.{k}": v for k, v in self.linear.state_dict().items()}, state, source)

    # --- state and export ----------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {f"linear.{k}": v for k, v in self.linear.state_dict().items()}
        for k in ("text", "bank", "norm_lo", "norm_scale"):
            state[f"aprilgan.{k}"] = getattr(self, k)
        return {k: v.detach().cpu().float().contiguous() for k, v in state.items()}

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        expected = self.trainable_state()
        # the bank's row count depends on the shots (0: zero-shot)
        check_state_shapes(expected, state, source, variable="aprilgan.bank")
        self.load_linear(state, source)
        dev = self.text.device
        for k in ("text", "bank", "norm_lo", "norm_scale"):
            setattr(self, k, state[f"aprilgan.{k}"].float().to(dev))

    def export_module(self) -> nn.Module:
        """image [B, 3, S, S] -> (score [B], anomaly_map [B, 1, S, S], score_map_max [B]); bank as constants."""
        return AprilGANExport(self).eval()

    def provenance(self) -> dict:
        return {
            "reference": "ByChelsea/VAND-APRIL-GAN",
            "aprilgan_options": dict(self.options),
            "aprilgan_mode": "few-shot" if self.few_shot else "zero-shot",
            "aprilgan_bank_rows": int(self.bank.shape[1]),
            "aprilgan_normalisers": "fixed, cross-fitted on the training shots" if self.few_shot else "none",
        }
