"""madclip-prepare: labelled NIfTI volumes -> a few-shot training set in the MVFA layout (see `prepare`).

    madclip-prepare --images imagesTr/ --labels labelsTr/ --out data/MyOrgan_AD --window ct-abdomen

Exit codes: 0 written; 2 bad input (one line naming the file; nothing written). Research use only.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .. import INTENDED_USE, __version__
from ..scans.prepare import PrepareOptions, pair_volumes, prepare
from .common import EXIT_OK, ArgumentParser, bounded_int, err_console, finite_float, run_cli, setup_logging


def build_parser() -> argparse.ArgumentParser:
    d = PrepareOptions("", "", "")
    p = ArgumentParser(
        prog="madclip-prepare",
        description=f"Few-shot anomaly training set from labelled NIfTI volumes ({INTENDED_USE}).",
    )
    p.add_argument(
        "--images", required=True, help="folder of image volumes (.nii/.nii.gz; nnU-Net _0000 suffix ok)"
    )
    p.add_argument(
        "--labels", required=True, help="folder of label volumes with the images' case names (>0 = lesion)"
    )
    p.add_argument("--out", required=True, help="dataset root to create (valid/, test/, manifest.json)")
    p.add_argument(
        "--window",
        default=d.window,
        help="ct-abdomen (C40/W400, default), ct-lung (C-600/W1500), ct-brain (C40/W80), "
        "mr (per-volume 0.5-99.5 percentiles), or CENTER,WIDTH",
    )
    p.add_argument("--bits", type=int, default=d.bits, choices=(8, 16), help="PNG bit depth (default 8)")
    p.add_argument(
        "--min-lesion-voxels",
        type=bounded_int(1),
        default=d.min_lesion_voxels,
        help=f"abnormal slice: at least this many label voxels (default {d.min_lesion_voxels})",
    )
    p.add_argument(
        "--normal-margin",
        type=bounded_int(0),
        default=d.normal_margin,
        help=f"normal slices from labelled volumes lie this many slices from any lesion (default {d.normal_margin})",
    )
    p.add_argument(
        "--min-content",
        type=finite_float(0.0, 1.0, max_open=True),
        default=d.min_content,
        help=f"skip slices with less than this fraction of non-background pixels (default {d.min_content})",
    )
    p.add_argument(
        "--max-per-volume",
        type=bounded_int(1),
        default=d.max_per_volume,
        help=f"at most this many slices per class and volume (default {d.max_per_volume})",
    )
    p.add_argument(
        "--valid-fraction",
        type=finite_float(0.0, 1.0, min_open=True, max_open=True),
        default=d.valid_fraction,
        help=f"fraction of PATIENTS in valid/ (the few-shot source; default {d.valid_fraction})",
    )
    p.add_argument(
        "--patient-regex",
        default=None,
        help="regex whose first group is the patient ID in a case name (default: one patient per case)",
    )
    p.add_argument(
        "--volume-index",
        type=bounded_int(0),
        default=None,
        help="volume T of 4-D image files (e.g. a modality)",
    )
    p.add_argument(
        "--seed", type=bounded_int(0, 2**32 - 1), default=d.seed, help="split and sampling seed (default 0)"
    )
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"madclip {__version__}")
    return p


def _main(argv: Sequence[str] | None) -> int:
    a = build_parser().parse_args(argv)
    setup_logging(a.verbose)
    opts = PrepareOptions(
        a.images,
        a.labels,
        a.out,
        a.window,
        a.bits,
        a.min_lesion_voxels,
        a.normal_margin,
        a.min_content,
        a.max_per_volume,
        a.valid_fraction,
        a.patient_regex,
        a.seed,
        a.force,
        a.volume_index,
    )
    opts.check()
    n = len(pair_volumes(a.images, a.labels))
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    ) as progress:
        task = progress.add_task("volumes", total=n)
        manifest = prepare(opts, lambda case: progress.advance(task))
    c = manifest["counts"]
    err_console.print(
        f"madclip-prepare: {a.out}: valid {c['valid/good']} normal + {c['valid/Ungood']} abnormal, test "
        f"{c['test/good']} normal + {c['test/Ungood']} abnormal slices from {n} volume(s) of "
        f"{len(manifest['splits']['valid']) + len(manifest['splits']['test'])} patient(s); window {manifest['window']}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (madclip-prepare)."""
    return run_cli(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
