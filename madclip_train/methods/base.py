"""The method interface: what the trainer, the feature cache, evaluation and the exporter may know of a method.

A method (MadCLIP, MVFA, MediCLIP) is one `MethodModel` subclass in its own module, registered by name. The
rest of madclip only calls what is declared here:

- what can be cached: `cacheable(images)` is the part of the forward pass that is a pure function of the image
  (MadCLIP: the tapped streams, its adapters are side branches; MVFA: the stream before its first tap, its
  adapters write back; MediCLIP: nothing, its training images are synthesised every step). The feature cache
  stores it and `loss()` / `outputs()` run everything after it.
- text: learnable prompts run through the text tower inside `loss()` every step; `inference_context()` computes
  what inference needs once (constants).
- preprocessing: `model_defaults` (input size, normalisation, activation) recorded in config.json and the
  bundle's metadata, applied by the one runtime preprocessing.
- after training: `finalize()` (e.g. a memory bank of normal-shot features and fixed normalisers).
- training data: `needs_abnormal` (k normal + k abnormal with masks, or k normal only) and `augmentation`.
- every method exports the same graph contract: image -> (score, anomaly_map, score_map_max).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from madclip_runtime.errors import MadclipError

from ..config import ModelConfig


@dataclass
class Batch:
    feats: torch.Tensor  # what `loss()` takes: the cacheable features (or images) of the batch, on the device
    labels: torch.Tensor  # [b] int64, 1 = abnormal
    masks: torch.Tensor  # [b, S, S] bool or float in [0, 1] (all zero for normal images)


class MethodModel(nn.Module, metaclass=abc.ABCMeta):
    """One few-shot anomaly-detection method on a frozen CLIP. Subclasses set the class attributes and
    implement the abstract methods; the defaults below fit a method whose adapters are side branches."""

    name: ClassVar[str] = ""
    needs_abnormal: ClassVar[bool] = True  # False: trains from normal shots only
    augmentation: ClassVar[str] = "x16"  # offline augmentation of the shots: "x16", "x11" or "none"
    augment_variant: str = "reference"  # x16's zoom/jitter arithmetic: "reference" or "exact" (set by fit)
    model_defaults: ClassVar[dict[str, Any]] = {}  # ModelConfig / PreprocessSpec values the reference uses
    train_defaults: ClassVar[dict[str, Any]] = {}  # TrainConfig values the reference uses
    fp32_island_constants: ClassVar[tuple[str, ...]] = ()  # graph initializers whose consumers start the FP32 tail
    reference_format: ClassVar[str] = ""  # what `convert_reference` reads (for the CLI's help)

    cfg: ModelConfig

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def build(cls, cfg: ModelConfig, seed: int = 0) -> "MethodModel":
        """The frozen CLIP named in cfg (weights never substituted) with freshly initialised trainables."""

    @classmethod
    def convert_reference(cls, ref: dict) -> dict[str, torch.Tensor]:
        """The authors' released checkpoint (a dict of tensors / state dicts) -> `trainable_state()` names."""
        raise MadclipError(f"method {cls.name!r} has no converter for the authors' checkpoints")

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    # ---- training -----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def trainable_parameters(self, has_masks: bool = True) -> list[nn.Parameter]:
        """What the optimiser steps."""

    @abc.abstractmethod
    def cache_identity(self) -> dict:
        """Everything that determines `cacheable()`'s output (the feature-cache key)."""

    @abc.abstractmethod
    def cacheable(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] (preprocessed) -> the pure-function-of-the-image part, [B, ...]. No grad needed."""

    @abc.abstractmethod
    def loss(self, feats: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Loss parts (and "total") for a batch of cacheable features; masks None = no pixel supervision."""

    def set_training(self, mode: bool) -> None:
        """Train/eval mode of the trainable parts only (the frozen backbone stays in eval, as the references)."""
        for module in self.trainable_modules():
            module.train(mode)

    def trainable_modules(self) -> list[nn.Module]:
        return []

    def training_source(self, images01: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, augment_seed: int,
                        make_cached, label: str, batch_size: int = 16):
        """Batches for one part of the training data (train or held-out shots). The default augments offline
        with `augmentation`, normalises and caches `cacheable()`; `make_cached(images, masks, labels, label)` is
        the trainer's feature-cache source. A method whose images change every step overrides this and returns
        an object with `__len__()` and `batches(epoch, generator) -> Iterator[Batch]`."""
        from ..augment import augment_shots

        if len(labels):
            images01, masks, index = augment_shots(self.augmentation, images01, masks, augment_seed,
                                                   variant=self.augment_variant, groups=labels)
            labels = labels[index]
        return make_cached(images01, masks, labels, label)

    def finalize(self, source, device: torch.device) -> dict:
        """After training, with the training source: build what inference needs beyond the trained weights
        (kept as buffers so `trainable_state()` saves them). Returns information for the run's log."""
        return {}

    def calibration_set(self, images, masks, labels, seed: int):
        """The exporter's calibration data from the run's shots (model inputs [N, 3, S, S], masks [N, S, S],
        labels [N], numpy) -> (images, masks, labels, note or None). A method trained on normal shots only adds
        abnormal examples here (MediCLIP: synthetic anomalies); the note is appended to the calibration's
        description in the bundle metadata."""
        return images, masks, labels, None

    # ---- inference ----------------------------------------------------------------------------------------
    def inference_context(self) -> Any:
        """Constants `outputs()` needs, computed once (e.g. text embeddings of learned prompts)."""
        return None

    @abc.abstractmethod
    def outputs(self, feats: torch.Tensor, ctx: Any = None) -> dict[str, torch.Tensor]:
        """Cacheable features -> {"score": [B], "anomaly_map": [B, 1, S, S], "score_map_max": [B]}."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:  # images [B, 3, S, S]
        return self.outputs(self.cacheable(images))

    @abc.abstractmethod
    def output_ranges(self) -> dict[str, tuple[float, float]]:
        """{"score": (lo, hi), "anomaly_map": (lo, hi)} and what they mean: metadata and the overlay's scale."""

    def output_meanings(self) -> dict[str, str]:
        return {}

    # ---- state and export ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything a checkpoint must hold (float32, CPU), derived constants included."""

    @abc.abstractmethod
    def load_trainable_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Strict inverse of `trainable_state()`: MadclipError naming `source` on a missing or mis-shaped tensor."""

    @abc.abstractmethod
    def export_module(self) -> nn.Module:
        """image [B, 3, S, S] -> (score [B], anomaly_map [B, 1, S, S], score_map_max [B]); text tower replaced by
        constants, backbone truncated after the last tap. May consume this model (call it last)."""

    def provenance(self) -> dict:
        """Method-specific keys for the bundle's metadata "provenance"."""
        return {}


def copy_state_strict(targets: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    """Copy state[k] into each target tensor k in place; every key must be present with the target's shape."""
    missing = sorted(set(targets) - set(state))
    if missing:
        raise MadclipError(f"{source}: checkpoint lacks {len(missing)} tensors (e.g. {missing[0]})")
    with torch.no_grad():
        for k, t in targets.items():
            src = state[k]
            if src.shape != t.shape:
                raise MadclipError(f"{source}: {k} has shape {tuple(src.shape)}, model expects {tuple(t.shape)}")
            t.copy_(src)


def iterate_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """A shuffled pass over n items in batches (one randperm per epoch from the trainer's generator)."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]
