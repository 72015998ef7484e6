"""Deformed rectangle / ellipse shapes (the radial deformation tasks' anomaly shapes) and their edge finders.

As MediCLIP's `EitherDeformedHypershapePatchMaker` (from NSA): a rectangle or an ellipse (50/50) with sides
(0.03 + Gamma(2, 0.1)) * image side, clipped to the task's bounds; a shear N(0, 0.2) per axis, a rotation
U(-pi/2, pi/2), and a uniform shrink when the transformed box exceeds the upper bound. Rasterised by pulling
every pixel of the transformed bounding box back through the inverse transform and testing inclusion.

The returned `intersect(origin [2, 1], directions [2, N]) -> [2, N]` gives, in patch-centred coordinates,
where each ray from `origin` leaves the shape (the radial deformations need the distance to the edge).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Intersect = Callable[[np.ndarray, np.ndarray], np.ndarray]

GAMMA_LB, GAMMA_SHAPE, GAMMA_SCALE = 0.03, 2.0, 0.1
SHEAR_STD = 0.2


def rotation(angle: float) -> np.ndarray:
    """2 x 2 rotation matrix [[cos, -sin], [sin, cos]]."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def nsa_sample_dimension(lb: int, ub: int, img_d: int, rng: np.random.Generator) -> int:
    """Side length int(clip((0.03 + Gamma(2, 0.1)) * img_d, lb, ub)); about half the draws hit `lb`."""
    return int(np.clip((GAMMA_LB + rng.gamma(GAMMA_SHAPE, GAMMA_SCALE)) * img_d, lb, ub))


def _rect_inside(coords: np.ndarray, size: np.ndarray) -> np.ndarray:
    half = np.reshape(size / 2, (-1, 1))
    return np.all(-half <= coords, axis=0) & np.all(coords <= half, axis=0)


def _ellipse_inside(coords: np.ndarray, size: np.ndarray) -> np.ndarray:
    radii = np.reshape(size / 2, (-1, 1))
    return np.sum(coords**2 / radii**2, axis=0) <= 1


def _rect_edge(size: np.ndarray, origin: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """First exit point of rays origin + t * direction (t >= 0) from the axis-aligned box of `size`."""
    half = np.reshape(size / 2, (-1, 1))
    direction = direction / np.linalg.norm(direction, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        dist = np.concatenate([(half - origin) / direction, (-half - origin) / direction])  # [4, N]
    dist[dist < 0] = np.inf
    return origin + direction * np.min(dist, axis=0)


def _ellipse_edge(size: np.ndarray, origin: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """First exit point of rays origin + t * direction (t >= 0) from the axis-aligned ellipse of `size`."""
    r2 = np.reshape((size / 2) ** 2, (-1, 1))
    direction = direction / np.linalg.norm(direction, axis=0)
    a = np.sum(direction**2 / r2, axis=0)
    b = np.sum(2 * origin * direction / r2, axis=0)
    c = np.sum(origin**2 / r2, axis=0) - 1
    with np.errstate(invalid="ignore"):
        sol = (-b + np.array([[1.0], [-1.0]]) * np.sqrt(b**2 - 4 * a * c)) / (2 * a)  # [2, N]
    sol[sol < 0] = np.inf
    return origin + direction * np.min(sol, axis=0)


_KINDS = {"rectangle": (_rect_inside, _rect_edge), "ellipse": (_ellipse_inside, _ellipse_edge)}


def _grid_extent(trans: np.ndarray, corners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = trans @ corners
    return np.floor(np.min(t, axis=1)), np.ceil(np.max(t, axis=1))


def deformed_shape(
    dim_bounds: list[tuple[int, int]], img_dims: np.ndarray, rng: np.random.Generator, kind: str | None = None
) -> tuple[np.ndarray, Intersect, str]:
    """Draw a sheared, rotated rectangle or ellipse -> (bool mask [h, w], intersect function, kind)."""
    if kind is None:
        kind = ("rectangle", "ellipse")[int(rng.integers(2))]
    inside, edge = _KINDS[kind]
    size = np.array([nsa_sample_dimension(lb, ub, int(d), rng) for (lb, ub), d in zip(dim_bounds, img_dims)])
    trans = np.identity(2)
    for d in range(2):  # shear of each axis against the other one
        trans[d, 1 - d] = rng.normal(scale=SHEAR_STD)
    trans = rotation(rng.uniform(-np.pi / 2, np.pi / 2)) @ trans

    half = (size - 1) / 2
    corners = np.array(np.meshgrid(*np.stack([half, -half], axis=-1), indexing="ij")).reshape(2, 4)
    lo, hi = _grid_extent(trans, corners)
    grid_shape = hi + 1 - lo
    ub = np.array([u for _, u in dim_bounds])
    if np.any(grid_shape > ub):  # too big after the shear/rotation: shrink uniformly to fit
        trans = trans / np.max(grid_shape / ub)
        lo, hi = _grid_extent(trans, corners)
        grid_shape = hi + 1 - lo

    coords = np.array(np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(lo, hi)], indexing="ij"))
    inv = np.linalg.inv(trans)
    mask = inside(inv @ coords.reshape(2, -1), size).reshape(grid_shape.astype(int))

    def intersect(origin: np.ndarray, direction: np.ndarray) -> np.ndarray:
        return trans @ edge(size, inv @ origin, inv @ direction)

    return mask, intersect, kind
