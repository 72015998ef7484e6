"""The authors' released MVFA checkpoints (MediaBrain-SJTU/MVFA-AD `ckpt/few-shot/<Obj>.pth`) as a run directory.

The release holds only the 8 adapters (read with torch.load(weights_only=True): no code runs). MVFA's inference
also needs the memory bank of the augmented normal shots, which the authors rebuild from the shot list at test
time, and (here) the fixed normalisers: both are built by `finalize()` from the shots of `--data` (the authors'
`--shot-list` for their exact shots), never from the test split.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from madclip_runtime.atomic import AtomicDirectory
from madclip_runtime.errors import MadclipError

from ..config import ModelConfig, TrainConfig
from ..data import load_arrays, load_split, sample_shots, shots_from_list, shots_record
from ..model import build_model
from ..reference import load_reference_checkpoint
from ..rundir import versions, write_run
from ..train import _normalize
from .mvfa import MVFAModel
from .mvfa_augment import augment_x11


@dataclass
class ShotViews:
    """The x11 views of the shots, as finalize() reads a training source."""

    images: torch.Tensor  # [N, 3, S, S] preprocessed
    labels: torch.Tensor  # [N]
    masks: torch.Tensor  # [N, S, S]
    groups: torch.Tensor  # [N] source shot of each view

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def convert_mvfa_reference(checkpoint: str, out: str, mcfg: ModelConfig, data: str | None, shot_list: str | None,
                           shots: int = 4, seed: int = 111, force: bool = False, progress=None) -> str:
    """Adapters from the release + bank and normalisers from the shots of `data` -> run directory `out`."""
    if not data:
        raise MadclipError("--method mvfa needs --data: the authors' release holds no memory bank, it is rebuilt "
                           "from the dataset's valid/ shots (--shot-list for the authors' exact shots)")
    state = MVFAModel.convert_reference(load_reference_checkpoint(checkpoint))
    split = load_split(data, "valid")
    samples = shots_from_list(split, shot_list) if shot_list else sample_shots(split, shots, seed)
    with AtomicDirectory(out, force=force) as tmp:
        model = build_model(mcfg, seed=seed)
        model.load_adapters(state, checkpoint)
        model.set_has_masks(split.has_masks)
        mcfg = ModelConfig.from_dict({**mcfg.to_dict(), "taps": list(model.backbone.taps)})
        model.cfg = mcfg
        images, masks, labels = load_arrays(samples, replace(mcfg.preprocess, normalize="none"))
        views, vmasks, groups = augment_x11(torch.from_numpy(images), torch.from_numpy(masks))
        source = ShotViews(_normalize(views, mcfg.preprocess), torch.from_numpy(labels)[groups], vmasks, groups)
        info = model.finalize(source, torch.device("cpu"), progress)
        record = shots_record(samples)
        record["seed"], record["shot_list"] = seed, shot_list
        n_normal = sum(1 for s in samples if s.label == 0)
        config = {"model": mcfg.to_dict(), "train": TrainConfig(shots=n_normal, seed=seed).to_dict(),
                  "backbone_fingerprint": model.backbone.fingerprint(),
                  "converted_from": str(Path(checkpoint).resolve()), "versions": versions(),
                  "dataset": {"root": str(Path(data).resolve()), "name": Path(data).resolve().name,
                              "has_masks": split.has_masks, "n_shots": len(samples)},
                  "selection": "reference (authors' released checkpoint)", "finalize": info,
                  "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_run(tmp, model, config, record)
    return out
