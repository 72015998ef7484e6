"""Normal scans -> the grey uint8 [S, S] images the synthesis works on.

MediCLIP reads a training image with PIL: bilinear resize to S x S (aspect not kept), then convert("L")
(ITU-R 601 luma for colour), uint8. 8-bit files take exactly that path; >8-bit files are windowed to [0, 1]
by madclip_runtime.scans.imageio, resized in float and rounded to uint8 (the tasks are defined on 0..255).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from madclip_runtime.errors import MadclipError
from madclip_runtime.scans.imageio import read_image

from ..data import MVFA_IMG, MVFA_NORMAL, PLAIN_NORMAL, list_images

log = logging.getLogger(__name__)

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def normal_folder(root: str | os.PathLike) -> Path:
    """Where the normal training images of `root` are: ROOT/valid/good/img (MVFA/BMAD), ROOT/normal (plain
    layout), or ROOT itself (a folder of normal scans)."""
    root_p = Path(os.path.abspath(os.fspath(root)))
    if not root_p.is_dir():
        raise MadclipError(f"{root_p}: not found" if not root_p.exists() else f"{root_p}: not a folder")
    for cand in (root_p / "valid" / MVFA_NORMAL / MVFA_IMG, root_p / PLAIN_NORMAL):
        if cand.is_dir():
            return cand
    return root_p


def list_normals(root: str | os.PathLike) -> list[Path]:
    """The normal images of `root` (see `normal_folder`), sorted by name; error when there are none."""
    folder = normal_folder(root)
    images = list_images(folder)
    if not images:
        raise MadclipError(
            f"{folder}: no normal images (expected image files here, or ROOT/valid/good/img, or ROOT/normal)"
        )
    return images


def grey_uint8(path: str | os.PathLike, size: int, window: str = "auto") -> np.ndarray:
    """Read a scan and return grey uint8 [size, size] as the reference's training reader does."""
    scan = read_image(path, window)
    px = scan.pixels
    if px.dtype == np.uint8:
        img = Image.fromarray(px, mode="L" if px.ndim == 2 else "RGB")
        return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR).convert("L"), dtype=np.uint8)
    grey = px.astype(np.float32) if px.ndim == 2 else px.astype(np.float32) @ _LUMA
    out = Image.fromarray(np.ascontiguousarray(grey), mode="F").resize(
        (size, size), Image.Resampling.BILINEAR
    )
    return np.round(np.clip(np.asarray(out), 0.0, 1.0) * 255.0).astype(np.uint8)


def load_normals(paths, size: int, window: str = "auto") -> np.ndarray:
    """Several scans -> uint8 [N, size, size]."""
    return np.stack([grey_uint8(p, size, window) for p in paths])


def pick_shots(paths: list[Path], k: int, seed: int) -> list[Path]:
    """k of the (name-sorted) normal images, drawn by random.Random(seed) as the trainer draws shots."""
    import random

    if k < 1:
        raise MadclipError(f"--shots must be at least 1, got {k}")
    if len(paths) < k:
        raise MadclipError(f"{paths[0].parent} has {len(paths)} normal images, fewer than --shots {k}")
    return random.Random(seed).sample(list(paths), k)


def usable_shots(paths: list[Path], k: int) -> int:
    """How many normal shots a normal-only method takes from `paths` for --shots k: k, or all of them (with a
    one-line note) when the folder has fewer. madclip-synth and `madclip-train --method mediclip` share it, so
    the same folder gives the same shots in both."""
    if k < 1:
        raise MadclipError(f"--shots must be at least 1, got {k}")
    if len(paths) < k:
        log.info(
            "%s has %d normal images, fewer than --shots %d: using all %d as shots",
            paths[0].parent,
            len(paths),
            k,
            len(paths),
        )
        return len(paths)
    return k


def normal_samples(root: str | os.PathLike, k: int, seed: int, shot_list: str | None = None):
    """The k normal training shots of a normal-only method, as data.Sample (label 0): drawn like pick_shots
    (the same images data.sample_shots would pick as the normal half for this seed); all of them when the
    folder has fewer than k (`usable_shots`)."""
    from ..data import Sample

    if shot_list:
        raise MadclipError(
            f"{shot_list}: --shot-list is not supported by normal-only methods; use --shots and --seed "
            f"(the chosen files are recorded in the run's shots.json)"
        )
    paths = list_normals(root)
    return tuple(Sample(str(p), 0, None) for p in pick_shots(paths, usable_shots(paths, k), seed))
