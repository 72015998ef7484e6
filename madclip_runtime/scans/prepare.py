"""Few-shot training sets from labelled volumes: image + label NIfTI pairs -> the MVFA/BMAD folder layout.

    OUT/{valid,test}/good/img/<case>_z<k>.png            normal slices
    OUT/{valid,test}/Ungood/img/<case>_z<k>.png          abnormal slices (label has >= min_lesion_voxels)
    OUT/{valid,test}/Ungood/anomaly_mask/<case>_z<k>.png their lesion masks (0/255)
    OUT/manifest.json                                    provenance of every slice, and the settings

This is how the MVFA/BMAD benchmark slices were cut from BraTS/LiTS-style volumes. Rules:

- Split by PATIENT: patients (the case name, or the first group of `patient_regex` on it) are shuffled with
  the seed and a `valid_fraction` of them go to valid (the few-shot source), the rest to test; no patient's
  slices are ever on both sides.
- Abnormal slices: the label (any value > 0) has at least `min_lesion_voxels` voxels in the slice. Normal
  slices: from lesion-free volumes, and from labelled volumes at least `normal_margin` slices away from any
  slice with a lesion voxel. Slices whose content (fraction of pixels above 2 % of the window) is below
  `min_content` are skipped (air, empty slices at the volume's ends). At most `max_per_volume` slices per
  class and volume, drawn with the seed.
- Slices are the reader's axial planes (`madclip_runtime.scans.medical`: closest RAS+, shown radiologically), so a
  slice of the training set looks exactly like the slice `madclip-infer` scores.
- Intensities: a window preset (ct-abdomen C40/W400, ct-lung C-600/W1500, ct-brain C40/W80), `mr` = the
  volume's 0.5-99.5th percentiles of non-zero voxels, or an explicit "C,W"; written as 8- or 16-bit PNG.

Deterministic: the same inputs and seed give byte-identical files. Torch-free (numpy, nibabel, PIL).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from .. import INTENDED_USE, __version__
from ..atomic import AtomicDirectory, atomic_save_png, atomic_write_text
from ..errors import InputError, MadclipError
from .medical import check_voxels, nifti_header

log = logging.getLogger(__name__)

WINDOW_PRESETS = {"ct-abdomen": (40.0, 400.0), "ct-lung": (-600.0, 1500.0), "ct-brain": (40.0, 80.0)}
MR_PERCENTILES = (0.5, 99.5)
CONTENT_LEVEL = 0.02  # a pixel is "content" above 2 % of the window
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class PrepareOptions:
    images: str
    labels: str
    out: str
    window: str = "ct-abdomen"
    bits: int = 8
    min_lesion_voxels: int = 20
    normal_margin: int = 5
    min_content: float = 0.10
    max_per_volume: int = 10
    valid_fraction: float = 0.3
    patient_regex: str | None = None
    seed: int = 0
    force: bool = False
    volume_index: int | None = None

    def check(self) -> None:
        parse_window(self.window)
        if self.bits not in (8, 16):
            raise MadclipError(f"--bits must be 8 or 16, got {self.bits}")
        for name in ("min_lesion_voxels", "normal_margin", "max_per_volume"):
            if getattr(self, name) < (1 if name != "normal_margin" else 0):
                raise MadclipError(
                    f"--{name.replace('_', '-')} must be >= {1 if name != 'normal_margin' else 0}, "
                    f"got {getattr(self, name)}"
                )
        if not (math.isfinite(self.min_content) and 0.0 <= self.min_content < 1.0):
            raise MadclipError(f"--min-content must be in [0, 1), got {self.min_content}")
        if not (math.isfinite(self.valid_fraction) and 0.0 < self.valid_fraction < 1.0):
            raise MadclipError(f"--valid-fraction must be in (0, 1), got {self.valid_fraction}")
        if self.patient_regex is not None:
            try:
                if re.compile(self.patient_regex).groups < 1:
                    raise MadclipError(
                        f"--patient-regex {self.patient_regex!r} needs a group, e.g. '^(.+?)_'"
                    )
            except re.error as exc:
                raise MadclipError(f"--patient-regex {self.patient_regex!r}: {exc}") from None


def parse_window(text: str) -> tuple[str, tuple[float, float] | None]:
    """'ct-abdomen' | 'ct-lung' | 'ct-brain' | 'mr' | 'C,W' -> (name, (center, width) or None for mr)."""
    t = text.strip().lower()
    if t in WINDOW_PRESETS:
        return t, WINDOW_PRESETS[t]
    if t == "mr":
        return "mr", None
    m = re.fullmatch(r"\s*(-?[0-9.]+(?:e-?\d+)?)\s*,\s*([0-9.]+(?:e-?\d+)?)\s*", t)
    if m:
        c, w = float(m.group(1)), float(m.group(2))
        if math.isfinite(c) and math.isfinite(w) and w > 0:
            return f"C{c:g},W{w:g}", (c, w)
    raise MadclipError(
        f"--window must be one of {', '.join(WINDOW_PRESETS)}, mr, or 'CENTER,WIDTH' "
        f"(e.g. 40,400), got {text!r}"
    )


def case_name(filename: str) -> str:
    """'case01_0000.nii.gz' -> 'case01' (nnU-Net channel suffix dropped); 'case01.nii' -> 'case01'."""
    name = os.path.basename(filename)
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"_\d{4}$", "", name)


def pair_volumes(images: str, labels: str) -> list[tuple[str, str, str]]:
    """-> sorted (case, image path, label path); every image needs a label of the same case name."""

    def listing(folder: str, what: str) -> dict[str, str]:
        if not os.path.isdir(folder):
            raise MadclipError(f"{folder}: no such {what} directory")
        found: dict[str, str] = {}
        for n in sorted(os.listdir(folder)):
            if n.startswith(".") or not n.lower().endswith(NIFTI_SUFFIXES):
                continue
            case = case_name(n)
            if case in found:
                raise MadclipError(
                    f"{folder}: two {what} files for case {case!r}: {os.path.basename(found[case])} and {n}"
                )
            found[case] = os.path.join(folder, n)
        if not found:
            raise MadclipError(f"{folder}: no NIfTI files (.nii, .nii.gz) in this {what} directory")
        return found

    imgs, labs = listing(images, "images"), listing(labels, "labels")
    missing = sorted(set(imgs) - set(labs))
    if missing:
        raise MadclipError(
            f"{labels}: no label volume for {len(missing)} image(s), e.g. {missing[0]!r} "
            "(labels must have the image's case name)"
        )
    extra = sorted(set(labs) - set(imgs))
    if extra:
        log.warning("%s: %d label(s) without an image ignored, e.g. %s", labels, len(extra), extra[0])
    return [(c, imgs[c], labs[c]) for c in sorted(imgs)]


def patient_of(case: str, regex: str | None) -> str:
    if regex is None:
        return case
    m = re.search(regex, case)
    if not m:
        raise MadclipError(f"--patient-regex {regex!r} does not match case {case!r}")
    return m.group(1)


def split_patients(
    patients: Sequence[str], valid_fraction: float, seed: int, with_lesion: set[str] | None = None
) -> dict[str, str]:
    """patient -> 'valid' | 'test', shuffled with `seed`, stratified by whether a patient has lesions (so both
    sides get abnormal slices when there are two such patients); at least one patient per side when possible."""
    with_lesion = with_lesion or set()
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    for group in (
        sorted(p for p in set(patients) if p in with_lesion),
        sorted(p for p in set(patients) if p not in with_lesion),
    ):
        if not group:
            continue
        order = list(rng.permutation(len(group)))
        n_valid = min(max(1, round(valid_fraction * len(group))), max(1, len(group) - 1))
        out.update({group[i]: ("valid" if rank < n_valid else "test") for rank, i in enumerate(order)})
    if len(out) > 1 and len(set(out.values())) == 1:  # e.g. one patient per stratum: move one to test
        out[sorted(out)[-1]] = "test"
    return out


def _load_ras(path: str, volume_index: int | None, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI -> (volume [X(R), Y(A), Z(S)] reoriented like madclip's reader, original affine).

    Images come back as float32 (scaled in float32, not nibabel's float64), NaN/inf voxels (resampled data)
    set to the lowest finite value, i.e. background, with a warning; labels as a bool lesion mask (> 0).
    Working memory: the stored array plus one float32 copy (a view is reoriented, never copied)."""
    img, shape = nifti_header(path, what)
    nib = importlib.import_module("nibabel")  # present: nifti_header required it
    if len(shape) == 4 and volume_index is not None and 0 <= volume_index < shape[3]:
        check_voxels(path, shape, int(np.prod(shape[:3])))
        proxy = img.dataobj[..., volume_index]
    elif len(shape) == 3:
        check_voxels(path, shape, int(np.prod(shape)))
        proxy = img.dataobj
    else:
        raise InputError(
            f"{path}: {what} of shape {shape} is not a 3-D volume"
            + (" (pick one volume with --volume-index)" if len(shape) == 4 else "")
        )
    ornt = nib.orientations.io_orientation(img.affine)
    try:
        if what == "label":
            raw = np.asanyarray(img.dataobj.get_unscaled() if proxy is img.dataobj else proxy)
            data = (raw > 0).reshape(shape[:3])  # any label value counts as lesion (scaling keeps the sign)
            del raw
        else:
            slope, inter = (
                float(getattr(img.dataobj, "slope", 1.0)),
                float(getattr(img.dataobj, "inter", 0.0)),
            )
            if proxy is img.dataobj and hasattr(proxy, "get_unscaled"):
                data = np.asarray(proxy.get_unscaled()).astype(np.float32).reshape(shape[:3])
                if slope != 1.0 or inter != 0.0:
                    data *= np.float32(slope)
                    data += np.float32(inter)
            else:
                data = np.asarray(proxy, dtype=np.float32)
            bad = ~np.isfinite(data)
            if bad.any():
                if bad.all():
                    raise InputError(f"{path}: {what} has no finite voxel")
                n_bad = int(bad.sum())
                data[bad] = np.min(data[~bad])
                log.warning(
                    "%s: %d NaN/infinite voxels read as background (the lowest finite value)", path, n_bad
                )
            del bad
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: cannot read NIfTI voxel data ({type(exc).__name__}: {exc})") from None
    return nib.orientations.apply_orientation(data, ornt), np.asarray(img.affine)


