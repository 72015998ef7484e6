"""madclip-bench: latency, throughput, per-stage times, cold start and memory per backend x precision.

    madclip-bench --bundle bundle/ [--backends ort-cpu,trt] [--precisions fp32,int8] [--batch 8]
                  [--iters 50] [--warmup 5] [--image scan.png] [--json bench.json]

One row per backend x precision (of those requested, default all; precisions default to the bundle's):
    cold start     the backend's load time (session creation, TensorRT engine build/load, OpenVINO compile)
    2nd start      the load time of a second load right after (TensorRT and OpenVINO: from their caches)
    latency        p50 / p95 / mean of model inference at batch 1 over --iters runs after --warmup runs
    end to end     p50 of decode + preprocess + inference + postprocess of one real image file
    stages         median ms of decode, preprocess, inference, postprocess (from the same runs)
    throughput     images/s at --batch (default: the bundle's max batch) over --throughput-iters runs
    peak RSS       resource.getrusage(RUSAGE_SELF).ru_maxrss after the row: the PROCESS peak so far, so it
                   only grows from row to row (run one backend per process to compare them)
    golden err     max |score - reference| on golden.npz (a sanity check that the row computed the right thing)
    map p99 err    99th percentile |anomaly_map - reference| on golden.npz
    flips          golden inputs whose decision (bundle threshold) differs from the FP32 reference's

Combinations that cannot run here (backend not available, precision not in the bundle, int8 on a GPU
backend) are listed as skipped with the reason. The runtime never imports torch: the PyTorch-eager row of the
same measurement lives with the benchmarks (benchmarks/pytorch_eager.py, run by benchmarks/bench_runtime.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from .. import INTENDED_USE
from ..atomic import atomic_write_text
from ..contract import (
    ANOMALY_MAP,
    BACKENDS,
    BF16,
    FP16,
    GOLDEN_INPUT,
    OPENVINO,
    ORT_CPU,
    PRECISIONS,
    SCORE,
    decide,
)
from ..errors import MadclipError
from ..machine import machine_description, peak_rss_mb
from ..safe_text import escape_control
from .common import EXIT_OK, EXIT_USAGE, ArgumentParser, bounded_int, err_console, run_cli, setup_logging

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="madclip-bench",
        description=f"Benchmark a madclip bundle on the available backends ({INTENDED_USE}).",
    )
    p.add_argument("--bundle", required=True, help="bundle directory written by madclip-export")
    p.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"comma-separated subset of {','.join(BACKENDS)} (default: all; unavailable ones are skipped)",
    )
    p.add_argument(
        "--precisions",
        default=None,
        help=f"comma-separated subset of {','.join(PRECISIONS)} (default: the bundle's; bf16 "
        f"runs the fp32 graph on openvino)",
    )
    p.add_argument(
        "--batch",
        type=bounded_int(1, 4096),
        default=None,
        help="batch size for throughput (default: bundle max batch)",
    )
    p.add_argument(
        "--iters", type=bounded_int(1, 1_000_000), default=50, help="timed batch-1 runs per row (default 50)"
    )
    p.add_argument(
        "--warmup", type=bounded_int(0, 1_000_000), default=5, help="untimed batch-1 runs first (default 5)"
    )
    p.add_argument(
        "--throughput-iters",
        type=bounded_int(1, 1_000_000),
        default=None,
        help="timed runs at --batch (default: max(3, iters // 5))",
    )
    p.add_argument(
        "--image",
        default=None,
        help="a real scan file for the decode/preprocess stages "
        "(default: golden input 0 written to a temporary PNG)",
    )
    p.add_argument("--cache-dir", default=None, help="TensorRT engine cache directory")
    p.add_argument("--json", default=None, metavar="FILE", help="write machine description and rows as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _split(text: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise MadclipError(
            f"--{what}: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(allowed)}"
        )
    return list(dict.fromkeys(items))


# --------------------------------------------------------------------------------------------- measuring


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def golden_image_png(golden_image: np.ndarray, spec: Any, directory: str) -> str:
    """Write golden input [3, S, S] as an 8-bit PNG (undoing CLIP normalisation if the spec applies it)."""
    from PIL import Image

    x = np.asarray(golden_image, dtype=np.float32)
    if spec.normalize == "clip":
        x = (
            x * np.asarray(spec.std, np.float32)[:, None, None]
            + np.asarray(spec.mean, np.float32)[:, None, None]
        )
    rgb = np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0)  # [S, S, 3]
    path = os.path.join(directory, "golden0.png")
    Image.fromarray(rgb).save(path)
    return path


def batch_of(images: np.ndarray, batch: int) -> np.ndarray:
    """The golden inputs [N, 3, S, S] repeated/cut to exactly `batch` images, float32 contiguous."""
    reps = -(-batch // len(images))
    return np.ascontiguousarray(np.concatenate([images] * reps)[:batch], dtype=np.float32)  # [batch, 3, S, S]


def throughput(run: Callable[[np.ndarray], Any], batch: np.ndarray, iters: int) -> float:
    run(batch)  # one untimed run at this shape (allocations, TensorRT profile switch)
    t0 = time.perf_counter()
    for _ in range(iters):
        run(batch)
    return len(batch) * iters / (time.perf_counter() - t0)


def row_from_runs(
    stage_runs: list[dict[str, float]], cold_s: float, thr: float, batch: int
) -> dict[str, Any]:
    infer = [t["inference"] for t in stage_runs]
    total = [sum(t.values()) for t in stage_runs]
    return {
        "cold_start_s": round(cold_s, 4),
        "latency_p50_ms": round(_pct(infer, 50), 4),
        "latency_p95_ms": round(_pct(infer, 95), 4),
        "latency_mean_ms": round(statistics.fmean(infer), 4),
        "end_to_end_p50_ms": round(_pct(total, 50), 4),
        "stages_ms": {k: round(statistics.median(t[k] for t in stage_runs), 4) for k in stage_runs[0]},
        "throughput_batch": batch,
        "throughput_ips": round(thr, 3),
    }


def bench_runtime(
    bundle: Any,
    backend: str,
    precision: str,
    image_path: str,
    golden: dict[str, np.ndarray],
    iters: int,
    warmup: int,
    batch: int,
    thr_iters: int,
    cache_dir: str | None,
) -> dict[str, Any]:
    """Measure one backend x precision with the Predictor (the same code path madclip-infer uses)."""
    from ..predictor import load

    with load(bundle, backend=backend, precision=precision, cache_dir=cache_dir) as pred:
        for _ in range(warmup):
            pred.predict(image_path)
        runs = [dict(pred.predict(image_path).timings) for _ in range(iters)]
        thr = throughput(pred.backend.run, batch_of(golden[GOLDEN_INPUT], batch), thr_iters)
        out = pred.backend.run(golden[GOLDEN_INPUT].astype(np.float32))
        row = row_from_runs(runs, pred.load_seconds, thr, batch)
        key, t = pred.score_name, pred.threshold
        flips = (
            None
            if t is None
            else int(sum(decide(float(a), t) != decide(float(b), t) for a, b in zip(out[key], golden[key])))
        )
        row.update(
            provider=pred.provider,
            golden_score_max_abs_err=float(np.max(np.abs(out[SCORE] - golden[SCORE]))),
            golden_map_p99_abs_err=float(np.percentile(np.abs(out[ANOMALY_MAP] - golden[ANOMALY_MAP]), 99)),
            golden_decision_flips=flips,
        )
    with load(bundle, backend=backend, precision=precision, cache_dir=cache_dir) as again:
        row["second_start_s"] = round(again.load_seconds, 4)
    return row


# --------------------------------------------------------------------------------------------- CLI


def _table(rows: list[dict[str, Any]]) -> Table:
    """Measured rows; skipped combinations go in the caption-like list printed after it."""
    t = Table(title="madclip-bench (latency: model only, batch 1; stages: median ms)")
    cols = (
        "backend",
        "precision",
        "provider",
        "cold s",
        "2nd s",
        "p50 ms",
        "p95 ms",
        "e2e ms",
        "decode/prep/infer/post ms",
        "img/s",
        "peak RSS MB",
        "golden err",
        "map p99 err",
        "flips",
    )
    for c in cols:
        t.add_column(c, justify="left" if c in ("backend", "precision", "provider") else "right")
    for r in rows:
        if r["status"] != "ok":
            continue
        st = r["stages_ms"]
        stages = "/".join(f"{st[k]:.2f}" for k in ("decode", "preprocess", "inference", "postprocess"))
        t.add_row(
            r["backend"],
            r["precision"],
            str(r["provider"]).replace("ExecutionProvider", ""),
            f"{r['cold_start_s']:.2f}",
            f"{r['second_start_s']:.2f}",
            f"{r['latency_p50_ms']:.2f}",
            f"{r['latency_p95_ms']:.2f}",
            f"{r['end_to_end_p50_ms']:.2f}",
            stages,
            f"{r['throughput_ips']:.1f} @{r['throughput_batch']}",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['golden_score_max_abs_err']:.1e}",
            f"{r['golden_map_p99_abs_err']:.1e}",
            "-" if r["golden_decision_flips"] is None else str(r["golden_decision_flips"]),
        )
    return t


def _print_report(console: Console, rows: list[dict[str, Any]]) -> None:
    console.print(_table(rows))
    for r in rows:
        if r["status"] != "ok":
            console.print(
                f"skipped {r['backend']} {r['precision']}: {escape_control(r['reason'])}",
                markup=False,
                highlight=False,
            )
        elif r.get("note"):
            console.print(
                f"note {r['backend']} {r['precision']}: {escape_control(r['note'])}",
                markup=False,
                highlight=False,
            )
    console.print(
        "peak RSS is this process's running maximum (ru_maxrss), not per-row memory; " + INTENDED_USE,
        markup=False,
        highlight=False,
    )


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.iters < 1 or args.warmup < 0:
        raise MadclipError(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}")
    from ..bundles.bundle import load_bundle
    from ..bundles.selftest import read_golden
    from ..engines.backends import available_backends
    from ..scans.imageio import read_scans

    bundle = load_bundle(args.bundle, verify=True)
    golden = read_golden(bundle)
    backends = _split(args.backends, BACKENDS, "backends")
    precisions = (
        _split(args.precisions, PRECISIONS, "precisions")
        if args.precisions
        else [
            p
            for p in PRECISIONS
            if p in bundle.precisions or (p == BF16 and OPENVINO in backends and bundle.has_precision(p))
        ]
    )
    batch = args.batch or bundle.max_batch or 8
    if batch < 1 or (bundle.max_batch and batch > bundle.max_batch):
        raise MadclipError(f"--batch must be in 1..{bundle.max_batch or 'inf'} for this bundle, got {batch}")
    thr_iters = args.throughput_iters or max(3, args.iters // 5)
    if args.image:
        read_scans(args.image)  # a bad --image is a one-line error before any measuring
    if args.json:
        json_dir = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(json_dir):
            raise MadclipError(f"{args.json}: directory {json_dir} does not exist")

    available = set(available_backends())
    rows: list[dict[str, Any]] = []
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # files and pipes: do not squeeze the table into 80 columns
    with tempfile.TemporaryDirectory(prefix="madclip-bench-") as tmp:
        image = args.image or golden_image_png(golden[GOLDEN_INPUT][0], bundle.spec, tmp)
        for be in backends:
            for prec in precisions:
                row: dict[str, Any] = {"backend": be, "precision": prec}
                if not bundle.has_precision(prec):
                    rows.append({**row, "status": "skipped", "reason": f"no {prec} model in the bundle"})
                    continue
                if be not in available:
                    rows.append(
                        {**row, "status": "skipped", "reason": "backend not available on this machine"}
                    )
                    continue
                err_console.print(f"measuring {be} {prec} ...", markup=False, highlight=False)
                try:
                    row.update(
                        bench_runtime(
                            bundle,
                            be,
                            prec,
                            image,
                            golden,
                            args.iters,
                            args.warmup,
                            batch,
                            thr_iters,
                            args.cache_dir,
                        )
                    )
                except MadclipError as exc:
                    rows.append({**row, "status": "skipped", "reason": str(exc)})
                    continue
                if be == ORT_CPU and prec == FP16:
                    row["note"] = "FP16 on a CPU is slower than FP32 (no native half arithmetic)"
                rows.append({**row, "status": "ok", "peak_rss_mb": round(peak_rss_mb(), 1)})

    report = {
        "bundle": bundle.path,
        "intended_use": INTENDED_USE,
        "machine": machine_description(),
        "settings": {
            "iters": args.iters,
            "warmup": args.warmup,
            "batch": batch,
            "throughput_iters": thr_iters,
            "image": args.image or "golden input 0 (temporary PNG)",
        },
        "peak_rss_note": "ru_maxrss of this process after each row: a running maximum, not per-row memory",
        "rows": rows,
    }
    _print_report(console, rows)
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2, allow_nan=False) + "\n")
        err_console.print(f"wrote {escape_control(args.json)}", markup=False, highlight=False)
    if not any(r["status"] == "ok" for r in rows):
        err_console.print(
            "error: nothing could be measured (all combinations skipped)",
            style="bold red",
            markup=False,
            highlight=False,
        )
        return EXIT_USAGE
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (madclip-bench)."""
    return run_cli(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
