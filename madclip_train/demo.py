"""Procedural demo dataset: MRI-like axial brain phantoms with synthetic lesions, in the MVFA layout.

So a fresh clone can run the quickstart offline. Each image is an independent "subject": an elliptical head
(scalp, bright skull ring, dark CSF rim), brain tissue with a darker cortical band and smooth low-frequency
texture, two lateral ventricles, mild blur and noise; shape, position, tilt and intensities vary per subject.
Abnormal images get 1-2 irregular lesions with soft edges inside the brain, bright or dark; their masks
(0/255 8-bit PNG) mark where the lesion weight exceeds 0.5. Pure numpy + PIL (no torch).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter

from madclip_runtime.atomic import AtomicDirectory
from madclip_runtime.errors import MadclipError

DATASET_NAME = "Brain_AD"
_SPLIT_IDS = {"valid": 0, "test": 1}


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in about [-1, 1]: a cells x cells noise grid upsampled bicubically. [size, size]."""
    small = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((size, size), Image.Resampling.BICUBIC))


def _ellipse_r(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float, tilt: float
) -> np.ndarray:
    """Normalised elliptical radius (1 on the ellipse boundary)."""
    c, s = np.cos(tilt), np.sin(tilt)
    u = (x - cx) * c + (y - cy) * s
    v = -(x - cx) * s + (y - cy) * c
    return np.sqrt((u / ax) ** 2 + (v / ay) ** 2)


def _soft(r: np.ndarray, edge: float, width: float) -> np.ndarray:
    """1 inside r < edge, 0 outside, with a smooth (logistic) transition of the given width."""
    return 1.0 / (1.0 + np.exp(np.clip((r - edge) / width, -30.0, 30.0)))