def plane(vol: np.ndarray, k: int) -> np.ndarray:
    """Axial slice k as madclip shows it: rows anterior -> posterior, columns right -> left. [Y, X]"""
    return np.ascontiguousarray(vol[::-1, ::-1, k].T)


def window_unit(
    vol: np.ndarray, window: tuple[str, tuple[float, float] | None]
) -> tuple[np.ndarray, list[float]]:
    """Volume -> [0, 1] float32 with the window (mr: the volume's non-zero percentiles); -> (unit, [lo, hi]).

    A float32 `vol` is windowed IN PLACE (and returned): the caller's array becomes the unit volume."""
    name, cw = window
    if cw is None:
        nz = vol[vol != 0]
        lo, hi = np.percentile(nz, MR_PERCENTILES) if nz.size else (0.0, 1.0)
        del nz
        lo, hi = float(lo), float(hi)
        if not hi > lo:
            hi = lo + 1.0
    else:
        lo, hi = cw[0] - cw[1] / 2.0, cw[0] + cw[1] / 2.0
    unit = vol if vol.dtype == np.float32 else vol.astype(np.float32)
    unit -= np.float32(lo)
    unit /= np.float32(hi - lo)
    np.clip(unit, 0.0, 1.0, out=unit)
    return unit, [lo, hi]


