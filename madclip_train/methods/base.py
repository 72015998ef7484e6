"""The method interface: what the trainer, the feature cache, evaluation and the exporter may know of a method.

A method (MadCLIP, MVFA, MediCLIP) is one `MethodModel` subclass in its own package `methods/<name>/`, listed
once in `registry.py`. The rest of madclip only calls what is declared here:

- identity and choices: `name`, `title`, `fp32_island_constants` (the export's FP32 tail), `uses_objective`,
  `supports_transductive`, `option_schema` (an `OptionSchema`: defaults, `--option KEY=VALUE` and the method's own
  flags of madclip-train, parsed and validated in one place).
- the frozen backbone: `backbone` (a `BackboneContract`: `taps`, `fingerprint()`), read by the trainer, the
  run directory and the reference converter.
- the authors' checkpoints: `reference_format`, `convert_reference()`, `reference_needs_shots` and
  `load_reference()` (a method whose release lacks state rebuilds it from the dataset's shots), and the
  inverse `reference_checkpoint()` (tests/test_conformance.py round-trips every method through it).

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
import argparse
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Protocol, Sequence

import torch
from torch import nn

from madclip_runtime.errors import MadclipError

from ..config import ModelConfig

TRUE_WORDS = ("true", "yes", "1", "on")
FALSE_WORDS = ("false", "no", "0", "off")


@dataclass(frozen=True)
class Option:
    """One method option: its key in `ModelConfig.options`, its default (whose type is the option's type), and
    optionally its own flag of madclip-train (besides `--option KEY=VALUE`)."""

    key: str
    default: bool | int | float | str
    help: str
    choices: tuple[str, ...] = ()
    parse: Callable[[Any], Any] | None = (
        None  # value (text, or the flag's list) -> canonical value; ValueError
    )
    flag: str | None = None  # e.g. "--focal-target"
    nargs: str | None = None  # the flag's nargs, e.g. "+"
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return (self.flag or "").lstrip("-").replace("-", "_")

    def coerce(self, value: Any, method: str) -> Any:
        """A value (JSON-typed, or the text of `--option KEY=VALUE` / a flag) -> the option's typed value."""
        where = f"{method} option {self.key}"
        kind = type(self.default)
        try:
            if self.parse is not None:
                return self.parse(value)
            if kind is bool:
                if isinstance(value, bool):
                    return value
                low = str(value).strip().lower()
                if isinstance(value, str) and low in TRUE_WORDS + FALSE_WORDS:
                    return low in TRUE_WORDS
                raise ValueError(f"expected true/false (or yes/no, 1/0, on/off), got {value!r}")
            if kind in (int, float):
                if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                    raise ValueError(f"expected a number, got {value!r}")
                if kind is int and isinstance(value, float):
                    raise ValueError(f"expected an integer, got {value!r}")
                return kind(value)
            if not isinstance(value, str):
                raise ValueError(f"expected text, got {value!r}")
            if self.choices and value not in self.choices:
                raise ValueError(f"must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        except (ValueError, TypeError) as exc:
            raise MadclipError(f"{where}: {exc}") from None


class OptionSchema:
    """A method's options: defaults, validation, `--option KEY=VALUE` parsing and the flags of madclip-train."""

    def __init__(self, method: str, options: Sequence[Option] = ()):
        self.method = method
        self.options = {o.key: o for o in options}

    def defaults(self) -> dict[str, Any]:
        return {k: o.default for k, o in self.options.items()}

    def _option(self, key: str, how: str) -> Option:
        if key not in self.options:
            raise MadclipError(
                f"{how}: method {self.method!r} has no such option (known: "
                f"{', '.join(self.options) or 'none'})"
            )
        return self.options[key]

    def parse_items(self, items: Sequence[str]) -> dict[str, Any]:
        """`--option KEY=VALUE` items -> {key: typed value} (only the keys given)."""
        out: dict[str, Any] = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise MadclipError(f"--option {item!r}: expected KEY=VALUE")
            out[key] = self._option(key, f"--option {key}").coerce(value, self.method)
        return out

    def validate(self, given: dict | None) -> dict[str, Any]:
        """Given options (a run's config.json, the API) over the defaults, each checked and typed."""
        out = self.defaults()
        for key, value in (given or {}).items():
            out[key] = self._option(key, f"option {key}").coerce(value, self.method)
        return out

    def add_flags(self, parser: argparse.ArgumentParser, title: str) -> None:
        """The flags of the options that have one, in an argument group of their own."""
        flagged = [o for o in self.options.values() if o.flag]
        if flagged:
            group = parser.add_argument_group(f"{title} (--method {self.method})")
            for o in flagged:
                group.add_argument(
                    o.flag,
                    dest=o.dest,
                    nargs=o.nargs,
                    metavar=o.metavar,
                    choices=o.choices or None,
                    help=o.help,
                )

    def from_flags(self, args: argparse.Namespace) -> dict[str, Any]:
        """{key: typed value} of the flags given on the command line."""
        return {
            o.key: o.coerce(getattr(args, o.dest), self.method)
            for o in self.options.values()
            if o.flag and getattr(args, o.dest, None) is not None
        }

    def flags(self) -> list[str]:
        return [o.flag for o in self.options.values() if o.flag]


class BackboneContract(Protocol):
    """What the trainer, the run directory and the reference converter read of a method's frozen backbone."""

    taps: tuple[int, ...]  # 0-based indices of the tapped blocks (recorded in config.json)

    def fingerprint(self) -> str:
        """sha256 of the frozen weights (a run is never served on other weights)."""


class TrainingSource(Protocol):
    """What `training_source()` returns: batches of one part of the training data (train or held-out shots)."""

    info: dict  # how the source was built (cache mode, synthesis tasks, ...), for the run's log

    def __len__(self) -> int: ...

    def batches(self, epoch: int, generator: torch.Generator) -> Iterator["Batch"]:
        """One epoch's batches (shuffled with `generator`)."""

    def in_order(self) -> Iterator["Batch"]:
        """Every item once, in order (held-out evaluation)."""


class ShotSource(Protocol):
    """What `finalize()` reads: the (augmented) training views, and the source shot of each view."""

    images: torch.Tensor  # [N, 3, S, S] preprocessed
    labels: torch.Tensor  # [N] int64
    masks: torch.Tensor  # [N, S, S]
    groups: torch.Tensor | None  # [N] the shot each view was made from (None: every image its own group)

    def __len__(self) -> int: ...


@dataclass
class ReferenceShots:
    """The dataset shots a reference conversion rebuilds state from (`reference_needs_shots`)."""

    images01: torch.Tensor  # [N, 3, S, S] float32 in [0, 1] (not normalised)
    masks: torch.Tensor  # [N, S, S] bool
    labels: torch.Tensor  # [N] int64
    has_masks: bool


@dataclass
class Batch:
    feats: torch.Tensor  # what `loss()` takes: the cacheable features (or images) of the batch, on the device
    labels: torch.Tensor  # [b] int64, 1 = abnormal
    masks: torch.Tensor  # [b, S, S] bool or float in [0, 1] (all zero for normal images)


class MethodModel(nn.Module, metaclass=abc.ABCMeta):
    """One few-shot anomaly-detection method on a frozen CLIP. Subclasses set the class attributes and
    implement the abstract methods; the defaults below fit a method whose adapters are side branches."""

    name: ClassVar[str] = ""  # --method NAME
    title: ClassVar[str] = ""  # how messages and docs spell it ("MadCLIP")
    needs_abnormal: ClassVar[bool] = True  # False: trains from normal shots only
    augmentation: ClassVar[str] = "x16"  # offline augmentation of the shots: "x16", "x11" or "none"
    augment_variant: str = "reference"  # x16's zoom/jitter arithmetic: "reference" or "exact" (set by fit)
    model_defaults: ClassVar[dict[str, Any]] = {}  # ModelConfig / PreprocessSpec values the reference uses
    train_defaults: ClassVar[dict[str, Any]] = {}  # TrainConfig values the reference uses
    # graph initializers (named by the method's export module) whose consumers start the FP32 tail: every method
    # must name its own (registry.check_method refuses an empty tuple)
    fp32_island_constants: ClassVar[tuple[str, ...]] = ()
    option_schema: ClassVar[
        OptionSchema
    ]  # the method's switches (ModelConfig.options); every method declares one
    uses_objective: ClassVar[bool] = True  # its prompts hold the [Objective] word (--objective)
    supports_transductive: ClassVar[bool] = False  # `predict_transductive` (madclip-eval --transductive)
    reference_format: ClassVar[str] = ""  # what `convert_reference` reads (for the CLI's help)
    # why conversion needs the dataset's shots (--data, --shot-list) to rebuild state; "" = it does not
    reference_needs_shots: ClassVar[str] = ""
    # True: the shots are optional (conversion without --data gives `load_reference` shots=None)
    reference_shots_optional: ClassVar[bool] = False

    cfg: ModelConfig
    backbone: BackboneContract  # the frozen backbone (a submodule or a property): `taps` and `fingerprint()`

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def build(cls, cfg: ModelConfig, seed: int = 0) -> "MethodModel":
        """The frozen CLIP named in cfg (weights never substituted) with freshly initialised trainables."""

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return cls.option_schema.defaults()

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    # ---- the authors' released checkpoints ----------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def convert_reference(cls, ref: dict) -> dict[str, torch.Tensor]:
        """The authors' released checkpoint (a dict of tensors / state dicts) -> `trainable_state()` names
        (those the release holds; `load_reference` loads them)."""

    def reference_checkpoint(self) -> dict:
        """This model's trained tensors in the authors' format (`reference_format`), the inverse of
        `convert_reference`: a run can go to the reference code, and the conformance test round-trips it."""
        raise MadclipError(f"{self.title} does not write its reference format (reference_checkpoint)")

    def load_reference(
        self, state: dict[str, torch.Tensor], source: str, shots: ReferenceShots | None
    ) -> dict:
        """Load converted reference tensors into this model; `shots` (when `reference_needs_shots`) are the
        dataset's shots to rebuild what the release lacks. Returns information for the run's config."""
        self.load_trainable_state(state, source)
        return {}

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
    def loss(
        self, feats: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Loss parts (and "total") for a batch of cacheable features; masks None = no pixel supervision."""

    def set_training(self, mode: bool) -> None:
        """Train/eval mode of the trainable parts only (the frozen backbone stays in eval, as the references)."""
        for module in self.trainable_modules():
            module.train(mode)

    def trainable_modules(self) -> list[nn.Module]:
        return []

    def training_source(
        self,
        images01: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
        augment_seed: int,
        make_cached,
        label: str,
        batch_size: int = 16,
    ) -> TrainingSource:
        """Batches for one part of the training data (train or held-out shots). The default augments offline
        with `augmentation`, normalises and caches `cacheable()`; `make_cached(images, masks, labels, label)` is
        the trainer's feature-cache source. A method whose images change every step overrides this and returns
        an object with `__len__()` and `batches(epoch, generator) -> Iterator[Batch]`."""
        from ..augment import augment_shots

        if len(labels):
            images01, masks, index = augment_shots(
                self.augmentation, images01, masks, augment_seed, variant=self.augment_variant, groups=labels
            )
            labels = labels[index]
        return make_cached(images01, masks, labels, label)

    def finalize(self, source: ShotSource, device: torch.device, progress=None) -> dict:
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
        """Cacheable features -> {`score`: [B], `anomaly_map`: [B, 1, S, S], `score_map_max`: [B]}."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:  # images [B, 3, S, S]
        return self.outputs(self.cacheable(images))

    @abc.abstractmethod
    def output_ranges(self) -> dict[str, tuple[float, float]]:
        """{`score`: (lo, hi), `anomaly_map`: (lo, hi)} and what they mean: metadata and the overlay's scale."""

    def output_meanings(self) -> dict[str, str]:
        return {}

    def predict_transductive(self, split, batch_size: int = 16, device="cpu", progress=None) -> dict:
        """The reference's evaluation normalised with the evaluated set itself (`supports_transductive`)."""
        raise MadclipError(f"--transductive does not apply to {self.title} runs")

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
                raise MadclipError(
                    f"{source}: {k} has shape {tuple(src.shape)}, model expects {tuple(t.shape)}"
                )
            t.copy_(src)


def check_state_shapes(
    expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str, variable: str = ""
) -> None:
    """Every key of `expected` must be in `state` with the same shape; key `variable` (a [L, N, W] bank whose
    row count N depends on the shots) only has to agree in its first and last dimensions."""
    missing = sorted(set(expected) - set(state))
    if missing:
        raise MadclipError(f"{source}: checkpoint lacks {len(missing)} tensors (e.g. {missing[0]})")
    for k, v in expected.items():
        got = state[k]
        var = k == variable
        if (got.shape[0::2] if var else got.shape) != (v.shape[0::2] if var else v.shape):
            raise MadclipError(f"{source}: {k} has shape {tuple(got.shape)}, model expects {tuple(v.shape)}")


def iterate_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """A shuffled pass over n items in batches (one randperm per epoch from the trainer's generator)."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]