def _phantom(
    rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One healthy slice: image float32 [S, S] in [0, 1], brain weight [S, S] in [0, 1], lesion-centre
    candidates bool [S, S] (deep brain, outside the ventricles), grid x, grid y."""
    lin = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(lin, lin, indexing="ij")  # [S, S] each
    cx, cy = rng.uniform(-0.05, 0.05, 2)
    ax, ay = rng.uniform(0.68, 0.80), rng.uniform(0.82, 0.92)
    tilt = rng.uniform(-0.15, 0.15)
    r = _ellipse_r(x, y, cx, cy, ax, ay, tilt)
    # Slight wobble of the outline so heads are not perfect ellipses.
    r = r * (1.0 + 0.025 * _smooth_noise(rng, size, 4))
    w = 1.2 / size
    head = _soft(r, 1.0, w)
    skull_in = rng.uniform(0.90, 0.93)
    brain_edge = skull_in - rng.uniform(0.015, 0.03)
    inner = _soft(r, skull_in, w)
    brain = _soft(r, brain_edge, w)
    scalp_v, skull_v, csf_v = rng.uniform(0.35, 0.5), rng.uniform(0.75, 0.95), rng.uniform(0.05, 0.12)
    img = head * scalp_v
    img = img + (_soft(r, 0.965, w) - inner) * (skull_v - scalp_v)  # bright skull ring
    img = img * (1.0 - inner) + inner * csf_v  # dark CSF rim under the skull
    # Brain: white matter, a darker cortical band, smooth texture.
    wm, gm = rng.uniform(0.52, 0.65), rng.uniform(0.36, 0.46)
    cortex = _soft(r, brain_edge - rng.uniform(0.12, 0.18), 0.02)
    tissue = gm + (wm - gm) * cortex
    tissue = tissue + 0.06 * _smooth_noise(rng, size, 6) + 0.03 * _smooth_noise(rng, size, 18)
    img = img * (1.0 - brain) + brain * tissue
    # Lateral ventricles: two tilted ellipses either side of the midline.
    vs = rng.uniform(0.8, 1.2)
    vx, vy = rng.uniform(0.08, 0.13), rng.uniform(-0.12, 0.02)
    vent_v = rng.uniform(0.08, 0.16)
    vent = np.zeros_like(img)
    for side in (-1.0, 1.0):
        rv = _ellipse_r(
            x, y, cx + side * vx, cy + vy, 0.06 * vs, 0.20 * vs, tilt + side * rng.uniform(0.25, 0.45)
        )
        vent = np.maximum(vent, _soft(rv, 1.0, 0.08))
    img = img * (1.0 - vent * brain) + vent * brain * vent_v
    centres = (r < brain_edge - 0.22) & (vent < 0.05)
    return img.astype(np.float32), brain, centres, x, y


def _add_lesions(
    rng: np.random.Generator,
    img: np.ndarray,
    brain: np.ndarray,
    centres: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """1-2 irregular soft-edged lesions inside the brain. Returns (image, lesion mask bool [S, S])."""
    size = img.shape[0]
    inside = np.argwhere(centres)
    if len(inside) == 0:
        inside = np.argwhere(brain > 0.5)
    mask = np.zeros(img.shape, dtype=bool)
    for _ in range(int(rng.integers(1, 3))):
        py, px = inside[int(rng.integers(len(inside)))]
        ly, lx = y[py, px], x[py, px]
        r0 = rng.uniform(0.06, 0.13)
        theta = np.arctan2(y - ly, x - lx)
        radius = np.full_like(theta, r0)
        for k in (2, 3, 5):  # irregular outline: a few random harmonics
            radius = radius * (1.0 + rng.uniform(0.05, 0.18) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)))
        d = np.sqrt((x - lx) ** 2 + (y - ly) ** 2)
        weight = _soft(d, radius, rng.uniform(0.008, 0.02)) * brain  # [S, S] in [0, 1]
        bright = rng.random() < 0.6
        amp = rng.uniform(0.25, 0.4) if bright else -rng.uniform(0.2, 0.35)
        texture = 1.0 + 0.25 * _smooth_noise(rng, size, 24)
        img = img + weight * amp * texture
        mask |= weight > 0.5
    return img, mask


def make_slice(rng: np.random.Generator, size: int, abnormal: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """One subject: 8-bit grey image [S, S] and, when abnormal, a 0/255 uint8 mask [S, S] (never empty)."""
    img, brain, centres, x, y = _phantom(rng, size)
    mask = None
    if abnormal:
        lesioned, m = _add_lesions(rng, img, brain, centres, x, y)
        while not m.any():  # a lesion too small for the pixel grid: draw again
            lesioned, m = _add_lesions(rng, img, brain, centres, x, y)
        img, mask = lesioned, m
    pil = Image.fromarray(np.clip(img * 255.0, 0, 255).astype(np.uint8), mode="L")
    pil = pil.filter(ImageFilter.GaussianBlur(radius=0.7))
    arr = np.asarray(pil).astype(np.float32) + rng.normal(0.0, 3.0, (size, size)) * (np.asarray(pil) > 8)
    out = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return out, (mask.astype(np.uint8) * 255 if mask is not None else None)


def _save_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr, mode="L").save(path, format="PNG")


def generate_demo(
    out_dir: str | os.PathLike,
    n_valid: int = 16,
    n_test: int = 20,
    size: int = 240,
    seed: int = 0,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write OUT/Brain_AD/{valid,test}/{good/img, Ungood/img, Ungood/anomaly_mask}; returns OUT/Brain_AD.

    valid holds n_valid normal + n_valid abnormal images, test n_test + n_test. Built in a temporary sibling
    folder and renamed into place (`AtomicDirectory`); an existing non-empty Brain_AD is only replaced with
    force=True.
    `progress(done, total)` is called after each image.
    """
    if n_valid < 1 or n_test < 1:
        raise MadclipError(f"--n-valid and --n-test must be at least 1, got {n_valid} and {n_test}")
    if size < 32:
        raise MadclipError(f"--size must be at least 32 pixels, got {size}")
    out = Path(os.fspath(out_dir)).absolute()
    target = out / DATASET_NAME
    if target.exists() and not target.is_dir():
        raise MadclipError(f"{target}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise MadclipError(f"{target}: already exists and is not empty (use --force to replace it)")
    empty = target.is_dir() and not any(target.iterdir())
    total = 2 * (n_valid + n_test)
    done = 0
    with AtomicDirectory(target, force=force or empty) as tmp_dir:
        tmp = Path(tmp_dir)
        for split, n in (("valid", n_valid), ("test", n_test)):
            good = tmp / split / "good" / "img"
            bad = tmp / split / "Ungood" / "img"
            masks = tmp / split / "Ungood" / "anomaly_mask"
            for d in (good, bad, masks):
                d.mkdir(parents=True)
            for label, folder in ((0, good), (1, bad)):
                kind = "normal" if label == 0 else "abnormal"
                for i in range(n):
                    rng = np.random.default_rng([seed, _SPLIT_IDS[split], label, i])
                    img, mask = make_slice(rng, size, abnormal=bool(label))
                    name = f"{split}_{kind}_{i:03d}.png"
                    _save_png(img, folder / name)
                    if mask is not None:
                        _save_png(mask, masks / name)
                    done += 1
                    if progress is not None:
                        progress(done, total)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """madclip-demo-data: write the procedural demo dataset."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from madclip_runtime.cli.common import ArgumentParser, bounded_int, run_cli, setup_logging
    from madclip_runtime.safe_text import escape_control

    parser = ArgumentParser(
        prog="madclip-demo-data",
        description="Generate a procedural MRI-like brain demo dataset (MVFA layout) for the quickstart.",
    )
    parser.add_argument(
        "--out", default="data", help="output folder; the dataset goes to OUT/Brain_AD (default: data)"
    )
    parser.add_argument(
        "--n-valid",
        type=bounded_int(1, 100_000),
        default=16,
        help="normal and abnormal images each in valid/ (default: 16)",
    )
    parser.add_argument(
        "--n-test",
        type=bounded_int(0, 100_000),
        default=20,
        help="normal and abnormal images each in test/ (default: 20)",
    )
    parser.add_argument(
        "--size", type=bounded_int(32, 4096), default=240, help="image side in pixels (default: 240)"
    )
    parser.add_argument("--seed", type=bounded_int(0, 2**32 - 1), default=0, help="random seed (default: 0)")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty OUT/Brain_AD")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging (tracebacks of unexpected errors)"
    )
    args = parser.parse_args(argv)

    def body() -> int:
        setup_logging(args.verbose)
        console = Console()
        with Progress(
            TextColumn("demo data"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        ) as bar:
            task = bar.add_task("generate", total=2 * (max(args.n_valid, 0) + max(args.n_test, 0)))
            path = generate_demo(
                args.out,
                n_valid=args.n_valid,
                n_test=args.n_test,
                size=args.size,
                seed=args.seed,
                force=args.force,
                progress=lambda done, total: bar.update(task, completed=done),
            )
        console.print(
            f"wrote {DATASET_NAME}: {args.n_valid}+{args.n_valid} valid, {args.n_test}+{args.n_test} test images "
            f"to {escape_control(path)}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
