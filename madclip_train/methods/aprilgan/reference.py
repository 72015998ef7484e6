"""The authors' released APRIL-GAN weights (ByChelsea/VAND-APRIL-GAN `exps/pretrained/*.pth`, or a train.py
`epoch_N.pth`) -> tensor names and state.

The file holds only the four linear layers, {'trainable_linearlayer': {fc.{i}.weight [E, W], fc.{i}.bias [E]}},
read with torch.load(weights_only=True) by the shared converter: no code runs. The few-shot memory bank is not
stored (the authors rebuild it from k normal images at test time); with the dataset's shots (`--data`) it and the
fixed normalisers are built by `finalize()` from them (never from the test split). Without shots the run is the
reference's zero-shot mode (map Z, score = text probability).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from madclip_runtime.errors import MadclipError

from ...data import normalize_images
from ..base import ReferenceShots

KEY = "trainable_linearlayer"
REFERENCE_FORMAT = (
    "VAND-APRIL-GAN exps/pretrained/*.pth or epoch_N.pth: {'trainable_linearlayer': "
    "{fc.{i}.weight [E, W], fc.{i}.bias [E]}}, i = 0..3"
)


def convert_linear_layers(ref: dict, n_layers: int = 4) -> dict[str, torch.Tensor]:
    """{'trainable_linearlayer': {fc.{i}.weight, fc.{i}.bias}} -> linear.{i}.weight / linear.{i}.bias."""
    sd = ref.get(KEY)
    if not isinstance(sd, dict):
        raise MadclipError(f"reference checkpoint lacks {KEY!r} (not a VAND-APRIL-GAN checkpoint)")
    out: dict[str, torch.Tensor] = {}
    for i in range(n_layers):
        for part in ("weight", "bias"):
            key = f"fc.{i}.{part}"
            if not isinstance(sd.get(key), torch.Tensor):
                raise MadclipError(
                    f"reference checkpoint lacks {KEY}.{key} (APRIL-GAN's ViT form has {n_layers} "
                    "linear layers with bias)"
                )
            out[f"linear.{i}.{part}"] = sd[key].float()
    extra = sorted(
        k for k in sd if k not in {f"fc.{i}.{p}" for i in range(n_layers) for p in ("weight", "bias")}
    )
    if extra:
        raise MadclipError(
            f"reference checkpoint has tensors this {n_layers}-tap model does not use (e.g. {KEY}.{extra[0]})"
        )
    return out


def to_reference(state: dict[str, torch.Tensor], n_layers: int = 4) -> dict:
    """Our `linear.{i}.weight/bias` -> the authors' {'trainable_linearlayer': {fc.{i}.weight, fc.{i}.bias}}
    (the inverse of `convert_linear_layers`; their test.py loads it with load_state_dict)."""
    return {
        KEY: {
            f"fc.{i}.{p}": state[f"linear.{i}.{p}"].clone()
            for i in range(n_layers)
            for p in ("weight", "bias")
        }
    }


@dataclass
class ShotImages:
    """The shots as finalize() reads a training source (each shot its own group, all un-augmented)."""

    images: torch.Tensor  # [N, 3, S, S] preprocessed
    labels: torch.Tensor  # [N]
    masks: torch.Tensor  # [N, S, S]
    groups: torch.Tensor  # [N]
    originals: torch.Tensor  # [N] bool

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def rebuild_from_shots(
    model, state: dict[str, torch.Tensor], source: str, shots: ReferenceShots | None, progress=None
) -> dict:
    """The release's linear layers; then, given shots, the bank and normalisers (finalize), else zero-shot."""
    model.load_linear(state, source)
    if shots is None:
        model.bank = model.bank[:, :0]
        return {"mode": "zero-shot (no shots given: no memory bank), score = text probability"}
    n = int(shots.labels.shape[0])
    images = normalize_images(shots.images01, model.cfg.preprocess)
    source_shots = ShotImages(
        images, shots.labels, shots.masks, torch.arange(n), torch.ones(n, dtype=torch.bool)
    )
    return model.finalize(source_shots, torch.device("cpu"), progress)
