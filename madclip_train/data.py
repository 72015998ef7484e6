"""Datasets: find the images of a split, pick the few shots, load them as arrays.

Two folder layouts are understood (docs/METHODS.md §1):

* MVFA/BMAD: ``ROOT/{valid,test}/good/img/*``, ``ROOT/{valid,test}/Ungood/img/*`` and, for datasets with
  pixel labels, ``ROOT/{valid,test}/Ungood/anomaly_mask/*`` (same stems). Few shots come from ``valid``.
* Plain: ``ROOT/normal/*``, ``ROOT/abnormal/*``, optional ``ROOT/masks/*``. This folder set is the ``valid``
  split. The ``test`` split of a plain dataset is ``ROOT/test/{normal,abnormal,masks}``; when that folder is
  absent, asking for ``test`` is an error (we never silently evaluate on the images the shots come from).

The mask folder of an image folder is found by replacing the final ``img`` FOLDER component with
``anomaly_mask``, never a substring of the path (the reference's replace("img", ...) breaks roots such as
``/data/imgdata``). A mask may have another extension than its image as long as the stem matches.
"""

from __future__ import annotations

import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from madclip_runtime.errors import InputError, MadclipError
from madclip_runtime.preprocess import PreprocessSpec, preprocess, preprocess_mask
from madclip_runtime.scans import imageio
from madclip_runtime.scans.imageio import read_image, read_mask

log = logging.getLogger(__name__)

SPLITS = ("valid", "test")
MVFA_NORMAL, MVFA_ABNORMAL, MVFA_IMG, MVFA_MASK = "good", "Ungood", "img", "anomaly_mask"
PLAIN_NORMAL, PLAIN_ABNORMAL, PLAIN_MASK = "normal", "abnormal", "masks"


@dataclass(frozen=True)
class Sample:
    """One image of a dataset. label: 0 normal, 1 abnormal. mask_path: None for normal images and mask-less sets."""

    path: str
    label: int
    mask_path: str | None = None


@dataclass(frozen=True)
class Split:
    """The images of one split of one dataset, each class sorted by file name."""

    root: str
    name: str
    normal: tuple[Sample, ...]
    abnormal: tuple[Sample, ...]
    has_masks: bool
    normal_dir: str = ""  # folder the normal images were listed from (for error messages)
    abnormal_dir: str = ""

    @property
    def samples(self) -> tuple[Sample, ...]:
        """Normal images, then abnormal images."""
        return self.normal + self.abnormal


# ---------------------------------------------------------------------------------------------- listing


def _image_suffix(name: str) -> str | None:
    """The image extension `name` ends with (case-insensitive), or None when it is not an image file."""
    low = name.lower()
    for ext in sorted(
        imageio.IMAGE_EXTENSIONS, key=len, reverse=True
    ):  # longest first: ".nii.gz" before ".gz"
        if low.endswith(ext) and len(name) > len(ext):
            return ext
    return None


