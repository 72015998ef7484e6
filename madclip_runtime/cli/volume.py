"""madclip-infer's volume path: options, and scoring each NIfTI / DICOM series to one answer per scan.

`madclip-infer case01.nii.gz --bundle B --out results/` writes case01_map.nii.gz, case01_montage.png and
case01.json (and case01_seg.dcm with --dicom-seg on DICOM input), together or not at all; see
`madclip_runtime.scans.volume_output` and, for tilted or unevenly spaced series, `madclip_runtime.scans.geometry`.
Any failure of one volume is one error line (an error row); the other inputs are still scored.
A volume is a NIfTI with more than one axial slice, a multi-frame DICOM, or two or more DICOM files of one
SeriesInstanceUID; with `--slice N` volumes are read slice by slice as before (one slice decoded).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from .. import INTENDED_USE
from ..contract import SCORE
from ..errors import InputError, MadclipError
from .common import bounded_int, error_line, finite_float

log = logging.getLogger(__name__)


def add_volume_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("volumes (NIfTI, DICOM series, multi-frame DICOM)")
    g.add_argument(
        "--volume-score",
        default="max",
        metavar="METHOD",
        help="one score per volume from its slices' scores: max (default) or mean-top-k / mean-top-N",
    )
    g.add_argument(
        "--series",
        default=None,
        metavar="UID",
        help="only this SeriesInstanceUID when a folder holds several DICOM series (default: each)",
    )
    g.add_argument(
        "--volume-index",
        type=bounded_int(0),
        default=None,
        metavar="T",
        help="volume T of a 4-D NIfTI (4-D files are refused without it)",
    )
    g.add_argument(
        "--dicom-seg",
        action="store_true",
        help="with --out and DICOM input (a series, a multi-frame file or one 2-D image): also write "
        "<stem>_seg.dcm, the thresholded map as DICOM SEG on the source frames",
    )
    g.add_argument(
        "--map-threshold",
        type=finite_float(0.0),
        default=None,
        metavar="T",
        help="anomaly-map pixel threshold for the SEG and contours (default: the bundle's calibrated one)",
    )
    g.add_argument(
        "--max-voxels",
        type=bounded_int(1),
        default=None,
        metavar="N",
        help="voxel budget per read, checked from headers before decoding "
        "(default 268435456, or $MADCLIP_MAX_VOXELS)",
    )


def check_volume_args(args: argparse.Namespace) -> None:
    """Validate the volume options (one line each) and apply the voxel budget for every reader."""
    from ..scans.medical import set_max_voxels
    from ..scans.volume_output import parse_volume_score

    parse_volume_score(args.volume_score)
    if args.volume_index is not None and args.volume_index < 0:
        raise MadclipError(f"--volume-index must be >= 0, got {args.volume_index}")
    if args.map_threshold is not None and not math.isfinite(args.map_threshold):
        raise MadclipError(f"--map-threshold must be a finite number, got {args.map_threshold}")
    if args.max_voxels is not None and args.max_voxels <= 0:
        raise MadclipError(f"--max-voxels must be a positive number of voxels, got {args.max_voxels}")
    set_max_voxels(
        args.max_voxels
    )  # every DICOM/NIfTI reader of this run (None: $MADCLIP_MAX_VOXELS or default)
    if args.dicom_seg and not args.out:
        raise MadclipError("--dicom-seg writes a file: give --out DIR")


def map_threshold_choice(args: argparse.Namespace, bundle: Any) -> tuple[float | None, str | None]:
    """(pixel threshold, how it was chosen): --map-threshold, else the bundle's calibrated one."""
    if args.map_threshold is not None:
        return float(args.map_threshold), "given with --map-threshold"
    t = bundle.map_threshold
    if t is None:
        return None, None
    method = bundle.calibration.get("map_threshold_method") or "calibrated by madclip-export"
    return float(t), f"bundle calibration: {method}"


def volume_table(rows: list[dict[str, Any]]) -> Table:
    """The per-volume summary table, shared by madclip-infer and the DICOMweb node."""
    table = Table(title="volumes", caption=INTENDED_USE)
    table.add_column("volume", overflow="fold")
    for name, justify in (
        ("slices", "right"),
        (SCORE, "right"),
        ("method", "left"),
        ("label", "left"),
        ("top slices", "left"),
    ):
        table.add_column(name, justify=justify)
    for r in rows:
        label = r["label"] or "-"
        style = "bold red" if label == "anomaly" else ("green" if label == "normal" else "")
        score = f"{r['volume_score']:.4f}" if r["volume_score"] is not None else "nan"
        table.add_row(
            r["file"],
            str(r["n_slices"]),
            score,
            r["volume_score_method"],
            f"[{style}]{label}[/]" if style else label,
            ", ".join(str(k) for k in r["top_slices"][:3]),
        )
    return table


