"""CPU engines side by side: PyTorch eager FP32 and BF16 autocast, onnxruntime FP32 and dynamic INT8, OpenVINO
FP32, BF16 and NNCF INT8, on each method's reference backbone (random weights, open_clip pretrained=None).

    python benchmarks/bench_cpu.py                                  # madclip, mvfa, mediclip; 3 rounds
    python benchmarks/bench_cpu.py --methods madclip --rounds 3 --threads 2
    python benchmarks/bench_cpu.py --flips-only                     # the decision-flip study only (tiny)

How it measures:
- Per method, the exported graph (`export_onnx`, with the OpenVINO MatMul rewrite), the dynamic INT8 ONNX
  (`quantize_int8`) and the NNCF INT8 IR (`quantize_openvino_int8`, 8 calibration images) are made once
  into benchmarks/work/cpu/<method>/ and reused.
- Every engine lives in its own worker process (this script with --worker), so its cold start (imports, load
  or compile, first inference; OpenVINO with an empty CACHE_DIR) and its peak RSS are its own. The two
  PyTorch rows share one worker (the same module, autocast on or off), so they share a peak RSS figure.
- Timing is interleaved: in each round, every engine in turn runs batch 1 and then batch 8 (ratios taken
  within a round survive the load of other processes on a shared machine); medians over rounds.
- Accuracy: every engine's batch-8 outputs against onnxruntime FP32 (relative L2 of the map, max |score|).
- OpenVINO's cached start: the OpenVINO workers are started a second time on the same CACHE_DIR.
- Decision flips vs FP32 (--flips): the methods' tiny config (madclip-tiny, random weights) on the real
  scans of /work/shared/data/realscans and their mirror images (>= 100 images), threshold at the median
  FP32 score (the densest place to flip), every engine in process; also INT8 without NNCF's ignored
  scope, to measure what keeping the FP32 tail buys.

Writes benchmarks/results/cpu_engines.json and prints tables.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
WORK = Path(os.environ.get("MADCLIP_BENCH_WORK", HERE / "work")) / "cpu"
RESULTS = Path(os.environ.get("MADCLIP_BENCH_RESULTS", HERE / "results"))
REALSCANS = Path(os.environ.get("MADCLIP_REALSCANS", HERE.parents[1] / "shared" / "data" / "realscans"))
if not REALSCANS.exists():
    REALSCANS = Path("/work/shared/data/realscans")

METHODS = {"madclip": ("ViT-L-14-336", 240), "mvfa": ("ViT-L-14-336", 240), "mediclip": ("ViT-L-14", 224)}
ENGINES = ("torch-fp32", "torch-bf16", "ort-fp32", "ort-int8", "ov-fp32", "ov-bf16", "ov-int8")
WORKERS = {
    "torch": ("torch-fp32", "torch-bf16"),
    "ort-fp32": ("ort-fp32",),
    "ort-int8": ("ort-int8",),
    "ov-fp32": ("ov-fp32",),
    "ov-bf16": ("ov-bf16",),
    "ov-int8": ("ov-int8",),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- models ------------------------------------------------------------------------------------------------


def build_model(method: str, backbone: str, size: int):
    """The method's model with random backbone weights (deterministic: init_seed 0, seed 0)."""
    import torch

    from madclip_train.methods.registry import get_method
    from madclip_train.run import TrainRequest, resolve_configs

    req = TrainRequest(data="", out="", method=method, backbone=backbone, pretrained="none", image_size=size)
    cfg, _ = resolve_configs(req, "Brain")
    model = get_method(method).build(cfg, seed=0)
    if method == "mvfa":  # its graph needs the memory bank of normal shots
        model.finalize(_Shots(images(4, size, cfg.preprocess, offset=40), torch.tensor([0, 0, 0, 1])), "cpu")
    return model.eval()


class _Shots:
    def __init__(self, imgs, labels):
        import torch

        self.images, self.labels = torch.from_numpy(imgs), labels
        self.groups = torch.arange(len(labels))
        self.masks = torch.zeros(len(labels), imgs.shape[-1], imgs.shape[-1], dtype=torch.bool)

    def __len__(self):
        return len(self.labels)


def scan_paths() -> list[Path]:
    return sorted(p for p in REALSCANS.rglob("*.png") if p.is_file())