def _stem(name: str) -> str:
    ext = _image_suffix(name)
    return name[: len(name) - len(ext)] if ext else name


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name (hidden files skipped)."""
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and _image_suffix(p.name)),
        key=lambda p: p.name,
    )


def mask_dir_for(img_dir: Path) -> Path:
    """`.../Ungood/img` -> `.../Ungood/anomaly_mask`: replaces the last folder component only."""
    if img_dir.name != MVFA_IMG:
        raise MadclipError(f"{img_dir}: expected an image folder named '{MVFA_IMG}'")
    return img_dir.parent / MVFA_MASK


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise MadclipError(
            f"{path}: {what} not found" if not path.exists() else f"{path}: {what} is not a folder"
        )


def _class_images(folder: Path, split: str) -> list[Path]:
    _require_dir(folder, "class folder")
    images = list_images(folder)
    if not images:
        exts = " ".join(imageio.IMAGE_EXTENSIONS)
        raise MadclipError(
            f"{folder}: empty split (no image files with extensions {exts}) in split '{split}'"
        )
    return images


def _match_masks(images: list[Path], mask_dir: Path) -> list[str]:
    """Mask path per abnormal image: same file name, else same stem with any image extension."""
    by_name: dict[str, Path] = {}
    by_stem: dict[str, Path] = {}
    for p in list_images(mask_dir):
        by_name[p.name] = p
        by_stem.setdefault(_stem(p.name), p)
    out = []
    for img in images:
        mask = by_name.get(img.name) or by_stem.get(_stem(img.name))
        if mask is None:
            raise MadclipError(
                f"{mask_dir}: no mask for abnormal image {img.name} (expected {_stem(img.name)}.*)"
            )
        out.append(str(mask))
    return out


def _detect_layout(root: Path) -> str:
    if any((root / s / c).is_dir() for s in SPLITS for c in (MVFA_NORMAL, MVFA_ABNORMAL)):
        return "mvfa"
    if (
        any((root / c).is_dir() for c in (PLAIN_NORMAL, PLAIN_ABNORMAL))
        or (root / "test" / PLAIN_NORMAL).is_dir()
    ):
        return "plain"
    raise MadclipError(
        f"{root}: not a dataset folder (expected valid/good/img + valid/Ungood/img, or normal/ + abnormal/)"
    )


def load_split(root: str | os.PathLike, split: str = "valid") -> Split:
    """List the images (and masks) of one split; see the module docstring for the layouts."""
    if split not in SPLITS:
        raise MadclipError(f"{root}: unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    root_p = Path(os.path.abspath(os.fspath(root)))
    if not root_p.is_dir():
        raise MadclipError(
            f"{root_p}: dataset root not found" if not root_p.exists() else f"{root_p}: not a folder"
        )
    layout = _detect_layout(root_p)
    if layout == "mvfa":
        split_dir = root_p / split
        _require_dir(split_dir, f"split folder '{split}'")
        normal_dir = split_dir / MVFA_NORMAL / MVFA_IMG
        abnormal_dir = split_dir / MVFA_ABNORMAL / MVFA_IMG
        mask_dir = mask_dir_for(abnormal_dir)
    else:
        split_dir = root_p if split == "valid" else root_p / "test"
        _require_dir(split_dir, f"split folder '{split}'")
        normal_dir, abnormal_dir = split_dir / PLAIN_NORMAL, split_dir / PLAIN_ABNORMAL
        mask_dir = split_dir / PLAIN_MASK
    normal_imgs = _class_images(normal_dir, split)
    abnormal_imgs = _class_images(abnormal_dir, split)
    has_masks = mask_dir.is_dir()
    masks: list[str | None] = (
        _match_masks(abnormal_imgs, mask_dir) if has_masks else [None] * len(abnormal_imgs)
    )
    log.debug(
        "%s/%s (%s layout): %d normal, %d abnormal, masks=%s",
        root_p,
        split,
        layout,
        len(normal_imgs),
        len(abnormal_imgs),
        has_masks,
    )
    return Split(
        root=str(root_p),
        name=split,
        normal=tuple(Sample(str(p), 0, None) for p in normal_imgs),
        abnormal=tuple(Sample(str(p), 1, m) for p, m in zip(abnormal_imgs, masks)),
        has_masks=has_masks,
        normal_dir=str(normal_dir),
        abnormal_dir=str(abnormal_dir),
    )


# ---------------------------------------------------------------------------------------------- shots


def sample_shots(split: Split, k: int, seed: int) -> tuple[Sample, ...]:
    """k normal then k abnormal samples, drawn without replacement by one random.Random(seed).

    Draws from the name-sorted lists, normal first, so the choice depends only on (file names, k, seed).
    """
    if k < 1:
        raise MadclipError(f"--shots must be at least 1, got {k}")
    for samples, folder in ((split.normal, split.normal_dir), (split.abnormal, split.abnormal_dir)):
        if len(samples) < k:
            raise MadclipError(f"{folder} has {len(samples)} images, fewer than --shots {k}")
    rng = random.Random(seed)
    return tuple(rng.sample(list(split.normal), k)) + tuple(rng.sample(list(split.abnormal), k))


_SHOT_LINE = re.compile(r"^\s*([an])-(\d+)\s*:(.*)$")


def parse_shot_list(path: str | os.PathLike, index: int = 0) -> dict[str, list[str]]:
    """Read a shot list (`a-0: name name ...` abnormal, `n-0: name ...` normal).

    Returns {"normal": [...], "abnormal": [...]} from every line whose index equals `index` (several `a-0:`
    lines are concatenated; lines of other indices, blank lines and `#` comments are ignored). Names may be
    separated by spaces or commas and may carry an extension or not.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise MadclipError(f"{path}: shot list not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MadclipError(f"{path}: cannot read shot list ({type(exc).__name__}: {exc})") from None
    out: dict[str, list[str]] = {"normal": [], "abnormal": []}
    seen_index = False
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _SHOT_LINE.match(line)
        if m is None:
            raise MadclipError(f"{path}:{lineno}: not a shot line (expected 'a-N: names' or 'n-N: names')")
        if int(m.group(2)) != index:
            continue
        seen_index = True
        key = "abnormal" if m.group(1) == "a" else "normal"
        out[key].extend(n for n in re.split(r"[\s,]+", m.group(3).strip()) if n)
    if not seen_index:
        raise MadclipError(f"{path}: no 'a-{index}:' or 'n-{index}:' lines")
    for key in ("normal", "abnormal"):
        if not out[key]:
            raise MadclipError(
                f"{path}: no {key} names for index {index} ('{key[0]}-{index}:' line missing or empty)"
            )
    return out


def _resolve(name: str, samples: Sequence[Sample], list_path: str, folder: str) -> Sample:
    base = os.path.basename(name)
    exact = [s for s in samples if os.path.basename(s.path) == base]
    if exact:
        return exact[0]
    by_stem = [s for s in samples if _stem(os.path.basename(s.path)) == _stem(base)]
    if len(by_stem) == 1:
        return by_stem[0]
    if len(by_stem) > 1:
        raise MadclipError(
            f"{list_path}: shot name {name!r} is ambiguous in {folder} ({len(by_stem)} files match)"
        )
    raise MadclipError(f"{list_path}: shot name {name!r} not found in {folder}")


def shots_from_list(split: Split, path: str | os.PathLike, index: int = 0) -> tuple[Sample, ...]:
    """The samples named by a shot list (see parse_shot_list): normal ones first, in list order."""
    path = os.fspath(path)
    names = parse_shot_list(path, index)
    picked: list[Sample] = []
    for key, pool, folder in (
        ("normal", split.normal, split.normal_dir),
        ("abnormal", split.abnormal, split.abnormal_dir),
    ):
        chosen = [_resolve(n, pool, path, folder) for n in names[key]]
        if len(set(chosen)) != len(chosen):
            raise MadclipError(f"{path}: a {key} image is listed twice for index {index}")
        picked.extend(chosen)
    return tuple(picked)


def _dataset_root(image: Path) -> Path | None:
    """The dataset root of an image path in one of the two layouts, or None."""
    parent = image.parent
    if (
        parent.name == MVFA_IMG
        and parent.parent.name in (MVFA_NORMAL, MVFA_ABNORMAL)
        and len(image.parents) >= 4
    ):
        return image.parents[3]
    if parent.name in (PLAIN_NORMAL, PLAIN_ABNORMAL):
        return parent.parent
    return None


def shots_record(samples: Sequence[Sample], root: str | os.PathLike | None = None) -> dict:
    """JSON-ready description of the shots for shots.json: paths relative to the dataset root.

    `root` defaults to the dataset root implied by the layout (`ROOT/{split}/{good,Ungood}/img/x` or
    `ROOT/{normal,abnormal}/x`); when the samples do not agree on one, the deepest folder containing them all.
    """
    if not samples:
        raise MadclipError("no shots to record")
    paths = [s.path for s in samples] + [s.mask_path for s in samples if s.mask_path]
    if root is not None:
        base = os.path.abspath(os.fspath(root))
    else:
        roots = {_dataset_root(Path(os.path.abspath(s.path))) for s in samples}
        base = (
            str(roots.pop())
            if len(roots) == 1 and None not in roots
            else os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
        )

    def rel(p: str) -> str:
        return Path(os.path.relpath(os.path.abspath(p), base)).as_posix()

    return {
        "root": base,
        "n_normal": sum(1 for s in samples if s.label == 0),
        "n_abnormal": sum(1 for s in samples if s.label == 1),
        "shots": [
            {"path": rel(s.path), "label": int(s.label), "mask": rel(s.mask_path) if s.mask_path else None}
            for s in samples
        ],
    }


# ---------------------------------------------------------------------------------------------- arrays


def load_arrays(
    samples: Sequence[Sample], spec: PreprocessSpec | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read and preprocess samples: images float32 [N, 3, S, S], masks bool [N, S, S], labels int64 [N].

    Normal images, and abnormal images of mask-less datasets, get all-zero masks.
    """
    spec = PreprocessSpec() if spec is None else spec
    s = spec.image_size
    n = len(samples)
    images = np.empty((n, 3, s, s), dtype=np.float32)  # [N, 3, S, S]
    masks = np.zeros((n, s, s), dtype=bool)  # [N, S, S]
    labels = np.empty((n,), dtype=np.int64)  # [N]
    for i, smp in enumerate(samples):
        scan = read_image(smp.path, spec.window)
        images[i] = preprocess(scan, spec)
        labels[i] = int(smp.label)
        if smp.mask_path is not None:
            mask = read_mask(smp.mask_path)
            if mask.shape[:2] != (scan.height, scan.width):
                raise InputError(
                    f"{smp.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {smp.path} "
                    f"is {scan.width}x{scan.height} (width x height)"
                )
            masks[i] = preprocess_mask(mask, spec)
            if smp.label == 1 and not masks[i].any():
                why = (
                    "is empty (all zero)"
                    if not (mask > spec.mask_threshold).any()
                    else f"becomes empty at {s}x{s} (lesion too small)"
                )
                log.warning(
                    "%s: mask of abnormal image %s %s: its lesion will be trained as background; check the "
                    "mask",
                    smp.mask_path,
                    os.path.basename(smp.path),
                    why,
                )
    return images, masks, labels


def normalize_images(images01, spec: PreprocessSpec):
    """[0, 1] images (torch [N, 3, S, S]) -> model input range (the shared preprocessing's normalisation step);
    augmentation works on [0, 1] images, so the trainer and the reference converter normalise after it."""
    if spec.normalize == "none":
        return images01
    import torch

    from madclip_runtime.preprocess import normalize_array

    return torch.from_numpy(normalize_array(images01.numpy(), spec))
