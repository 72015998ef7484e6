"""Single-lattice-cell Perlin noise and the Perlin blob shape used by the patch-blending and intensity tasks.

MediCLIP's shape maker draws Perlin noise with ONE octave on ONE lattice cell (its scale 2**randint(0, 1) is
always 1): four random unit gradients at the corners of the box, quintic fade, values scaled by sqrt(2).
The noise is rotated by a uniform angle in [-90, 90] degrees (bilinear, zero fill, same canvas) and
thresholded at 0.3; it is redrawn until at least 20 % of the box is set.

Why hand-written: the PyPI package `perlin-numpy` (the code this noise descends from) implements the same
algorithm and accepts a numpy Generator, but raises a broadcast error for 32 of the box sizes drawn here
(49, 98, 147, ...: its float-step np.mgrid yields one row too many), and `noise`/`vnoise` use a fixed
permutation table with 12 gradient directions, not continuous random angles. The tests check this module
against `perlin-numpy` on every size where that package works. The rotation (imgaug in the reference) is
`scipy.ndimage.rotate`.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

THRESHOLD = 0.3  # mask = noise > 0.3
MIN_FILL = 0.2  # redraw until mean(mask) >= 0.2
MAX_ROTATION_DEG = 90.0


def fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic interpolant 6t^5 - 15t^4 + 10t^3."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_single_cell(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Perlin noise over one lattice cell spanning `shape` (rows, cols): float64 [rows, cols] in about [-1, 1].

    Pixel (i, j) sits at lattice position (i / rows, j / cols); the corner gradients are unit vectors at
    angles 2 pi U[0, 1) (one draw of 4 from `rng`, row-major over the 2 x 2 corners).
    """
    h, w = int(shape[0]), int(shape[1])
    x = (np.arange(h) * (1.0 / h))[:, None]  # [h, 1]  (as np.mgrid[0:1:1/h] computes it)
    y = (np.arange(w) * (1.0 / w))[None, :]  # [1, w]
    angles = 2.0 * math.pi * rng.uniform(size=(2, 2))
    gx, gy = np.cos(angles), np.sin(angles)  # [2, 2] each: corner (i, j) -> gradient

    def ramp(i: int, j: int) -> np.ndarray:  # dot(gradient at corner (i, j), offset from that corner)
        return (x - i) * gx[i, j] + (y - j) * gy[i, j]

    tx, ty = fade(x), fade(y)
    n0 = ramp(0, 0) + tx * (ramp(1, 0) - ramp(0, 0))  # lerp along rows at y-corner 0
    n1 = ramp(0, 1) + tx * (ramp(1, 1) - ramp(0, 1))
    return math.sqrt(2.0) * (n0 + ty * (n1 - n0))  # [h, w]


def rotate_same_canvas(image: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate about the centre, bilinear, zero fill, output the same shape (imgaug Affine(rotate) equivalent)."""
    return ndimage.rotate(image, angle_deg, reshape=False, order=1, mode="constant", cval=0.0)


def perlin_shape(dim_bounds: list[tuple[int, int]], rng: np.random.Generator) -> np.ndarray:
    """Perlin blob: bool [h, w] with h, w uniform integers in [lo, hi) per axis, at least 20 % set."""
    h = int(rng.integers(dim_bounds[0][0], dim_bounds[0][1]))
    w = int(rng.integers(dim_bounds[1][0], dim_bounds[1][1]))
    while True:
        noise = perlin_single_cell((h, w), rng)
        noise = rotate_same_canvas(noise, rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
        mask = noise > THRESHOLD
        if mask.mean() >= MIN_FILL:
            return mask
