"""The anomaly-synthesis tasks of MediCLIP (its `medsyn/tasks.py`), on grey uint8 images.

Every task follows the reference's `BaseTask.apply`: up to two rounds of (draw a shape, place its bounding
box uniformly so that it fits in the image, apply the task inside it, OR the shape into the anomaly mask);
after each round stop with probability 0.5, so a sample holds 1 or 2 anomalies (same task, may overlap).
Shape sizes per axis are bounded by round(p * side) for the task's (min, max) proportions.

Enabled in the reference (0.25 each): cutpaste, gauss, source, identity. Present but disabled there, here
off by default: smooth (SmoothIntensityChangeTask, scale 30), sink (SinkDeformationTask).

All randomness comes from the `numpy.random.Generator` passed in, never from global state. The image
arithmetic keeps the reference's dtypes (uint8 in, scipy's rounding to uint8 for warped patches, float for
the Gaussian intensity change, then truncation back to uint8), so the value statistics match.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from .labelling import cutpaste_label
from .perlin import perlin_shape
from .shapes import Intersect, deformed_shape, rotation

MAX_ROUNDS = 2
STOP_PROBABILITY = 0.5


def _slices(corner: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(int(c), int(c) + int(d)) for c, d in zip(corner, shape))


@dataclass
class TaskResult:
    """image uint8 [H, W], label float64 [H, W] in [0, 1], rounds = number of anomalies drawn (0 for identity)."""

    image: np.ndarray
    label: np.ndarray
    rounds: int


class Task(abc.ABC):
    """One synthesis task. Subclasses set the size proportions and shape, and implement `augment`."""

    name: str = ""
    min_prop: float = 0.3
    max_prop: float = 0.8
    shape: str = "deformed"  # "perlin" | "deformed"

    def draw_shape(self, bounds, img_dims, rng) -> tuple[np.ndarray, Intersect | None]:
        if self.shape == "perlin":
            return perlin_shape(bounds, rng), None
        mask, intersect, _ = deformed_shape(bounds, img_dims, rng)
        return mask, intersect

    @abc.abstractmethod
    def augment(
        self,
        aug: np.ndarray,
        corner: np.ndarray,
        patch: np.ndarray,
        intersect: Intersect | None,
        rng: np.random.Generator,
        shots: Sequence[np.ndarray],
    ) -> np.ndarray:
        """Apply the task inside the box at `corner` covered by `patch` (bool [h, w]); may grow `patch`."""

    def label(self, aug: np.ndarray, orig: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return mask.astype(np.float64)

    def __call__(
        self, image: np.ndarray, rng: np.random.Generator, shots: Sequence[np.ndarray] = ()
    ) -> TaskResult:
        if image.dtype != np.uint8 or image.ndim != 2:
            raise ValueError(f"expected a grey uint8 [H, W] image, got {image.dtype} {image.shape}")
        dims = np.array(image.shape)
        bounds = list(
            zip((self.min_prop * dims).round().astype(int), (self.max_prop * dims).round().astype(int))
        )
        aug = image.copy()
        mask = np.zeros(image.shape, dtype=bool)
        rounds = 0
        for _ in range(MAX_ROUNDS):
            patch, intersect = self.draw_shape(bounds, dims, rng)
            corner = rng.integers(np.zeros(2, dtype=int), dims - np.array(patch.shape), endpoint=True)
            aug = self.augment(aug, corner, patch, intersect, rng, shots)
            mask[_slices(corner, patch.shape)] |= patch
            rounds += 1
            if rng.random() > STOP_PROBABILITY:
                break
        label = self.label(aug, image, mask)
        return TaskResult(aug.astype(np.uint8), label, rounds)  # float -> uint8 truncates, as the reference


class CutPaste(Task):
    """A patch of a random shot (itself included), rotated U(-pi/4, pi/4) and scaled by s or 1/s with
    s = 1 + Exp(0.1) (capped so the read region is at most 0.8 of the source), cubic-warped with
    scipy.ndimage.affine_transform, clipped to the source's range and hard-pasted inside a Perlin blob.
    Soft labels from `labelling.cutpaste_label`."""

    name, min_prop, max_prop, shape = "cutpaste", 0.1, 0.6, "perlin"

    def augment(self, aug, corner, patch, intersect, rng, shots):
        if not shots:
            raise ValueError("cutpaste needs at least one source shot")
        source = shots[int(rng.integers(len(shots)))]
        src_dims = np.array(source.shape)
        trans = rotation(rng.uniform(-np.pi / 4, np.pi / 4))  # backward map: output patch -> source region
        target = np.array(patch.shape)
        corners = np.array(np.meshgrid(*np.stack([np.zeros(2), target], axis=-1), indexing="ij")).reshape(
            2, 4
        )
        t = trans @ corners
        init_grid = np.ceil(t.max(axis=1)) - np.floor(t.min(axis=1))
        max_scale = np.min(0.8 * src_dims / init_grid)
        change = 1 + rng.exponential(scale=0.1)
        scale = min((change, 1 / change)[int(rng.integers(2))], max_scale)
        trans = scale * trans
        t = trans @ corners
        lo = np.floor(t.min(axis=1))
        grid = (np.ceil(t.max(axis=1)) - lo).astype(int)
        src_corner = rng.integers(np.zeros(2, dtype=int), src_dims - grid, endpoint=True)
        region = source[_slices(src_corner, tuple(grid))]
        blend = ndimage.affine_transform(
            region, trans, offset=-lo, output_shape=tuple(target)
        )  # uint8, cubic
        blend = np.clip(blend, source.min(), source.max())
        out = aug.copy()
        box = _slices(corner, patch.shape)
        out[box][patch] = blend[patch]
        changed = (
            np.subtract(aug[box], out[box], dtype=aug.dtype)
            if aug.dtype == np.uint8
            else np.abs(aug[box] - out[box])
        )
        patch[changed > 0.001] = True  # the reference's update for blends that leak outside the shape
        return out

    def label(self, aug, orig, mask):
        return cutpaste_label(aug, orig, mask)


class GaussIntensity(Task):
    """A smooth random texture added inside a Perlin blob: N(0, 1) noise thresholded at 0, blurred with
    sigma in {4, 7}, min-max scaled, times u0 ~ U[0.4, 0.6] or U[-0.6, -0.4] (50/50), clipped to [-1, 1];
    inside the blob the image (in [0, 1]) gains texture * blur(blob, sigma ~ U(1, 4)); clip to [0, 1].
    Label: the hard blob mask."""

    name, min_prop, max_prop, shape = "gauss", 0.3, 0.8, "perlin"
    sigma_bs = (4, 7)
    positive_range = (0.4, 0.6)
    negative_range = (-0.6, -0.4)

    def texture(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        sigma_b = self.sigma_bs[int(rng.integers(len(self.sigma_bs)))]
        noise = (rng.standard_normal(shape) >= 0.0).astype(np.float64)
        noise = ndimage.gaussian_filter(noise, sigma_b)
        noise = (noise - noise.min()) / (noise.max() - noise.min())
        u0 = (
            rng.uniform(*self.positive_range)
            if rng.uniform(0, 1) <= 0.5
            else rng.uniform(*self.negative_range)
        )
        return np.clip(u0 * noise, -1, 1)

    def augment(self, aug, corner, patch, intersect, rng, shots):
        m = patch.astype(np.float64)
        tex = self.texture(aug.shape, rng)
        x = aug / 255.0
        blur = ndimage.gaussian_filter(m, rng.uniform(1, 4))
        box = _slices(corner, patch.shape)
        p = x[box]
        x[box] = p * (1 - m) + (p + tex[box] * blur) * m
        return np.clip(x, 0.0, 1.0) * 255.0  # float [0, 255]; truncated to uint8 at the end


class SmoothIntensity(Task):
    """(Disabled in the reference.) Intensity offset ramping up from the blob edge over a distance
    min(side * (0.02 + Gamma(3, 0.01)), max distance) (Euclidean distance transform), offset
    scale/2 + Gamma(3, scale) with a random sign, scale 30; clipped to the image's range."""

    name, min_prop, max_prop, shape = "smooth", 0.3, 0.8, "perlin"
    scale = 30.0

    def augment(self, aug, corner, patch, intersect, rng, shots):
        dist = ndimage.distance_transform_edt(patch)
        smooth = np.minimum(np.min(aug.shape) * (0.02 + rng.gamma(3, 0.01)), np.max(dist))
        ramp = np.minimum(dist / smooth, 1.0)
        change = (self.scale / 2 + rng.gamma(3, self.scale)) * (1.0, -1.0)[int(rng.integers(2))]
        out = aug.copy()
        box = _slices(corner, patch.shape)
        out[box] = np.clip(aug[box] + ramp * change, aug.min(), aug.max())  # cast to aug's dtype (truncates)
        return out