def images(n: int, size: int, spec=None, offset: int = 0, mirror: bool = False) -> np.ndarray:
    """n preprocessed real scans (cycled; with `mirror`, the mirror images follow the originals)."""
    from madclip_runtime.preprocess import PreprocessSpec, preprocess
    from madclip_runtime.scans.imageio import read_scans

    spec = spec or PreprocessSpec(image_size=size)
    paths = scan_paths()
    base = [preprocess(read_scans(p)[0], spec) for p in paths]
    pool = base + ([x[:, :, ::-1].copy() for x in base] if mirror else [])
    return np.stack([pool[(offset + i) % len(pool)] for i in range(n)]).astype(np.float32)


def prepare(method: str, backbone: str, size: int, out: Path) -> dict:
    """model.onnx, model_int8.onnx and model_int8_ov.xml for one method (made once, reused)."""
    from madclip_export.export import export_onnx
    from madclip_export.int8 import quantize_int8
    from madclip_export.openvino import quantize_openvino_int8

    out.mkdir(parents=True, exist_ok=True)
    info_path = out / "prepare.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    model = build_model(method, backbone, size)
    spec = model.cfg.preprocess
    t0 = time.perf_counter()
    export_onnx(model, out / "model.onnx", 8, 18)
    info = {
        "export_s": time.perf_counter() - t0,
        "islands": list(model.fp32_island_constants),
        "spec": spec.to_dict(),
    }
    t0 = time.perf_counter()
    quantize_int8(out / "model.onnx", out / "model_int8.onnx", tuple(model.fp32_island_constants))
    info["ort_int8_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    info["nncf"] = quantize_openvino_int8(
        out / "model.onnx",
        out / "model_int8_ov.xml",
        images(8, size, spec, offset=20),
        model.fp32_island_constants,
    )
    info["nncf_s"] = time.perf_counter() - t0
    info_path.write_text(json.dumps(info))
    return info


# ---- workers -----------------------------------------------------------------------------------------------


class Engine:
    """One engine of a worker: `run(x)` -> outputs dict."""

    def __init__(
        self,
        kind: str,
        directory: Path,
        method: str,
        backbone: str,
        size: int,
        threads: int,
        cache: Path | None,
    ):
        self.kind = kind
        if kind.startswith("torch"):
            import torch

            torch.set_num_threads(threads)
            self.torch = torch
            self.module = build_model(method, backbone, size).export_module().eval()
        elif kind.startswith("ort"):
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            name = "model_int8.onnx" if kind == "ort-int8" else "model.onnx"
            self.session = ort.InferenceSession(str(directory / name), so, providers=["CPUExecutionProvider"])
        else:
            from madclip_runtime.engines import openvino_engine

            precision = kind.split("-")[1]
            path = directory / ("model_int8_ov.xml" if precision == "int8" else "model.onnx")
            self.runner, _ = openvino_engine.compile_model(path, precision, cache, threads=threads)

    def run(self, x: np.ndarray, bf16: bool = False) -> dict[str, np.ndarray]:
        if self.kind.startswith("torch"):
            torch = self.torch
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                res = self.module(torch.from_numpy(x))
            return _named(res)
        if self.kind.startswith("ort"):
            names = [o.name for o in self.session.get_outputs()]
            return dict(zip(names, self.session.run(names, {"image": x})))
        return self.runner.run(x)


def _named(res) -> dict[str, np.ndarray]:
    """The export module's outputs (a tuple in contract order, or a dict) as float32 arrays by name."""
    from madclip_runtime.contract import OUTPUT_NAMES

    items = res.items() if isinstance(res, dict) else zip(OUTPUT_NAMES, res)
    return {k: v.float().numpy() for k, v in items}


