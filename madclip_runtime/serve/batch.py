"""madclip-batch: score an archive of scans with Ray Data, locally or on a cluster, resumably.

    madclip-batch archive/ -r --bundle bundles/brain16 --out results/ [--actors 4] [--address ray://head:10001]

Pipeline (Ray Data, streaming): the list of files -> read + preprocess in parallel tasks (the runtime's
readers and its one `preprocess`, so results equal `madclip-infer`'s) -> an actor pool of scorers, each
loading and verifying the bundle once (`replica.open_verified`) and running batches of up to the bundle's
max batch -> rows back to the driver. The driver writes one `results/<stem>-<id>.json` per file (every
slice's record; or the error) atomically as soon as all its slices are in, and at the end the summary
table `summary.csv` / `summary.parquet` (one row per slice, bad files as status "error" rows), atomically.

Resuming: a file whose result JSON exists with status "ok" and whose size and mtime are unchanged is
skipped, so an interrupted or extended job re-run with the same --out only scores what is missing; bad
files are tried again. Bad files never stop the job. On a cluster, --out must be a filesystem every node
and the driver see (the driver writes the results; actors write maps when --maps is given).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from .. import INTENDED_USE, __version__
from ..atomic import atomic_save_npy, atomic_write_bytes, atomic_write_text
from ..cli.common import (
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
from ..cli.infer import BACKEND_CHOICES, PRECISION_CHOICES
from ..cli.results import check_out_dir, expand_each, file_stem, progress_bar
from ..contract import ANOMALY_MAP, FP32, INT8, SCORE, SCORE_MAP_MAX
from ..errors import MadclipError
from ..outputs import (
    MAP_NPY,
    MAP_PNG16,
    RECORD_JSON,
    SUMMARY_CSV,
    SUMMARY_PARQUET,
    mark_output_dir,
    output_path,
    slice_number,
)
from . import require_ray
from .replica import ServeConfig

log = logging.getLogger(__name__)

RESULTS_DIR = "results"
MAPS_DIR = "maps"
SUMMARY_COLUMNS = (
    "file",
    "slice",
    "status",
    "error",
    SCORE,
    SCORE_MAP_MAX,
    "label",
    "threshold",
    "score_name",
    "height",
    "width",
    "backend",
    "precision",
)


@dataclass(frozen=True)
class FileItem:
    """One input file and where its result goes."""

    path: str
    key: str  # "<stem>-<sha1 of the absolute path, 10 hex>": unique, stable across runs
    size: int
    mtime_ns: int


def file_item(path: str) -> FileItem:
    absolute = os.path.abspath(path)
    digest = hashlib.sha1(absolute.encode("utf-8")).hexdigest()[:10]
    try:
        st = os.stat(absolute)
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:
        size, mtime = -1, -1
    return FileItem(path, f"{file_stem(path)}-{digest}", size, mtime)


def result_path(out_dir: str, key: str) -> str:
    return os.path.join(out_dir, RESULTS_DIR, f"{key}{RECORD_JSON}")


def load_result(out_dir: str, item: FileItem) -> dict[str, Any] | None:
    """A previous run's result for this file when it is complete, ok and about the same bytes; else None."""
    try:
        with open(result_path(out_dir, item.key), encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    same = doc.get("size") == item.size and doc.get("mtime_ns") == item.mtime_ns
    return doc if doc.get("status") == "ok" and same and doc.get("file") == item.path else None


def read_preprocess(
    batch: dict[str, np.ndarray], spec: dict[str, Any], slice_index: int | None
) -> dict[str, np.ndarray]:
    """Ray Data UDF (parallel tasks): file rows -> one row per slice with the preprocessed image [3, S, S].

    A file that cannot be read becomes one row with its error (and a zero image the scorer skips).
    """
    from ..errors import InputError
    from ..preprocess import PreprocessSpec, preprocess
    from ..scans.imageio import read_scans

    pspec = PreprocessSpec.from_dict(spec)
    s = pspec.image_size
    rows: list[tuple[str, str, str, int, int, int, int, str, np.ndarray]] = []
    for path, key in zip(batch["path"], batch["key"]):
        path, key = str(path), str(key)
        try:
            scans = read_scans(path, slice_index=slice_index, window=pspec.window)
            images = [preprocess(scan, pspec) for scan in scans]  # [3, S, S] each
        except InputError as exc:
            rows.append((path, key, path, -1, 1, 0, 0, str(exc), np.zeros((3, s, s), np.float32)))
            continue
        except Exception as exc:  # a reader bug must not stop the archive either
            rows.append(
                (
                    path,
                    key,
                    path,
                    -1,
                    1,
                    0,
                    0,
                    f"{path}: {type(exc).__name__}: {exc}",
                    np.zeros((3, s, s), np.float32),
                )
            )
            continue
        for i, (scan, image) in enumerate(zip(scans, images)):
            rows.append((path, key, scan.source, i, len(scans), scan.height, scan.width, "", image))
    cols = list(zip(*rows)) if rows else [[] for _ in range(9)]
    return {
        "path": np.array(cols[0], dtype=object),
        "key": np.array(cols[1], dtype=object),
        "source": np.array(cols[2], dtype=object),
        "index": np.array(cols[3], np.int64),
        "n_slices": np.array(cols[4], np.int64),
        "height": np.array(cols[5], np.int64),
        "width": np.array(cols[6], np.int64),
        "error": np.array(cols[7], dtype=object),
        "image": np.stack(cols[8]) if rows else np.zeros((0, 3, s, s), np.float32),  # [B, 3, S, S]
    }


class Scorer:
    """Ray Data UDF (actor pool): preprocessed rows -> scores. One verified bundle load per actor; the model
    runs through `Predictor.run_images`, the runtime's one model call."""

    def __init__(self, cfg: ServeConfig, maps_dir: str | None, map_format: str):
        from .replica import open_verified

        self.predictor, _ = open_verified(cfg)
        self.maps_dir, self.map_format = maps_dir, map_format

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..preprocess import resize_map

        p = self.predictor
        n = len(batch["path"])
        score = np.full(n, np.nan)
        smax = np.full(n, np.nan)
        label = np.array([""] * n, dtype=object)
        error = np.array([str(e) for e in batch["error"]], dtype=object)
        ok = np.flatnonzero(error == "")
        for start in range(0, len(ok), p.max_batch):
            idx = ok[start : start + p.max_batch]
            try:
                out = p.run_images(batch["image"][idx])
            except Exception as exc:  # a failed model call fails these rows, not the job
                error[idx] = f"{batch['path'][idx[0]]}: {type(exc).__name__}: {exc}"
                continue
            for j, row in enumerate(idx):
                score[row], smax[row] = float(out[SCORE][j]), float(out[SCORE_MAP_MAX][j])
                label[row] = p.decision(score[row], smax[row]) or ""
                if self.maps_dir:
                    try:
                        amap = resize_map(
                            out[ANOMALY_MAP][j, 0], int(batch["height"][row]), int(batch["width"][row])
                        )
                        self.save_map(str(batch["key"][row]), int(batch["index"][row]), amap)
                    except Exception as exc:  # e.g. disk full: this row's error, not the job's
                        error[row] = (
                            f"{batch['path'][row]}: writing its map failed: {type(exc).__name__}: {exc}"
                        )
        return {k: batch[k] for k in ("path", "key", "source", "index", "n_slices", "height", "width")} | {
            "error": error,
            SCORE: score,
            SCORE_MAP_MAX: smax,
            "label": label,
        }

    def save_map(self, key: str, index: int, amap: np.ndarray) -> str:
        """maps/<key>_sNNN_map.npy (float32) or _map.png (16-bit on the bundle's fixed scale), atomically."""
        stem = f"{key}_s{index:03d}"
        if self.map_format == "npy":
            path = output_path(self.maps_dir, stem, MAP_NPY)
            atomic_save_npy(path, amap)
        else:
            from PIL import Image

            from ..atomic import atomic_save_png
            from ..overlay import map_to_uint16

            path = output_path(self.maps_dir, stem, MAP_PNG16)
            atomic_save_png(path, Image.fromarray(map_to_uint16(amap, self.predictor.bundle.map_scale)))
        return path


def _slice_record(
    row: dict[str, Any], threshold: float | None, score_name: str, backend: str, precision: str
) -> dict[str, Any]:
    err = str(row["error"])
    fin = lambda x: None if x is None or not np.isfinite(x) else float(x)  # noqa: E731
    return {
        "file": str(row["path"]),
        "slice": slice_number(str(row["source"])),
        "status": "error" if err else "ok",
        "error": err,
        SCORE: fin(row[SCORE]),
        SCORE_MAP_MAX: fin(row[SCORE_MAP_MAX]),
        "label": str(row["label"]) or None,
        "threshold": threshold,
        "score_name": score_name,
        "height": int(row["height"]),
        "width": int(row["width"]),
        "backend": backend,
        "precision": precision,
    }


def write_file_result(out_dir: str, item: FileItem, slices: list[dict[str, Any]]) -> dict[str, Any]:
    """Atomically write results/<key>.json: all slices of one file (slice order), or its error."""
    slices = sorted(slices, key=lambda r: r.get("_index", 0))
    for r in slices:
        r.pop("_index", None)
    errors = [r["error"] for r in slices if r["status"] == "error"]
    doc = {
        "file": item.path,
        "key": item.key,
        "size": item.size,
        "mtime_ns": item.mtime_ns,
        "status": "error" if errors else "ok",
        "error": errors[0] if errors else "",
        "slices": slices,
        "intended_use": INTENDED_USE,
    }
    path = output_path(os.path.join(out_dir, RESULTS_DIR), item.key, RECORD_JSON)
    atomic_write_text(path, json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return doc


def write_summary(out_dir: str, docs: Iterable[dict[str, Any]], formats: Sequence[str]) -> list[str]:
    """summary.csv and/or summary.parquet: one row per slice (bad files: one "error" row), atomically."""
    rows = [{c: s.get(c) for c in SUMMARY_COLUMNS} for d in docs for s in d["slices"]]
    for r in rows:  # results of older runs held the slice's source text: a number (or nothing) now
        if r["slice"] is not None and not isinstance(r["slice"], int):
            r["slice"] = slice_number(str(r["slice"]))
    written = []
    if "csv" in formats:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        path = output_path(out_dir, "", SUMMARY_CSV)
        atomic_write_text(path, buf.getvalue())
        written.append(path)
    if "parquet" in formats:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(
            rows,
            schema=pa.schema(
                [
                    ("file", pa.string()),
                    ("slice", pa.int64()),
                    ("status", pa.string()),
                    ("error", pa.string()),
                    (SCORE, pa.float64()),
                    (SCORE_MAP_MAX, pa.float64()),
                    ("label", pa.string()),
                    ("threshold", pa.float64()),
                    ("score_name", pa.string()),
                    ("height", pa.int64()),
                    ("width", pa.int64()),
                    ("backend", pa.string()),
                    ("precision", pa.string()),
                ]
            ),
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        path = output_path(out_dir, "", SUMMARY_PARQUET)
        atomic_write_bytes(path, sink.getvalue().to_pybytes())
        written.append(path)
    return written


def run_batch(
    files: Sequence[str],
    cfg: ServeConfig,
    out_dir: str,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    slice_index: int | None = None,
    maps: str | None = None,
    summary: Sequence[str] = ("csv", "parquet"),
    progress: Any = None,
    read_cpus: float = 0.5,
) -> dict[str, Any]:
    """Score `files` into `out_dir` on the Ray instance already initialised. Returns counts and the docs."""
    require_ray("data")
    import ray.data

    from ..bundles.bundle import load_bundle

    bundle = load_bundle(cfg.bundle, verify="none")
    threshold = cfg.threshold if cfg.threshold is not None else bundle.threshold
    maps_dir = os.path.join(out_dir, MAPS_DIR) if maps else None
    for d in (out_dir, os.path.join(out_dir, RESULTS_DIR), maps_dir):  # marked: never read back as inputs
        if d:
            os.makedirs(d, exist_ok=True)
            mark_output_dir(d)
    actors = fit_actors(actors, cpus_per_actor, gpus_per_actor, read_cpus, ray.cluster_resources())
    items = [file_item(f) for f in files]
    docs: dict[str, dict[str, Any]] = {}
    todo = []
    for item in items:
        prev = load_result(out_dir, item)
        if prev is not None:
            docs[item.key] = prev
        else:
            todo.append(item)
    skipped = len(items) - len(todo)
    task = progress.add_task("scoring", total=len(todo)) if progress is not None else None
    backend_name, precision = cfg.backend, cfg.precision
    if todo:
        ray.data.DataContext.get_current().enable_progress_bars = False
        max_batch = int(bundle.max_batch or 8)
        ds = ray.data.from_items([{"path": it.path, "key": it.key} for it in todo])
        ds = ds.map_batches(
            read_preprocess,
            fn_args=(bundle.spec.to_dict(), slice_index),
            batch_size=max_batch,
            num_cpus=read_cpus,
        )
        ds = ds.map_batches(
            Scorer,
            fn_constructor_args=(cfg, maps_dir, maps or "npy"),
            batch_size=max_batch,
            compute=ray.data.ActorPoolStrategy(size=max(1, actors)),
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor or None,
        )
        by_key = {it.key: it for it in todo}
        pending: dict[str, list[dict[str, Any]]] = {}
        if backend_name == "auto":
            from ..engines.backends import resolve_auto

            backend_name = resolve_auto(precision, INT8 in bundle.openvino_models)
        for row in ds.iter_rows():
            key = str(row["key"])
            rec = _slice_record(row, threshold, bundle.score_name, backend_name, precision)
            rec["_index"] = int(row["index"])
            pending.setdefault(key, []).append(rec)
            if len(pending[key]) == int(row["n_slices"]):
                docs[key] = write_file_result(out_dir, by_key[key], pending.pop(key))
                if docs[key]["status"] == "error":
                    error_line(docs[key]["error"])
                if task is not None:
                    progress.advance(task)
    ordered = [docs[it.key] for it in items if it.key in docs]
    written = write_summary(out_dir, ordered, summary)
    n_err = sum(d["status"] == "error" for d in ordered)
    return {
        "files": len(items),
        "skipped": skipped,
        "scored": len(todo) - n_err,
        "failed": n_err,
        "slices": sum(len(d["slices"]) for d in ordered),
        "summary": written,
        "docs": ordered,
    }


def fit_actors(
    actors: int, cpus_per_actor: float, gpus_per_actor: float, read_cpus: float, resources: dict[str, float]
) -> int:
    """The number of scoring actors the cluster can hold (`resources`: `ray.cluster_resources()`).

    A fixed actor pool larger than the cluster's CPUs (or GPUs) never starts and the job makes no progress,
    so a larger --actors is clamped, with a message; when not even one actor fits beside the reading tasks the
    job is refused with one line.
    """
    cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    fit = actors
    if cpus_per_actor > 0:
        if cpus_per_actor + read_cpus > cpus + 1e-9:
            raise MadclipError(
                f"--cpus-per-actor {cpus_per_actor:g} plus {read_cpus:g} CPU for reading need "
                f"more than the {cpus:g} CPU(s) of the Ray cluster"
            )
        fit = min(fit, int((cpus - read_cpus) // cpus_per_actor + 1e-9))
    if gpus_per_actor > 0:
        if gpus_per_actor > gpus + 1e-9:
            raise MadclipError(
                f"--gpus-per-actor {gpus_per_actor:g} needs more than the {gpus:g} GPU(s) of the Ray cluster"
            )
        fit = min(fit, int(gpus // gpus_per_actor + 1e-9))
    fit = max(1, fit)
    if fit < actors:
        err_console.print(
            f"madclip-batch: --actors {actors} does not fit the {cpus:g} CPU(s)"
            f"{f' and {gpus:g} GPU(s)' if gpus_per_actor else ''} of the Ray cluster "
            f"({cpus_per_actor:g} CPU per actor, {read_cpus:g} for reading): using {fit}",
            style="yellow",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    return fit


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="madclip-batch", description=f"Score an archive of scans with Ray Data ({INTENDED_USE})."
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="scan files, directories or glob patterns")
    p.add_argument("--bundle", required=True, help="bundle directory (readable on every Ray node)")
    p.add_argument(
        "--out", required=True, metavar="DIR", help="results/, summary.csv/.parquet (and maps/) go here"
    )
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES)
    p.add_argument("--precision", default=FP32, choices=PRECISION_CHOICES)
    p.add_argument(
        "--threshold",
        type=finite_float(0),
        default=None,
        help="decision threshold overriding the bundle's (within its score range)",
    )
    p.add_argument(
        "--trusted-key",
        default=None,
        metavar="PUB",
        help="Ed25519 public key (PEM): refuse a bundle not signed by it (checked before Ray "
        "starts and by every scoring actor)",
    )
    p.add_argument(
        "--actors",
        type=bounded_int(1),
        default=1,
        help="scoring actors, each loading the bundle once (default 1; clamped to the cluster's CPUs)",
    )
    p.add_argument("--cpus-per-actor", type=finite_float(0), default=1.0)
    p.add_argument("--gpus-per-actor", type=finite_float(0), default=0.0)
    p.add_argument(
        "--maps", default=None, choices=("png16", "npy"), help="also write each slice's anomaly map"
    )
    p.add_argument("--summary", default="both", choices=("csv", "parquet", "both"))
    p.add_argument("--slice", type=bounded_int(0), default=None, metavar="N", help="only slice N of volumes")
    p.add_argument("-r", "--recursive", action="store_true", help="descend into subdirectories")
    p.add_argument("--address", default=None, help="Ray cluster (auto, ray://head:10001); default: local Ray")
    p.add_argument(
        "--ray-num-cpus", type=bounded_int(1), default=None, help="CPUs of the local Ray (default: all)"
    )
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action="version", version=f"madclip {__version__}")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from ..bundles.bundle import load_bundle
    from ..predictor import check_threshold
    from .options import read_trusted_key

    trusted_key = read_trusted_key(args.trusted_key)
    bundle = load_bundle(
        args.bundle, verify="model", precision=args.precision, trusted_key=trusted_key
    )  # bad or untrusted bundle: one line, exit 2, before Ray
    check_threshold(args.threshold, bundle)
    files, failed = expand_each(args.inputs, args.recursive, [args.out])  # never its own outputs
    if not files:
        return EXIT_USAGE
    out_dir = check_out_dir(args.out)
    cfg = ServeConfig(
        bundle=bundle.path,
        backend=args.backend,
        precision=args.precision,
        threshold=args.threshold,
        trusted_key=trusted_key,
    )
    require_ray("data")
    from .cli import start_ray

    ray = start_ray(args.address, args.ray_num_cpus)
    summary = ("csv", "parquet") if args.summary == "both" else (args.summary,)
    try:
        show = err_console.is_terminal and len(files) > 1
        with progress_bar(show) as progress:
            res = run_batch(
                files,
                cfg,
                out_dir,
                args.actors,
                args.cpus_per_actor,
                args.gpus_per_actor,
                args.slice,
                args.maps,
                summary,
                progress,
            )
    except Exception as exc:
        if isinstance(exc, MadclipError):
            raise
        from .cli import deployment_error

        raise MadclipError(f"madclip-batch failed: {deployment_error(exc)}") from None
    finally:
        ray.shutdown()
    err_console.print(
        f"madclip-batch: {res['files']} file(s): {res['scored']} scored, {res['skipped']} already "
        f"done (skipped), {res['failed']} failed; {res['slices']} slice(s) in "
        f"{', '.join(res['summary'])}; {INTENDED_USE}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return EXIT_FAILED if (res["failed"] or failed) else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (madclip-batch)."""
    return run_cli(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