class RadialDeformation(Task):
    """Resample the inside of a deformed rectangle/ellipse radially about a random interior pixel: a pixel at
    distance d, whose ray meets the shape edge at distance D, reads the old image at `new_distance(d, D, f)`,
    f = 2^U(0.5, 2); cubic scipy.ndimage.map_coordinates, mode nearest. Label: the hard shape mask."""

    min_prop, max_prop, shape = 0.2, 0.6, "deformed"

    @staticmethod
    @abc.abstractmethod
    def new_distance(d: np.ndarray, big_d: np.ndarray, f: float) -> np.ndarray:
        """Where a pixel at distance d from the centre (edge at distance D along its ray) reads the old image."""

    def augment(self, aug, corner, patch, intersect, rng, shots):
        dims = np.array(patch.shape)
        mask_centre = np.reshape((dims - 1) / 2, (-1, 1))
        candidates = np.stack(np.nonzero(patch))  # [2, N]
        centre = candidates[:, int(rng.integers(candidates.shape[1]))]
        c = np.reshape(centre, (-1, 1)).astype(np.float64)
        mapping = np.stack(
            np.meshgrid(*[np.arange(s, dtype=float) for s in dims], indexing="ij")
        )  # [2, h, w]
        inner = patch[1:-1, 1:-1]  # pixels on the box edge stay where they are
        coords = mapping[:, 1:-1, 1:-1][:, inner]  # [2, N]
        to_centre = coords - c
        dist = np.linalg.norm(to_centre, axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            dirs = to_centre / dist  # NaN at the centre pixel, restored below
            edge = intersect(c - mask_centre, dirs) + mask_centre
            edge_dist = np.linalg.norm(edge - c, axis=0)
            new = c + self.new_distance(dist, edge_dist, 2 ** rng.uniform(0.5, 2)) * dirs
        mapping[:, 1:-1, 1:-1][:, inner] = new
        mapping[(slice(None), *centre)] = centre
        out = aug.copy()
        box = _slices(corner, patch.shape)
        out[box] = ndimage.map_coordinates(aug[box], mapping, mode="nearest")
        return out


class SourceDeformation(RadialDeformation):
    """Reads at D (d / D)^f: the centre is magnified (a 'source' pushing tissue outwards)."""

    name = "source"

    @staticmethod
    def new_distance(d, big_d, f):
        return d**f / big_d ** (f - 1)


class SinkDeformation(RadialDeformation):
    """(Disabled in the reference.) Reads at D - (D - d)^f / D^(f-1): tissue pulled towards the centre."""

    name = "sink"

    @staticmethod
    def new_distance(d, big_d, f):
        return big_d - (big_d - d) ** f / big_d ** (f - 1)


class Identity(Task):
    """The image unchanged, an all-zero mask (normal examples for the model)."""

    name = "identity"

    def augment(self, aug, corner, patch, intersect, rng, shots):
        return aug  # nothing changes (never reached: __call__ below skips shape drawing)

    def __call__(self, image, rng, shots=()):
        if image.dtype != np.uint8 or image.ndim != 2:
            raise ValueError(f"expected a grey uint8 [H, W] image, got {image.dtype} {image.shape}")
        return TaskResult(image.copy(), np.zeros(image.shape, dtype=np.float64), 0)


TASKS: dict[str, Callable[[], Task]] = {
    cls.name: cls
    for cls in (CutPaste, GaussIntensity, SourceDeformation, Identity, SmoothIntensity, SinkDeformation)
}
REFERENCE_NAMES = {  # the reference's yaml keys
    "cutpaste": "CutpasteTask",
    "gauss": "GaussIntensityChangeTask",
    "source": "SourceTask",
    "identity": "IdentityTask",
    "smooth": "SmoothIntensityTask",
    "sink": "SinkTask",
}
