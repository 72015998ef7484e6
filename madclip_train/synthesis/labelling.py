"""Soft labels of the patch-blending task (MediCLIP's `FlippedGaussianLabeller`, std 0.2).

label = 1 - exp(-d^2 / (2 * 0.2^2)) with d = (augmented - original) computed in uint8 arithmetic, as the
reference does on its uint8 images: the difference wraps modulo 256, so d = 0 only where the pixel is
unchanged, d = 1 (label 0.999996) only where it grew by exactly one grey level, and every other change gives
exactly 1.0 in float64. The labels are therefore binary in practice. Then, per connected region of the
anomaly mask (4-connectivity), a 3 x 3 grey closing and hole filling by morphological reconstruction
(erosion) of the region's bounding box (scipy.ndimage.grey_closing, skimage.morphology.reconstruction).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import morphology

LABEL_STD = 0.2
_FOOTPRINT = ndimage.generate_binary_structure(2, 2)  # 3 x 3


def flipped_gaussian(x: np.ndarray, std: float = LABEL_STD) -> np.ndarray:
    """1 - exp(-x^2 / (2 std^2)): 0 at x = 0, saturating to 1."""
    return 1.0 - np.exp(-(x**2) / (2.0 * std**2))


def cutpaste_label(aug: np.ndarray, orig: np.ndarray, mask: np.ndarray, std: float = LABEL_STD) -> np.ndarray:
    """aug, orig uint8 [H, W], mask bool [H, W] -> float64 labels [H, W] in [0, 1]."""
    diff = np.subtract(aug, orig, dtype=np.uint8)  # wraps modulo 256, as uint8 arrays do in the reference
    scaled = flipped_gaussian((mask * diff).astype(np.float64), std)  # [H, W]
    for region in ndimage.find_objects(ndimage.label(mask)[0]):
        closed = ndimage.grey_closing(scaled[region], footprint=_FOOTPRINT)
        seed = closed.copy()
        seed[1:-1, 1:-1] = closed.max()
        scaled[region] = morphology.reconstruction(seed, closed, method="erosion")
    return scaled
