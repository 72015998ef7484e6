"""madclip-infer: score scans with a bundle, print results, optionally write overlays and maps.

    madclip-infer scans/ --bundle bundle/ [--backend auto] [--precision fp32] [--out results/] [--json]
    madclip-infer --bundle bundle/ --selftest

Exit codes: 0 all inputs scored; 1 some inputs failed (each reported on one stderr line, the others were
processed) or the self-test failed its tolerances; 2 nothing usable (bad bundle, unwritable --out, no
inputs, unavailable backend). Results go to stdout (a table, or one JSON object per scan with --json);
everything else (backend in use, progress, errors) goes to stderr. Research use, not for clinical decisions.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from typing import Any, Iterator, Sequence

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .. import INTENDED_USE, __version__
from ..contract import BACKENDS, FP32, PRECISIONS, SCORE
from ..errors import InputError, MadclipError
from .common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    ArgumentParser,
    bounded_int,
    err_console,
    error_line,
    finite_float,
    run_cli,
    setup_logging,
)
from .results import check_out_dir, expand_each, output_stem, progress_bar, result_table
from .volume import add_volume_args, check_volume_args, map_threshold_choice, run_volumes

log = logging.getLogger(__name__)

BACKEND_CHOICES = ("auto", *BACKENDS)
PRECISION_CHOICES = PRECISIONS


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="madclip-infer",
        description=f"Anomaly score and map for scans with a madclip bundle ({INTENDED_USE}).",
    )
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="scan files (PNG/JPEG/TIFF/BMP, DICOM, NIfTI), directories or glob patterns",
    )
    p.add_argument(
        "--bundle", default=None, help="bundle directory written by madclip-export (required unless --server)"
    )
    p.add_argument(
        "--server",
        default=None,
        metavar="URL",
        help="score on a madclip-serve endpoint instead of a local bundle (same outputs)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKEND_CHOICES,
        help="inference backend (auto: fastest available; the one actually used is printed)",
    )
    p.add_argument(
        "--precision", default=FP32, choices=PRECISION_CHOICES, help="model variant (default fp32)"
    )
    p.add_argument(
        "--threshold",
        type=finite_float(0.0),
        default=None,
        help="decision threshold overriding the bundle's calibrated one (within the score range [0, L])",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="write <stem>.json, <stem>_overlay.png and <stem>_map.png/.npy per scan",
    )
    p.add_argument(
        "--json", action="store_true", help="one JSON object per scan on stdout instead of a table"
    )
    p.add_argument(
        "--map-format",
        default="png16",
        choices=("png16", "npy"),
        help="anomaly map file format with --out (png16: 16-bit on the fixed scale; npy: float32)",
    )
    p.add_argument(
        "--slice",
        type=bounded_int(0),
        default=None,
        metavar="N",
        help="only slice/frame N of DICOM/NIfTI volumes (default: all slices)",
    )
    p.add_argument(
        "-r", "--recursive", action="store_true", help="descend into subdirectories of INPUT folders"
    )
    p.add_argument(
        "--cache-dir", default=None, help="where TensorRT engines are cached (default ~/.cache/madclip)"
    )
    p.add_argument(
        "--trusted-key",
        default=None,
        metavar="PUB",
        help="Ed25519 public key (PEM): refuse bundles not signed by it (see madclip-keygen)",
    )
    p.add_argument(
        "--selftest",
        action="store_true",
        help="verify the bundle and run its golden inputs on this backend/precision first",
    )
    add_volume_args(p)
    from ..dicomnet.web import add_dicomweb_args

    add_dicomweb_args(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"madclip {__version__}")
    return p


def _batches(
    predictor: Any, files: Sequence[str], slice_index: int | None, progress: Progress, failures: list[str]
) -> Iterator[list[tuple[Any, float]]]:
    """Decode files one by one (a bad one -> one error line, skipped) and yield batches of (scan, decode ms)."""
    task = progress.add_task("scoring", total=len(files))
    pending: list[tuple[Any, float]] = []
    for path in files:
        t0 = time.perf_counter()
        try:
            scans = predictor.read(path, slice_index)
        except InputError as exc:
            error_line(str(exc))
            failures.append(path)
            progress.advance(task)
            continue
        except Exception as exc:  # one bad input never stops the others
            log.debug("%s", path, exc_info=True)
            error_line(
                f"{path}: cannot read this input ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
            )
            failures.append(path)
            progress.advance(task)
            continue
        ms = (time.perf_counter() - t0) * 1e3 / max(1, len(scans))
        pending.extend((s, ms) for s in scans)
        while len(pending) >= predictor.max_batch:
            yield pending[: predictor.max_batch]
            pending = pending[predictor.max_batch :]
        progress.advance(task)
    if pending:
        yield pending


def _run_selftest(args: argparse.Namespace, out: Console) -> bool:
    from ..bundles.selftest import failure_line, run_selftest

    res = run_selftest(
        args.bundle, args.backend, args.precision, cache_dir=args.cache_dir, trusted_key=args.trusted_key
    )
    clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in res.items()}
    if args.json:
        print(json.dumps({"selftest": clean}, allow_nan=False), flush=True)
    else:
        table = Table(
            title=f"self-test: {res['backend']} ({res['provider']}) {res['precision']}, {res['n']} golden inputs"
        )
        table.add_column("check")
        table.add_column("error", justify="right")
        table.add_column("tolerance", justify="right")
        tol = res["tolerance"]
        table.add_row("score max |err|", f"{res['score_max_abs_err']:.3g}", f"{tol[SCORE]:g}")
        table.add_row("score_map_max max |err|", f"{res['score_map_max_max_abs_err']:.3g}", f"{tol[SCORE]:g}")
        table.add_row("anomaly_map p99 |err|", f"{res['map_p99_abs_err']:.3g}", f"{tol['map_p99']:g}")
        table.add_row("anomaly_map max |err|", f"{res['map_max_abs_err']:.3g}", "(reported)")
        if res["label_agreement"] is not None:
            agree = f"{res['label_agreement']:.0%} ({res['decision_flips']} flipped)"
            table.add_row("decision agreement", agree, "(reported)")
        table.add_row(
            "export decisions reproduced",
            "yes" if res["decisions_reproduced"] else f"NO ({res['n_changed']} changed)",
            "all",
        )
        out.print(table)
    verdict = "PASSED" if res["passed"] else "FAILED"
    err_console.print(
        f"self-test {verdict}: {res['backend']} {res['precision']} on {res['provider']}",
        style="green" if res["passed"] else "bold red",
        markup=False,
        highlight=False,
    )
    if not res["passed"]:
        error_line(failure_line(res["bundle"], res, res["backend"], res["precision"]))
    return bool(res["passed"])


def _write_image_seg(
    args: argparse.Namespace, bundle: Any, out_dir: str, stem: str, scan: Any, pred: Any
) -> bool:
    """--dicom-seg on the 2-D path: a one-frame SEG for a 2-D DICOM image, written before its other outputs
    (whose JSON comes last); False (one error line) when it cannot be built, and the scan gets no outputs."""
    from ..contract import DICOM_SEG_SUFFIX
    from ..scans.imageio import has_dicom_magic, is_dicom_path

    path = pred.source
    if "#slice=" in path or not (is_dicom_path(path) or has_dicom_magic(path)):
        log.warning("%s: no DICOM SEG: --dicom-seg covers DICOM images and series, not this input", path)
        return True
    from ..atomic import atomic_write_bytes
    from .volume import dicom_image_seg

    try:
        data = dicom_image_seg(args, bundle, path, scan, pred.anomaly_map)
    except (InputError, MadclipError) as exc:
        error_line(str(exc))
        return False
    atomic_write_bytes(os.path.join(out_dir, f"{stem}{DICOM_SEG_SUFFIX}"), data)
    return True


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    out_console = Console(soft_wrap=True)
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise MadclipError(f"--threshold must be a finite number, got {args.threshold}")
    if not args.inputs and not args.selftest and not args.dicomweb:
        raise MadclipError("no INPUT given (scan files, directories or globs), and no --selftest")
    if args.slice is not None and args.slice < 0:
        raise MadclipError(f"--slice must be >= 0, got {args.slice}")
    check_volume_args(args)
    from ..dicomnet.web import dicomweb_requested, run_dicomweb

    if dicomweb_requested(args):
        return run_dicomweb(args, sys.modules[__name__])  # WADO-RS in, STOW-RS out (docs/hospital.md)
    if args.server:
        from ..serve.client import run_remote

        return run_remote(args)
    if not args.bundle:
        raise MadclipError("--bundle is required (or --server URL of a madclip-serve endpoint)")

    from ..bundles.bundle import load_bundle
    from ..predictor import load

    if args.selftest and not _run_selftest(args, out_console):
        return EXIT_FAILED
    if not args.inputs:
        return EXIT_OK

    bundle = load_bundle(args.bundle, verify="model", precision=args.precision, trusted_key=args.trusted_key)
    files, failed = expand_each(args.inputs, args.recursive, [args.out] if args.out else [])
    jobs: list[Any] = []
    if args.slice is None:  # volumes (NIfTI, DICOM series) get one answer each; --slice reads slices as scans
        from ..scans.volume import plan_volumes

        jobs, files, plan_errors = plan_volumes(files, args.series, args.volume_index)
        for message in plan_errors:
            error_line(message)
        failed += len(plan_errors)
    if not files and not jobs:
        return EXIT_USAGE  # every argument was reported on its own line
    out_dir = check_out_dir(args.out) if args.out else None

    predictor = load(
        bundle,
        backend=args.backend,
        precision=args.precision,
        threshold=args.threshold,
        cache_dir=args.cache_dir,
    )
    err_console.print(
        f"madclip-infer: backend {predictor.backend_name} (provider {predictor.provider}), precision "
        f"{predictor.precision}, threshold {predictor.threshold} on {predictor.score_name}, "
        f"max batch {predictor.max_batch}; {len(files)} file(s), {len(jobs)} volume(s); {INTENDED_USE}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    from ..overlay import save_prediction

    failures: list[str] = []
    rows: list[dict[str, Any]] = []
    used_stems: set[str] = set()
    show_progress = not args.json and err_console.is_terminal and (len(files) > 1 or bool(jobs))
    with predictor, progress_bar(show_progress) as progress:
        for batch in _batches(predictor, files, args.slice, progress, failures):
            scans = [s for s, _ in batch]
            preds = predictor.predict_scans(scans, [ms for _, ms in batch])
            for scan, pred in zip(scans, preds):
                record = predictor.record(pred)
                if out_dir is not None:
                    t0 = time.perf_counter()
                    stem = output_stem(pred.source, used_stems)
                    if args.dicom_seg and not _write_image_seg(args, bundle, out_dir, stem, scan, pred):
                        failures.append(pred.source)
                        continue
                    save_prediction(
                        out_dir,
                        stem,
                        scan,
                        pred,
                        record,
                        bundle.map_scale,
                        map_threshold_choice(args, bundle)[0],
                        args.map_format,
                    )
                    log.debug(
                        "%s: wrote %s/%s.* in %.1f ms",
                        pred.source,
                        out_dir,
                        stem,
                        (time.perf_counter() - t0) * 1e3,
                    )
                if args.json:
                    print(json.dumps(record, allow_nan=False), flush=True)
                rows.append(record)
        failed += run_volumes(args, predictor, bundle, jobs, out_dir, used_stems, progress, out_console)
    if not args.json and rows:
        out_console.print(result_table(rows))
    n_failed = failed + len(failures)
    if n_failed:
        err_console.print(
            f"{len(rows)} scan(s) and {len(jobs)} volume(s) processed, {n_failed} input(s) failed",
            style="yellow",
            markup=False,
            highlight=False,
        )
        return EXIT_FAILED
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (madclip-infer)."""
    return run_cli(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