def _png(unit: np.ndarray, bits: int) -> Image.Image:
    if bits == 8:
        return Image.fromarray(np.round(unit * 255.0).astype(np.uint8))  # L
    return Image.fromarray(np.round(unit * 65535.0).astype(np.uint16))  # I;16


def choose_slices(
    lesion_per_slice: np.ndarray, content: np.ndarray, opts: PrepareOptions, rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    """(abnormal slice indices, normal slice indices) of one volume, each capped at max_per_volume."""
    n = lesion_per_slice.size
    has_content = content >= opts.min_content
    abnormal = [k for k in range(n) if lesion_per_slice[k] >= opts.min_lesion_voxels and has_content[k]]
    touched = np.flatnonzero(lesion_per_slice > 0)
    normal = []
    for k in range(n):
        if not has_content[k] or lesion_per_slice[k] > 0:
            continue
        if touched.size and np.min(np.abs(touched - k)) < max(1, opts.normal_margin):
            continue
        normal.append(k)

    def cap(ks: list[int]) -> list[int]:
        if len(ks) <= opts.max_per_volume:
            return ks
        return sorted(int(k) for k in rng.choice(ks, opts.max_per_volume, replace=False))

    return cap(abnormal), cap(normal)


def prepare(opts: PrepareOptions, advance: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build the dataset at opts.out (atomically: complete or absent). Returns the manifest."""
    opts.check()
    window = parse_window(opts.window)
    pairs = pair_volumes(opts.images, opts.labels)
    patients = {case: patient_of(case, opts.patient_regex) for case, _, _ in pairs}
    with_lesion = set()
    for case, _, label_path in pairs:  # a first pass over the labels only, to stratify the split
        lab, _ = _load_ras(label_path, None, "label")
        if (lab.sum(axis=(0, 1)) >= opts.min_lesion_voxels).any():
            with_lesion.add(patients[case])
        del lab
    split_of = split_patients(list(patients.values()), opts.valid_fraction, opts.seed, with_lesion)
    rng = np.random.default_rng(opts.seed)
    entries: list[dict[str, Any]] = []
    with AtomicDirectory(opts.out, force=opts.force) as tmp:
        for split in ("valid", "test"):
            for sub in ("good/img", "Ungood/img", "Ungood/anomaly_mask"):
                os.makedirs(os.path.join(tmp, split, sub), exist_ok=True)
        for case, image_path, label_path in pairs:
            vol, affine = _load_ras(image_path, opts.volume_index, "image")
            lab, lab_affine = _load_ras(label_path, None, "label")
            if lab.shape != vol.shape or not np.allclose(affine, lab_affine, atol=1e-3):
                raise InputError(
                    f"{label_path}: label grid {lab.shape} does not match its image {image_path} "
                    f"{vol.shape} (shape and affine must be equal)"
                )
            unit, (lo, hi) = window_unit(vol, window)  # in place: vol is now the unit volume
            lesion = lab  # [X, Y, Z] bool; any label value counts as lesion
            per_slice = lesion.sum(axis=(0, 1))
            content = (unit > CONTENT_LEVEL).mean(axis=(0, 1))
            abnormal, normal = choose_slices(per_slice, content, opts, rng)
            split = split_of[patients[case]]
            for label, ks in ((1, abnormal), (0, normal)):
                for k in ks:
                    name = f"{case}_z{k:03d}.png"
                    cls = "Ungood" if label else "good"
                    rel = f"{split}/{cls}/img/{name}"
                    atomic_save_png(os.path.join(tmp, rel), _png(plane(unit, k), opts.bits))
                    entry = {
                        "file": rel,
                        "split": split,
                        "label": label,
                        "case": case,
                        "patient": patients[case],
                        "slice": int(k),
                        "lesion_voxels": int(per_slice[k]),
                        "content": round(float(content[k]), 4),
                        "source_image": os.path.abspath(image_path),
                        "source_label": os.path.abspath(label_path),
                        "window": [lo, hi],
                    }
                    if label:
                        mrel = f"{split}/Ungood/anomaly_mask/{name}"
                        mask = plane(lesion, k).astype(np.uint8) * 255
                        atomic_save_png(os.path.join(tmp, mrel), Image.fromarray(mask.astype(np.uint8)))
                        entry["mask"] = mrel
                    entries.append(entry)
            del vol, lab, unit, lesion
            if advance is not None:
                advance(case)
        manifest = {
            "tool": "madclip-prepare",
            "version": __version__,
            "intended_use": INTENDED_USE,
            "options": {k: v for k, v in asdict(opts).items() if k not in ("force",)},
            "window": window[0],
            "axial_view": "closest RAS+, rows anterior->posterior, columns right->left",
            "splits": {s: sorted({p for p, sp in split_of.items() if sp == s}) for s in ("valid", "test")},
            "counts": {
                f"{s}/{c}": sum(1 for e in entries if e["split"] == s and e["label"] == (c == "Ungood"))
                for s in ("valid", "test")
                for c in ("good", "Ungood")
            },
            "slices": entries,
        }
        atomic_write_text(os.path.join(tmp, "manifest.json"), json.dumps(manifest, indent=1) + "\n")
    return manifest
