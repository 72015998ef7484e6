"""The authors' released MVFA checkpoints (MediaBrain-SJTU/MVFA-AD `ckpt/few-shot/<Obj>.pth`) -> tensor names and state.

The release holds only the 8 adapters (read with torch.load(weights_only=True): no code runs). MVFA's inference
also needs the memory bank of the augmented normal shots, which the authors rebuild from the shot list at test
time, and (here) the fixed normalisers: both are built by `finalize()` from the shots of `--data` (the authors'
`--shot-list` for their exact shots), never from the test split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from madclip_runtime.errors import MadclipError

from ...data import normalize_images
from ..base import ReferenceShots
from .augment import augment_x11

REFERENCE_FORMAT = (
    "MVFA-AD ckpt/few-shot/<Obj>.pth: {'seg_adapters', 'det_adapters'} with "
    "{j}.fc1.0.weight [E, W] and {j}.fc2.0.weight [W, E], j = 0..3"
)


def convert_reference(ref: dict, n_layers: int = 4) -> dict[str, torch.Tensor]:
    """The authors' checkpoint {'seg_adapters': sd, 'det_adapters': sd} -> our adapter tensor names.

    `{j}.fc1.0.weight` [E, W] (down) -> `adapters.{seg,det}.{j}.fc1.weight`, `{j}.fc2.0.weight` [W, E] (up)
    -> `...fc2.weight`. The release holds no memory bank: it is rebuilt from the shots (finalize).
    """
    out: dict[str, torch.Tensor] = {}
    for head in ("seg", "det"):
        sd = ref.get(f"{head}_adapters")
        if not isinstance(sd, dict):
            raise MadclipError(
                f"reference checkpoint lacks '{head}_adapters' (not an MVFA-AD few-shot checkpoint)"
            )
        for j in range(n_layers):
            for fc in ("fc1", "fc2"):
                key = f"{j}.{fc}.0.weight"
                if key not in sd or not isinstance(sd[key], torch.Tensor):
                    raise MadclipError(f"reference checkpoint lacks {head}_adapters.{key}")
                out[f"adapters.{head}.{j}.{fc}.weight"] = sd[key].float()
    return out


def to_reference(state: dict[str, torch.Tensor], n_layers: int = 4) -> dict:
    """`trainable_state()` names -> the authors' layout (the inverse of `convert_reference`; no bank, as the
    release)."""
    return {
        f"{head}_adapters": {
            f"{j}.{fc}.0.weight": state[f"adapters.{head}.{j}.{fc}.weight"]
            for j in range(n_layers)
            for fc in ("fc1", "fc2")
        }
        for head in ("seg", "det")
    }


@dataclass
class ShotViews:
    """The x11 views of the shots, as finalize() reads a training source."""

    images: torch.Tensor  # [N, 3, S, S] preprocessed
    labels: torch.Tensor  # [N]
    masks: torch.Tensor  # [N, S, S]
    groups: torch.Tensor  # [N] source shot of each view

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def rebuild_from_shots(
    model, state: dict[str, torch.Tensor], source: str, shots: ReferenceShots | None, progress=None
) -> dict:
    """Adapters from the release, then the bank and normalisers from the x11 views of the shots (finalize)."""
    if shots is None:
        raise MadclipError(f"{source}: MVFA's conversion needs the dataset's shots (--data)")
    model.load_adapters(state, source)
    model.set_has_masks(shots.has_masks)
    views, vmasks, groups = augment_x11(shots.images01, shots.masks)
    views = ShotViews(normalize_images(views, model.cfg.preprocess), shots.labels[groups], vmasks, groups)
    return model.finalize(views, torch.device("cpu"), progress)
