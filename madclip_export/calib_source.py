"""Calibration and golden images from `madclip-export --calib DIR` (any run, e.g. a converted reference checkpoint).

DIR is either a dataset root in one of the layouts madclip_train.data understands (MVFA ``valid/good/img``...,
or plain ``normal/`` + ``abnormal/``), whose `--calib-split` (default valid) gives labelled normal and
abnormal images (and masks), or a folder of images without labels. Labelled images calibrate the decision
threshold exactly as a run's shots do (Youden's J); an unlabelled folder only serves the parity gate, the
golden set and the map threshold (99.5th percentile), and the bundle then has no image decision threshold.
Never pass the split you will report results on: the threshold is chosen on these images.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from madclip_runtime.errors import MadclipError

log = logging.getLogger(__name__)

MAX_CALIB_IMAGES = 512  # calibration runs the PyTorch model on every image; more adds time, not accuracy


def _spread(items: list, n: int) -> list:
    """Up to n items evenly spread over the list (deterministic)."""
    if n <= 0 or not items:
        return []
    pick = np.linspace(0, len(items) - 1, min(len(items), n)).round().astype(int)
    return [items[i] for i in sorted(set(int(i) for i in pick))]


def calib_samples(path: str, split: str, n_golden: int):
    """(calibration samples, golden samples, has masks) from a dataset root or a folder of images."""
    from madclip_runtime.scans.imageio import IMAGE_EXTENSIONS, expand_inputs
    from madclip_train.data import Sample, load_split

    root = Path(os.path.abspath(path))
    if not root.is_dir():
        raise MadclipError(f"{root}: --calib must be a folder (a dataset root, or a folder of images)")
    try:
        data = load_split(root, split)
    except MadclipError as exc:
        if "not a dataset folder" not in str(exc):
            raise  # a dataset root with a problem (missing split, no masks for an image): say so
        files = [f for f in expand_inputs([str(root)]) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise MadclipError(f"{root}: no 2-D images ({' '.join(IMAGE_EXTENSIONS)}) for --calib") from None
        samples = [Sample(f, -1, None) for f in files]
        if len(samples) > MAX_CALIB_IMAGES:
            samples = _spread(samples, MAX_CALIB_IMAGES)
        log.warning(
            "%s: unlabelled images (no normal/ and abnormal/ folders): the bundle will give scores but no "
            "decision threshold; pass a dataset root to calibrate one",
            root,
        )
        return samples, _spread(samples, n_golden), False
    normal, abnormal = list(data.normal), list(data.abnormal)
    half = MAX_CALIB_IMAGES // 2
    samples = _spread(normal, half) + _spread(abnormal, half)
    golden = _spread(normal, n_golden // 2) + _spread(abnormal, n_golden - n_golden // 2)
    log.info(
        "calibrating on %d normal + %d abnormal images of %s/%s",
        min(len(normal), half),
        min(len(abnormal), half),
        root,
        split,
    )
    return samples, golden, data.has_masks
