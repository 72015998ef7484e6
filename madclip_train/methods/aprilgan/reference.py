"""The authors' released APRIL-GAN weights (ByChelsea/VAND-APRIL-GAN `exps/pretrained/*.pth`, or a train.py
`epoch_N.pth`) as a run directory.

The file holds only the four linear layers, {'trainable_linearlayer': {fc.{i}.weight [E, W], fc.{i}.bias [E]}};
it is read with torch.load(weights_only=True) (or as a flat safetensors file with the same key paths): no code
runs. The few-shot memory bank is not stored: the authors rebuild it from k normal images at test time; here it
and the fixed normalisers are built by `finalize()` from the shots of `--data` (never from the test split).
Without `--data` the run is the reference's zero-shot mode (map Z, score = text probability).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from madclip_runtime.atomic import AtomicDirectory
from madclip_runtime.errors import MadclipError

from ...config import ModelConfig, TrainConfig
from ...data import load_arrays, load_split, sample_shots, shots_from_list, shots_record
from ...model import build_model
from ...reference import load_reference_checkpoint
from ...rundir import versions, write_run

KEY = "trainable_linearlayer"


def load_release(path: str | Path) -> dict:
    """A released checkpoint as a dict (weights only): .safetensors by its flat keys, else torch.load."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            flat = load_file(str(path))
        except FileNotFoundError:
            raise MadclipError(f"{path}: no such file") from None
        except Exception as exc:
            raise MadclipError(f"{path}: not a readable safetensors file ({type(exc).__name__})") from None
        nested: dict = {}
        for k, v in flat.items():
            head, _, rest = k.partition(".")
            nested.setdefault(head, {})[rest] = v
        return nested
    return load_reference_checkpoint(path)


def convert_linear_layers(ref: dict, n_layers: int = 4) -> dict[str, torch.Tensor]:
    """{'trainable_linearlayer': {fc.{i}.weight, fc.{i}.bias}} (or that inner dict) -> linear.{i}.weight/bias."""
    sd = ref.get(KEY, ref)
    if not isinstance(sd, dict):
        raise MadclipError(f"reference checkpoint's {KEY!r} is not a state dict")
    out: dict[str, torch.Tensor] = {}
    for i in range(n_layers):
        for part in ("weight", "bias"):
            key = f"fc.{i}.{part}"
            if not isinstance(sd.get(key), torch.Tensor):
                raise MadclipError(
                    f"reference checkpoint lacks {KEY}.{key} (not a VAND-APRIL-GAN checkpoint "
                    f"with {n_layers} ViT linear layers)"
                )
            out[f"linear.{i}.{part}"] = sd[key].float()
    extra = sorted(k for k in sd if k.startswith("fc.") and int(k.split(".")[1]) >= n_layers)
    if extra:
        raise MadclipError(
            f"reference checkpoint has more linear layers than {n_layers} taps (e.g. {extra[0]})"
        )
    return out


@dataclass
class ShotImages:
    """The shots as finalize() reads a training source (each shot its own group, all originals)."""

    images: torch.Tensor  # [N, 3, S, S] preprocessed
    labels: torch.Tensor  # [N]
    groups: torch.Tensor
    originals: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def convert_aprilgan_reference(
    checkpoint: str,
    out: str,
    mcfg: ModelConfig,
    data: str | None = None,
    shot_list: str | None = None,
    shots: int = 4,
    seed: int = 111,
    force: bool = False,
) -> str:
    """Linear layers from the release (+ bank and normalisers from the shots of `data`) -> run directory `out`."""
    state = convert_linear_layers(load_release(checkpoint))
    split = samples = None
    if data:
        split = load_split(data, "valid")
        samples = shots_from_list(split, shot_list) if shot_list else sample_shots(split, shots, seed)
    with AtomicDirectory(out, force=force) as tmp:
        model = build_model(mcfg, seed=seed)
        model.load_linear(state, checkpoint)
        mcfg = ModelConfig.from_dict({**mcfg.to_dict(), "taps": list(model.backbone.taps)})
        model.cfg = mcfg
        dataset: dict = {"has_masks": None}
        record: dict = {"note": "zero-shot: no shots (the reference's zero-shot mode)"}
        info: dict = {"mode": "zero-shot (no memory bank): score = text probability"}
        n_normal = 0
        if samples is not None:
            images, _, labels = load_arrays(samples, mcfg.preprocess)
            n = len(labels)
            source = ShotImages(
                torch.from_numpy(images),
                torch.from_numpy(labels),
                torch.arange(n),
                torch.ones(n, dtype=torch.bool),
            )
            info = model.finalize(source, torch.device("cpu"))
            record = shots_record(samples)
            record["seed"], record["shot_list"] = seed, shot_list
            n_normal = sum(1 for s in samples if s.label == 0)
            dataset = {
                "root": str(Path(data).resolve()),
                "name": Path(data).resolve().name,
                "has_masks": split.has_masks,
                "n_shots": len(samples),
            }
        config = {
            "model": mcfg.to_dict(),
            "train": TrainConfig(shots=n_normal or shots, seed=seed).to_dict(),
            "backbone_fingerprint": model.backbone.fingerprint(),
            "converted_from": str(Path(checkpoint).resolve()),
            "versions": versions(),
            "dataset": dataset,
            "selection": "reference (authors' released checkpoint)",
            "finalize": info,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_run(tmp, model, config, record)
    return out
