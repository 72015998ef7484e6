"""Run configuration: frozen dataclasses serialised to config.json (everything needed to rebuild the model)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from madclip_runtime.contract import FP32
from madclip_runtime.preprocess import PreprocessSpec

# [Objective] words per benchmark dataset folder (docs/METHODS.md §4).
OBJECTIVE_WORDS = {
    "Brain": "Brain",
    "Liver": "Liver",
    "Retina_RESC": "retinal OCT",
    "Retina_OCT2017": "retinal OCT",
    "Chest": "Chest X-ray film",
    "Histopathology": "histopathological image",
}
DEFAULT_OBJECTIVE = "medical image"


def objective_for(dataset_dir_name: str) -> str:
    """[Objective] word from a dataset folder name such as `Brain_AD`; generic default otherwise."""
    name = dataset_dir_name[:-3] if dataset_dir_name.endswith("_AD") else dataset_dir_name
    return OBJECTIVE_WORDS.get(name, DEFAULT_OBJECTIVE)


@dataclass(frozen=True)
class ModelConfig:
    """A method's model: which method, the frozen CLIP backbone and the method's switches.

    The defaults are MadCLIP's (the toolkit's default method); a method whose reference differs (backbone,
    input size, activation, normalisation) declares its own `model_defaults`, applied by `for_method`. Quirk
    switches default to the reference's behaviour: exact GELU in a QuickGELU-trained model
    (`quick_gelu=False`), prompt text encoder without the causal mask (`causal_prompt_mask=False`), inputs not
    mean/std-normalised (preprocess.normalize="none"). The input size lives in `preprocess` only.
    """

    method: str = "madclip"
    backbone: str = "ViT-L-14-336"
    pretrained: str = "openai"  # "openai" | a local file path | "none" (random init from init_seed)
    quick_gelu: bool = False
    causal_prompt_mask: bool = False
    objective: str = DEFAULT_OBJECTIVE
    n_ctx: int = 8
    init_seed: int = (
        0  # random backbone init when pretrained == "none" (deterministic, so export can rebuild it)
    )
    taps: tuple[int, ...] = ()  # 0-based block indices; empty = the method's default taps for the depth
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    options: dict = field(
        default_factory=dict
    )  # method-specific switches (JSON values), see the method's module

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["taps"] = list(self.taps)
        d["preprocess"] = self.preprocess.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        legacy_size = d.pop("image_size", None)  # runs written before the size lived only in `preprocess`
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["taps"] = tuple(d.get("taps", ()))
        pre = dict(d.get("preprocess", {}))
        if legacy_size is not None:
            pre.setdefault("image_size", legacy_size)
        d["preprocess"] = PreprocessSpec.from_dict(pre)
        d["options"] = dict(d.get("options") or {})
        return cls(**d)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and shot selection (docs/METHODS.md §7)."""

    shots: int = 16
    seed: int = 111
    epochs: int = 60
    batch_size: int = 16
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    augment: bool = True  # offline x16 augmentation
    augment_variant: str = (
        "reference"  # "reference": the authors' zoom crop and per-batch jitter; "exact": see augment.py
    )
    select_on: str = (
        "none"  # "none": fixed epoch budget; "valid": hold out part of the shots, keep best epoch
    )
    holdout_fraction: float = 0.25
    feature_cache: str = "memory"  # "memory" | "disk" | "off" (re-run the backbone every step)
    cache_dtype: str = "float16"
    precision: str = FP32  # autocast precision of the training step (madclip_train/precision.py), resolved

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


def dump_json(obj: dict) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