def run_volumes(
    args: argparse.Namespace,
    predictor: Any,
    bundle: Any,
    jobs: Sequence[Any],
    out_dir: str | None,
    used_stems: set[str],
    progress: Any,
    out_console: Console,
) -> int:
    """Score every volume job; write outputs with --out. Returns the number of volumes that failed."""
    from ..scans.volume_output import (
        parse_volume_score,
        save_volume_outputs,
        score_volume,
        summarize,
        volume_record,
    )

    method = parse_volume_score(args.volume_score)
    map_t, map_t_method = map_threshold_choice(args, bundle)
    rows: list[dict[str, Any]] = []
    failed = 0
    for job in jobs:
        task = None
        try:
            volume = job.read(bundle.spec.window, args.volume_index)
            task = progress.add_task(f"{volume.name} ({volume.n_slices} slices)", total=volume.n_slices)
            preds = score_volume(predictor, volume, lambda n, t=task: progress.advance(t, n))
            progress.remove_task(task)
            task = None
            record = volume_record(
                volume, summarize(volume, preds, method, predictor.threshold, predictor.score_name), predictor
            )
            volume.release_pixels(record["top_slices"])  # the montage's slices are all that is shown
            if out_dir is not None:
                stem = volume.name
                base, k = stem, 2
                while stem in used_stems:
                    stem, k = f"{base}_{k}", k + 1
                used_stems.add(stem)
                seg = None
                if args.dicom_seg:
                    seg = _seg_builder(volume, map_t, map_t_method, bundle)
                paths = save_volume_outputs(
                    out_dir, stem, volume, preds, record, bundle.map_scale, map_t, map_t_method, seg
                )
                record["outputs"] = {k: os.path.basename(v) for k, v in paths.items()}
        except (InputError, MadclipError) as exc:
            error_line(str(exc))
            failed += 1
            continue
        except MemoryError:
            error_line(
                f"{job.source}: out of memory reading or scoring this volume (try --max-voxels or --slice)"
            )
            failed += 1
            continue
        except Exception as exc:  # one bad input never stops the others: an error row, the rest is scored
            log.debug("%s", job.source, exc_info=True)
            error_line(f"{job.source}: cannot process this volume ({type(exc).__name__}: {_one_line(exc)})")
            failed += 1
            continue
        finally:
            volume = preds = None  # release this volume's slices and maps before the next one
            if task is not None:
                progress.remove_task(task)
        if args.json:
            print(json.dumps(_strict(record), allow_nan=False), flush=True)
        rows.append(record)
    if rows and not args.json:
        out_console.print(volume_table(rows))
    return failed


def _seg_builder(volume: Any, map_t: float | None, method: str | None, bundle: Any):
    if not volume.is_dicom:
        log.warning("%s: no DICOM SEG: the input is not DICOM (a SEG references DICOM images)", volume.source)
        return None
    if map_t is None:
        raise InputError(
            f"{bundle.path}: the bundle has no calibrated map threshold; give --map-threshold for --dicom-seg"
        )
    from ..scans.dicom_seg import dicom_seg_bytes

    prov = bundle.meta.get("provenance") if isinstance(bundle.meta.get("provenance"), dict) else {}
    model_name = f"madclip {prov.get('backbone', '')} {prov.get('objective', '')}".strip()
    return lambda planes: dicom_seg_bytes(volume, planes, map_t, method or "", model_name)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def dicom_image_seg(args: argparse.Namespace, bundle: Any, path: str, scan: Any, amap: Any) -> bytes:
    """The one-frame DICOM SEG of a 2-D DICOM image scored on the 2-D path (--dicom-seg)."""
    from ..scans.dicom_seg import image_volume
    from ..scans.medical import read_dicom_header

    map_t, method = map_threshold_choice(args, bundle)
    volume = image_volume(path, read_dicom_header(path), scan)
    build = _seg_builder(volume, map_t, method, bundle)
    return build([amap])


def _strict(obj: Any) -> Any:
    from ..overlay import jsonable

    return jsonable(obj)
