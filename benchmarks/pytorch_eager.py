"""The PyTorch-eager row of madclip-bench: the module the bundle was exported from, run in PyTorch FP32 on the CPU.

    python benchmarks/pytorch_eager.py --run RUN --bundle BUNDLE --image scan.png [--iters 20] --json row.json

It lives here, not in the runtime (which never imports torch). The model's constants (for MadCLIP the text
embeddings) are computed once at load, counted in its cold start, as the bundle bakes them; each image then goes
through the same decode -> preprocess -> model -> resize stages that madclip-bench times, so the row compares
with madclip-bench's rows (same fields, same golden check).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from madclip_runtime.bundles.bundle import load_bundle
from madclip_runtime.bundles.selftest import read_golden
from madclip_runtime.cli.bench import batch_of, row_from_runs, throughput
from madclip_runtime.contract import ANOMALY_MAP, GOLDEN_INPUT, OUTPUT_NAMES, SCORE
from madclip_runtime.machine import peak_rss_mb
from madclip_runtime.preprocess import preprocess, resize_map
from madclip_runtime.scans.imageio import read_scans
from madclip_train.rundir import load_run


def pytorch_eager_row(
    run_dir: str, bundle_dir: str, image_path: str, iters: int, warmup: int, batch: int, thr_iters: int
) -> dict:
    bundle = load_bundle(bundle_dir, verify=False)
    spec, golden = bundle.spec, read_golden(bundle)
    t0 = time.perf_counter()
    model, _config = load_run(run_dir)
    module = model.export_module().eval()  # what the bundle was exported from; constants computed once here
    cold = time.perf_counter() - t0

    def infer(x: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return {k: v.float().numpy() for k, v in zip(OUTPUT_NAMES, out)}

    def one() -> dict[str, float]:
        t: dict[str, float] = {}
        s = time.perf_counter()
        scan = read_scans(image_path, window=spec.window)[0]
        t["decode"] = (time.perf_counter() - s) * 1e3
        s = time.perf_counter()
        x = preprocess(scan, spec)[None]  # [1, 3, S, S]
        t["preprocess"] = (time.perf_counter() - s) * 1e3
        s = time.perf_counter()
        out = infer(x)
        t["inference"] = (time.perf_counter() - s) * 1e3
        s = time.perf_counter()
        resize_map(out[ANOMALY_MAP][0, 0], scan.height, scan.width)
        t["postprocess"] = (time.perf_counter() - s) * 1e3
        return t

    for _ in range(warmup):
        one()
    runs = [one() for _ in range(iters)]
    thr = throughput(infer, batch_of(golden[GOLDEN_INPUT], batch), thr_iters)
    out = infer(golden[GOLDEN_INPUT])
    row = row_from_runs(runs, cold, thr, batch)
    row.update(
        backend="pytorch-eager",
        precision="fp32",
        status="ok",
        peak_rss_mb=round(peak_rss_mb(), 1),
        provider=f"torch {torch.__version__} CPU ({torch.get_num_threads()} threads, constants precomputed)",
        golden_score_max_abs_err=float(np.max(np.abs(out[SCORE] - golden[SCORE]))),
    )
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json", required=True)
    a = p.parse_args()
    row = pytorch_eager_row(a.run, a.bundle, a.image, a.iters, a.warmup, a.batch, max(3, a.iters // 5))
    Path(a.json).write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps({k: row[k] for k in ("latency_p50_ms", "throughput_ips", "golden_score_max_abs_err")}))


if __name__ == "__main__":
    main()