def worker(args) -> None:
    """Serve one engine (or the two PyTorch rows) on stdin/stdout JSON lines."""
    start = time.perf_counter()
    directory, size = Path(args.dir), args.size
    cache = Path(args.cache) if args.cache else None
    engine = Engine(args.worker, directory, args.method, args.backbone, size, args.threads, cache)
    load_s = time.perf_counter() - start
    x8 = images(8, size, _spec(directory), offset=0)
    rows = WORKERS[args.worker]
    first = {}
    for row in rows:
        t0 = time.perf_counter()
        engine.run(x8[:1], bf16=row.endswith("bf16"))
        first[row] = time.perf_counter() - t0
    print(json.dumps({"ready": True, "load_s": load_s, "first_run_s": first}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        bf16 = cmd["row"].endswith("bf16")
        if cmd["op"] == "time":
            x = x8[: cmd["batch"]]
            t0 = time.perf_counter()
            engine.run(x, bf16=bf16)
            print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
        elif cmd["op"] == "outputs":
            out = engine.run(x8, bf16=bf16)
            np.savez(cmd["path"], **out)
            print(json.dumps({"saved": cmd["path"]}), flush=True)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)


def peak_rss_mb() -> float:
    """This process's peak RSS since its exec (VmHWM; ru_maxrss would carry the parent's over exec)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _spec(directory: Path):
    from madclip_runtime.preprocess import PreprocessSpec

    return PreprocessSpec.from_dict(json.loads((directory / "prepare.json").read_text())["spec"])


class Worker:
    def __init__(
        self,
        name: str,
        method: str,
        backbone: str,
        size: int,
        directory: Path,
        threads: int,
        cache: Path | None,
    ):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--method",
            method,
            "--backbone",
            backbone,
            "--size",
            str(size),
            "--dir",
            str(directory),
            "--threads",
            str(threads),
        ]
        if cache is not None:
            cmd += ["--cache", str(cache)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.name = name
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ready(self) -> dict:
        msg = self._read()
        msg["wall_to_ready_s"] = time.perf_counter() - self.t0  # process start .. first inference done
        return msg

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.name} died (exit {self.proc.wait()})")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def quit(self) -> float:
        peak = self.ask(op="quit")["peak_rss_mb"]
        self.proc.wait()
        return peak


# ---- the side-by-side run ----------------------------------------------------------------------------------


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-30))


def bench_method(method: str, rounds: int, threads: int, backbone: str | None = None) -> dict:
    import shutil

    ref_backbone, size = METHODS[method]
    backbone = backbone or ref_backbone
    directory = WORK / f"{method}-{backbone}"
    log(f"{method}: preparing {backbone}@{size} (export, ORT INT8, NNCF INT8)")
    if not (directory / "prepare.json").is_file():  # in its own process: the parent stays small
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--prepare",
                "--method",
                method,
                "--backbone",
                backbone,
                "--size",
                str(size),
                "--dir",
                str(directory),
            ],
            check=True,
        )
    prep = json.loads((directory / "prepare.json").read_text())
    cache = directory / "ov_cache"
    shutil.rmtree(cache, ignore_errors=True)
    result: dict = {
        "method": method,
        "backbone": backbone,
        "image_size": size,
        "prepare": prep,
        "rounds": rounds,
        "threads": threads,
        "engines": {},
    }
    workers, cold = {}, {}
    for name in WORKERS:  # started one after another, so cold starts do not overlap
        log(f"{method}: starting {name}")
        w = Worker(
            name, method, backbone, size, directory, threads, cache / name if name.startswith("ov") else None
        )
        cold[name] = w.ready()
        workers[name] = w
    times: dict[str, dict[int, list[float]]] = {row: {1: [], 8: []} for row in ENGINES}
    for r in range(rounds):
        for row in ENGINES:
            name = next(n for n, rows in WORKERS.items() if row in rows)
            for batch in (1, 8):
                times[row][batch].append(workers[name].ask(op="time", row=row, batch=batch)["seconds"])
        log(
            f"{method}: round {r + 1}/{rounds}: "
            + ", ".join(f"{row} {times[row][1][-1]:.2f}s" for row in ENGINES)
        )
    outputs = {}
    for row in ENGINES:
        name = next(n for n, rows in WORKERS.items() if row in rows)
        path = directory / f"out_{row}.npz"
        workers[name].ask(op="outputs", row=row, path=str(path))
        with np.load(path) as z:
            outputs[row] = {k: z[k] for k in z.files}
    peaks = {name: w.quit() for name, w in workers.items()}
    cached = {}
    for name in WORKERS:
        if name.startswith("ov"):
            w = Worker(name, method, backbone, size, directory, threads, cache / name)
            cached[name] = w.ready()
            w.quit()
    ref = outputs["ort-fp32"]
    base = {b: statistics.median(times["torch-fp32"][b]) for b in (1, 8)}
    for row in ENGINES:
        name = next(n for n, rows in WORKERS.items() if row in rows)
        b1, b8 = statistics.median(times[row][1]), statistics.median(times[row][8])
        # per-round ratio against PyTorch FP32 of the same round, then the median (shared-machine safe)
        ratio1 = statistics.median(t / s for t, s in zip(times["torch-fp32"][1], times[row][1]))
        ratio8 = statistics.median(t / s for t, s in zip(times["torch-fp32"][8], times[row][8]))
        result["engines"][row] = {
            "batch1_ms": b1 * 1e3,
            "batch8_images_per_s": 8 / b8,
            "speedup_batch1_vs_torch_fp32": ratio1,
            "speedup_batch8_vs_torch_fp32": ratio8,
            "rounds_batch1_s": times[row][1],
            "rounds_batch8_s": times[row][8],
            "cold_start_s": cold[name]["wall_to_ready_s"],
            "load_s": cold[name]["load_s"],
            "cached_start_s": cached[name]["wall_to_ready_s"] if name in cached else None,
            "peak_rss_mb": peaks[name],
            "peak_rss_shared_with": [r for r in WORKERS[name] if r != row],
            "map_rel_l2_vs_ort_fp32": rel_l2(outputs[row]["anomaly_map"], ref["anomaly_map"]),
            "score_max_abs_vs_ort_fp32": float(np.abs(outputs[row]["score"] - ref["score"]).max()),
        }
    result["torch_fp32_batch1_ms"], result["torch_fp32_batch8_s"] = base[1] * 1e3, base[8]
    return result


# ---- decision flips on >= 100 images (tiny config) ---------------------------------------------------------


def flips(method: str, n_min: int = 100) -> dict:
    """Decision flips and map error of every engine vs onnxruntime FP32 (tiny config; scans and mirrors)."""
    import tempfile

    from madclip_export.export import export_onnx
    from madclip_export.int8 import quantize_int8
    from madclip_export.openvino import quantize_openvino_int8

    size = METHODS[method][1]
    model = build_model(method, "madclip-tiny", size)
    module = build_model(method, "madclip-tiny", size).export_module().eval()  # export consumes `model`
    spec = model.cfg.preprocess
    n = max(n_min, 2 * len(scan_paths()))
    x = images(n, size, spec, mirror=True)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        export_onnx(model, d / "model.onnx", 8, 18)
        quantize_int8(d / "model.onnx", d / "model_int8.onnx", tuple(model.fp32_island_constants))
        calib = images(8, size, spec, offset=20)
        quantize_openvino_int8(d / "model.onnx", d / "model_int8_ov.xml", calib, model.fp32_island_constants)
        quantize_openvino_int8(
            d / "model.onnx",
            d / "model_int8_ov_notail.xml",
            calib,
            model.fp32_island_constants,
            keep_tail_fp32=False,
        )
        out = {}
        import torch

        for kind in ("torch-fp32", "torch-bf16"):
            with (
                torch.inference_mode(),
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind.endswith("bf16")),
            ):
                parts = [_named(module(torch.from_numpy(x[i : i + 8]))) for i in range(0, n, 8)]
            out[kind] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        for kind in ("ort-fp32", "ort-int8", "ov-fp32", "ov-bf16", "ov-int8", "ov-int8-no-fp32-tail"):
            e = _tiny_engine(kind, d)
            parts = [e.run(x[i : i + 8]) for i in range(0, n, 8)]
            out[kind] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    ref = out["ort-fp32"]
    result = {
        "method": method,
        "config": "madclip-tiny (random weights)",
        "image_size": size,
        "n_images": n,
        "images": f"{len(scan_paths())} real slices of {REALSCANS.name} and their mirror images",
        "engines": {},
    }
    for score_name in ("score", "score_map_max"):
        t = float(np.median(ref[score_name]))
        result[f"threshold_{score_name}"] = t
        ref_s = ref[score_name].astype(np.float64)
        result[f"reference_{score_name}_std"] = float(ref_s.std())
        result[f"reference_{score_name}_within_1e-3_of_threshold"] = int((np.abs(ref_s - t) <= 1e-3).sum())
        for kind, o in out.items():
            flipped = int(((o[score_name] >= t) != (ref[score_name] >= t)).sum())
            e = result["engines"].setdefault(kind, {})
            e[f"flips_{score_name}"] = flipped
            e[f"{score_name}_median_shift"] = float(np.median(o[score_name].astype(np.float64) - ref_s))
            e["map_max_abs"] = float(np.abs(o["anomaly_map"] - ref["anomaly_map"]).max())
            e["map_p99_abs"] = float(np.percentile(np.abs(o["anomaly_map"] - ref["anomaly_map"]), 99))
            e["map_rel_l2"] = rel_l2(o["anomaly_map"], ref["anomaly_map"])
            e["score_max_abs"] = float(np.abs(o["score"] - ref["score"]).max())
    return result


def _tiny_engine(kind: str, d: Path):
    from madclip_runtime.engines import openvino_engine

    if kind.startswith("ort"):
        import onnxruntime as ort

        s = ort.InferenceSession(
            str(d / ("model_int8.onnx" if kind == "ort-int8" else "model.onnx")),
            providers=["CPUExecutionProvider"],
        )
        names = [o.name for o in s.get_outputs()]

        class _S:
            def run(self, x):
                return dict(zip(names, s.run(names, {"image": x})))

        return _S()
    precision = kind.split("-")[1]
    name = {"ov-int8": "model_int8_ov.xml", "ov-int8-no-fp32-tail": "model_int8_ov_notail.xml"}.get(
        kind, "model.onnx"
    )
    return openvino_engine.compile_model(d / name, precision, None)[0]


# ---- report ------------------------------------------------------------------------------------------------


def print_tables(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    for m in res.get("methods", []):
        t = Table(
            title=f"{m['method']}: {m['backbone']}@{m['image_size']}, random weights, "
            f"{m['threads']} threads, {m['rounds']} interleaved rounds (medians)"
        )
        for col in (
            "engine",
            "batch 1 ms",
            "x torch fp32",
            "batch 8 img/s",
            "x torch fp32 (b8)",
            "cold start s",
            "cached start s",
            "peak RSS MB",
            "map rel L2",
            "score max |err|",
        ):
            t.add_column(col, justify="right")
        for row, e in m["engines"].items():
            t.add_row(
                row,
                f"{e['batch1_ms']:.0f}",
                f"{e['speedup_batch1_vs_torch_fp32']:.2f}",
                f"{e['batch8_images_per_s']:.2f}",
                f"{e['speedup_batch8_vs_torch_fp32']:.2f}",
                f"{e['cold_start_s']:.1f}",
                "-" if e["cached_start_s"] is None else f"{e['cached_start_s']:.1f}",
                f"{e['peak_rss_mb']:.0f}",
                f"{e['map_rel_l2_vs_ort_fp32']:.2e}",
                f"{e['score_max_abs_vs_ort_fp32']:.2e}",
            )
        console.print(t)
    for f in res.get("flips", []):
        t = Table(
            title=f"{f['method']}: decision flips vs ORT FP32 on {f['n_images']} images ({f['config']})"
        )
        for col in (
            "engine",
            "flips (score)",
            "flips (score_map_max)",
            "map max |err|",
            "map p99 |err|",
            "map rel L2",
        ):
            t.add_column(col, justify="right")
        for row, e in f["engines"].items():
            t.add_row(
                row,
                str(e["flips_score"]),
                str(e["flips_score_map_max"]),
                f"{e['map_max_abs']:.2e}",
                f"{e['map_p99_abs']:.2e}",
                f"{e['map_rel_l2']:.2e}",
            )
        console.print(t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="madclip,mvfa,mediclip")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--flips-only", action="store_true")
    p.add_argument(
        "--timing-backbone", default=None, help="override the reference backbone (smoke test: madclip-tiny)"
    )
    p.add_argument("--no-flips", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "cpu_engines.json"))
    p.add_argument("--worker")
    p.add_argument("--prepare", action="store_true")
    p.add_argument("--method")
    p.add_argument("--backbone")
    p.add_argument("--size", type=int)
    p.add_argument("--dir")
    p.add_argument("--cache")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.prepare:
        prepare(args.method, args.backbone, args.size, Path(args.dir))
        return None
    from madclip_runtime.engines.openvino_engine import cpu_capabilities, cpu_features
    from madclip_runtime.machine import machine_description

    methods = [m for m in args.methods.split(",") if m]
    out = Path(args.out)
    res: dict = json.loads(out.read_text()) if out.is_file() else {}
    res.update(
        {
            "machine": machine_description(),
            "cpu_features": cpu_features(),
            "openvino_cpu_capabilities": sorted(cpu_capabilities()),
            "threads": args.threads,
            "rounds": args.rounds,
        }
    )
    res.setdefault("methods", [])
    res.setdefault("flips", [])
    for method in methods:
        if not args.no_flips:
            log(f"{method}: decision flips (tiny config)")
            res["flips"] = [f for f in res["flips"] if f["method"] != method] + [flips(method)]
            _write(out, res)
        if not args.flips_only:
            r = bench_method(method, args.rounds, args.threads, args.timing_backbone)
            res["methods"] = [
                m for m in res["methods"] if (m["method"], m["backbone"]) != (method, r["backbone"])
            ] + [r]
            _write(out, res)
    print_tables(res)


def _write(path: Path, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
