"""One command that proves the GPU half: versions, gpu/trt tests, CUDA training, exports, TensorRT engines,
self-tests and benchmarks on every GPU backend, into one JSON + Markdown report.

    benchmarks/gpu_check.sh                 # makes its own venv, installs madclip[gpu,trt,...], runs this
    python benchmarks/gpu_check.py --out DIR  # in an environment that already has them

Every step is a subprocess with its own timeout, so one hang cannot eat the rest; a failed step is recorded
and the check goes on where later steps do not depend on it. On a machine without an NVIDIA GPU it says so in
one line and exits 0 (CI runs it that way). The exit code is 1 when any step failed, else 0.

For the ViT-B-16 FP16 TensorRT engine the report states the achieved fraction of the GPU's dense FP16
tensor-core peak: model FLOPs (counted from the ONNX graph: MatMul/Gemm/Conv, 2 FLOPs per multiply-add,
batch 1) / measured batch-1 latency / peak from `PEAK_DENSE_FP16_TFLOPS` ("unknown" for other GPUs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Dense (no sparsity) FP16 tensor-core peak, FP32 accumulate where the datasheet distinguishes, in TFLOP/s,
# from NVIDIA's datasheets. Matched by substrings of the device name, most specific first.
PEAK_DENSE_FP16_TFLOPS: list[tuple[tuple[str, ...], float]] = [
    (("H100", "PCIE"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H100",), 989.4),  # SXM5
    (("H200",), 989.4),
    (("A100",), 312.0),
    (("L40S",), 362.1),
    (("L4",), 121.0),
    (("A10",), 125.0),
    (("RTX 4090",), 165.2),
    (("V100",), 125.0),
    (("T4",), 65.0),
]

# Seconds per step: generous for an H100 with a warm package cache; the whole check stays under 10 minutes
# there because most steps take a fraction of their limit.
TIMEOUTS = {"versions": 60, "tests": 240, "train_tiny": 180, "train_vitb": 240, "export": 300,
            "engine": 300, "selftest": 180, "bench": 240, "flops": 120}


@dataclass
class Step:
    name: str
    status: str  # pass | fail | timeout | skipped
    seconds: float = 0.0
    detail: dict = field(default_factory=dict)
    cmd: list[str] = field(default_factory=list)
    log_tail: str = ""


def peak_fp16_tflops(gpu_name: str) -> float | None:
    name = gpu_name.upper()
    for keys, tflops in PEAK_DENSE_FP16_TFLOPS:
        if all(k in name for k in keys):
            return tflops
    return None


def no_gpu_reason() -> str | None:
    """Why there is no NVIDIA GPU to check here (None when there is one). Fast: no CUDA initialisation."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        if Path("/dev/nvidia0").exists() or Path("/etc/nv_tegra_release").exists():
            return None  # a GPU without nvidia-smi in PATH (e.g. Jetson): let the versions step find out
        return "no NVIDIA GPU on this machine (no nvidia-smi, no /dev/nvidia0)"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi did not answer ({exc})"
    if out.returncode != 0 or "GPU" not in out.stdout:
        return "no NVIDIA GPU on this machine (nvidia-smi lists no device)"
    return None


def run_step(name: str, cmd: list[str], timeout: float, cwd: Path | None = None, env: dict | None = None) -> Step:
    """Run `cmd` with a timeout; pass when it exits 0. stdout is kept in detail["stdout"] for parsers."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as exc:
        tail = ((exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or ""))
        return Step(name, "timeout", round(time.perf_counter() - t0, 2), {"timeout_s": timeout}, cmd, tail[-2000:])
    except OSError as exc:
        return Step(name, "fail", round(time.perf_counter() - t0, 2), {"error": str(exc)}, cmd)
    status = "pass" if proc.returncode == 0 else "fail"
    return Step(name, status, round(time.perf_counter() - t0, 2), {"returncode": proc.returncode, "stdout": proc.stdout},
                cmd, (proc.stderr or "")[-2000:])


def onnx_flops(model_path: str | Path) -> int:
    """Multiply-add FLOPs (x2) of MatMul/Gemm/Conv at batch 1, from the graph's inferred shapes."""
    import numpy as np
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].dim_value = 1  # batch 1
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.dim_value > 0 else None for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    total = 0
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        a = shapes.get(node.input[0])
        b = shapes.get(node.input[1])
        out = shapes.get(node.output[0])
        if not a or not b or not out or None in a or None in b or None in out:
            raise ValueError(f"{node.name or node.op_type}: shapes not inferred")
        if node.op_type == "Conv":
            cin_per_group, kh, kw = b[1], b[2], b[3]
            total += 2 * int(np.prod(out)) * cin_per_group * kh * kw
        elif node.op_type == "Gemm":
            trans_a = next((att.i for att in node.attribute if att.name == "transA"), 0)
            k = a[0] if trans_a else a[1]
            total += 2 * int(np.prod(out)) * k
        else:  # MatMul: out [..., M, N], K = a[-1] (a vector a has K = a[0])
            k = a[-1]
            total += 2 * int(np.prod(out)) * k
    return int(total)


def tensor_core_fraction(flops: int, latency_ms: float, peak_tflops: float | None) -> float | str:
    if peak_tflops is None or latency_ms <= 0:
        return "unknown"
    return round(flops / (latency_ms / 1e3) / (peak_tflops * 1e12), 4)


def markdown(report: dict) -> str:
    """The reviewer's page: environment, one row per step, then engines, latencies, parity."""
    env = report["environment"]
    lines = ["# madclip GPU check", "", f"- verdict: **{report['verdict']}** ({report['seconds']:.0f} s)"]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", "| step | status | seconds | detail |", "|---|---|---:|---|"]
    for s in report["steps"]:
        detail = {k: v for k, v in s["detail"].items() if k not in ("stdout",)}
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {json.dumps(detail)[:300]} |")
    if report.get("engines"):
        lines += ["", "## TensorRT engine builds", "", "| bundle | precision | build s |", "|---|---|---:|"]
        lines += [f"| {e['bundle']} | {e['precision']} | {e['seconds']:.1f} |" for e in report["engines"]]
    if report.get("selftests"):
        lines += ["", "## Self-tests (parity with the bundle's golden outputs)", "",
                  "| bundle | backend | precision | passed | score max err | map p99 err |", "|---|---|---|---|---:|---:|"]
        lines += [f"| {t['bundle']} | {t['backend']} | {t['precision']} | {t.get('passed')} | "
                  f"{t.get('score_max_abs_err', '')} | {t.get('map_p99_abs_err', '')} |" for t in report["selftests"]]
    if report.get("latencies"):
        lines += ["", "## Latency (madclip-bench, model only, batch 1)", "",
                  "| bundle | backend | precision | p50 ms | p95 ms | cold s |", "|---|---|---|---:|---:|---:|"]
        lines += [f"| {r['bundle']} | {r['backend']} | {r['precision']} | {r.get('p50_ms')} | {r.get('p95_ms')} | "
                  f"{r.get('cold_s')} |" for r in report["latencies"]]
    if report.get("tensor_core"):
        tc = report["tensor_core"]
        lines += ["", "## ViT-B-16 FP16 on TensorRT vs the GPU's dense FP16 tensor-core peak", "",
                  f"- model GFLOPs (batch 1, from the ONNX graph): {tc['gflops']}",
                  f"- batch-1 latency: {tc['latency_ms']} ms; peak: {tc['peak_tflops']} TFLOP/s",
                  f"- achieved fraction of peak: {tc['fraction']}"]
    return "\n".join(lines) + "\n"


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


VERSIONS_CODE = r"""
import json, subprocess, shutil
out = {}
smi = shutil.which("nvidia-smi")
if smi:
    q = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True)
    out["nvidia_smi"] = q.stdout.strip()
import torch
out["torch"] = torch.__version__; out["torch_cuda"] = torch.version.cuda
out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
out["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0))) if torch.cuda.is_available() else None
for mod in ("tensorrt", "onnxruntime", "cuda.bindings"):
    try:
        m = __import__(mod, fromlist=["_"]); out[mod] = getattr(m, "__version__", "?")
    except Exception as exc:
        out[mod] = f"missing ({type(exc).__name__})"
try:
    import onnxruntime as ort; out["ort_providers"] = ort.get_available_providers()
except Exception:
    pass
from madclip_runtime.engines import backends, cuda_probe
p = cuda_probe.probe_gpu(); out["probe"] = {"count": p.count, "source": p.source, "error": p.error}
out["backends"] = backends.available_backends()
print(json.dumps(out))
"""


def _json_stdout(step: Step) -> dict:
    text = step.detail.get("stdout", "")
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return {}


def check(out_dir: Path, quick: bool = False) -> dict:
    """Run every step; return the report (also written as JSON and Markdown into `out_dir`)."""
    t_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "work"
    steps: list[Step] = []
    report: dict = {"environment": {"host": platform.node(), "python": platform.python_version()},
                    "engines": [], "selftests": [], "latencies": []}

    versions = run_step("versions", _py(VERSIONS_CODE), TIMEOUTS["versions"])
    steps.append(versions)
    info = _json_stdout(versions)
    report["environment"].update(info)
    gpu_backends = [b for b in info.get("backends", []) if b != "ort-cpu"]

    steps.append(run_step("gpu/trt tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m",
                                            "gpu or trt", str(ROOT / "tests")], TIMEOUTS["tests"], cwd=ROOT))

    data = work / "demo" / "Brain_AD"  # madclip-demo-data writes the dataset folder under --out
    if not data.exists():
        steps.append(run_step("demo data", [_bin("madclip-demo-data"), "--out", str(data.parent), "--force"], 120))
    runs = {"tiny": (["--backbone", "madclip-tiny", "--epochs", "3", "--shots", "2"], "train_tiny"),
            "vitb16": (["--backbone", "ViT-B-16", "--epochs", "1", "--shots", "2", "--image-size", "224"], "train_vitb")}
    bundles = {}
    for name, (extra, tkey) in runs.items():
        if quick and name == "vitb16":
            continue
        run_dir = work / f"run-{name}"
        s = run_step(f"train {name} on CUDA", [_bin("madclip-train"), "--data", str(data), "--out", str(run_dir),
                                               "--pretrained", "none", "--device", "cuda", "--force", *extra],
                     TIMEOUTS[tkey])
        if s.status == "pass":
            cfg = json.loads((run_dir / "config.json").read_text())
            hist = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines() if x.strip()]
            s.detail.update({"precision": cfg["train"].get("precision"), "device": cfg.get("device"),
                             "epoch_seconds": [h["seconds"] for h in hist], "final_loss": hist[-1]["loss_total"]})
        steps.append(s)
        if s.status != "pass":
            continue
        bundle = work / f"bundle-{name}"
        e = run_step(f"export {name}", [_bin("madclip-export"), str(run_dir), "--out", str(bundle), "--fp16",
                                        "--force"], TIMEOUTS["export"])
        steps.append(e)
        if e.status == "pass":
            bundles[name] = bundle

    engine_code = ("import sys, time, json; from madclip_runtime.engines import backends; "
                   "from madclip_runtime.bundles.bundle import load_bundle; t=time.perf_counter(); "
                   "p, v = backends.prebuild_trt_engine(sys.argv[1], sys.argv[2], 8, sys.argv[3], "
                   "fp32_islands=load_bundle(sys.argv[1]).fp32_islands); "
                   "print(json.dumps({'engine': str(p), 'tensorrt': v, 'seconds': time.perf_counter()-t}))")
    cache = work / "engine-cache"
    for name, bundle in bundles.items():
        for precision in ("fp32", "fp16"):
            if "trt" not in gpu_backends:
                steps.append(Step(f"trt engine {name} {precision}", "skipped", detail={"reason": "trt backend unavailable"}))
                continue
            s = run_step(f"trt engine {name} {precision}", [*_py(engine_code), str(bundle), precision, str(cache)],
                         TIMEOUTS["engine"])
            got = _json_stdout(s)
            s.detail.update({k: got[k] for k in ("tensorrt", "seconds") if k in got})
            steps.append(s)
            if s.status == "pass":
                report["engines"].append({"bundle": name, "precision": precision, "seconds": got.get("seconds", s.seconds)})
        for backend in gpu_backends:
            for precision in ("fp32", "fp16"):
                s = run_step(f"selftest {name} {backend} {precision}",
                             [_bin("madclip-infer"), "--bundle", str(bundle), "--selftest", "--json", "--backend",
                              backend, "--precision", precision, "--cache-dir", str(cache)], TIMEOUTS["selftest"])
                res = _json_stdout(s).get("selftest", {})
                s.detail.update({k: res.get(k) for k in ("passed", "provider", "score_max_abs_err", "map_p99_abs_err")})
                steps.append(s)
                report["selftests"].append({"bundle": name, "backend": backend, "precision": precision, **s.detail})
        bench_json = work / f"bench-{name}.json"
        s = run_step(f"madclip-bench {name}", [_bin("madclip-bench"), "--bundle", str(bundle), "--backends",
                                                ",".join(gpu_backends + ["ort-cpu"]), "--iters", "30",
                                                "--cache-dir", str(cache), "--json", str(bench_json)], TIMEOUTS["bench"])
        steps.append(s)
        if bench_json.exists():
            for row in json.loads(bench_json.read_text()).get("rows", []):
                if row.get("status") == "ok":
                    report["latencies"].append({"bundle": name, "backend": row.get("backend"),
                                                "precision": row.get("precision"), "p50_ms": row.get("latency_p50_ms"),
                                                "p95_ms": row.get("latency_p95_ms"), "cold_s": row.get("cold_start_s"),
                                                "throughput_ips": row.get("throughput_ips")})

    if "vitb16" in bundles:
        trt_fp16 = next((r for r in report["latencies"] if r["bundle"] == "vitb16" and r["backend"] == "trt"
                         and r["precision"] == "fp16"), None)
        s = run_step("ViT-B-16 FLOPs", _py(f"import sys; sys.path.insert(0, {str(HERE)!r}); import gpu_check; "
                                           f"print(gpu_check.onnx_flops({str(bundles['vitb16'] / 'model.onnx')!r}))"),
                     TIMEOUTS["flops"])
        steps.append(s)
        if s.status == "pass" and trt_fp16 and trt_fp16.get("p50_ms"):
            flops = int(s.detail["stdout"].strip().splitlines()[-1])
            peak = peak_fp16_tflops(str(info.get("gpu") or ""))
            report["tensor_core"] = {"gflops": round(flops / 1e9, 2), "latency_ms": trt_fp16["p50_ms"],
                                     "peak_tflops": peak if peak is not None else "unknown",
                                     "fraction": tensor_core_fraction(flops, float(trt_fp16["p50_ms"]), peak)}

    report["steps"] = [asdict(s) | {"detail": {k: v for k, v in s.detail.items() if k != "stdout"}} for s in steps]
    failed = [s.name for s in steps if s.status in ("fail", "timeout")]
    report["verdict"] = "FAIL: " + ", ".join(failed) if failed else "PASS"
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / "gpu_check.md").write_text(markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "results" / "gpu_check"), help="report directory")
    p.add_argument("--quick", action="store_true", help="skip the ViT-B-16 bundle (tiny only)")
    args = p.parse_args(argv)
    reason = no_gpu_reason()
    if reason:
        print(f"gpu_check: {reason}; nothing to check (exit 0)")
        return 0
    report = check(Path(args.out), quick=args.quick)
    print(f"gpu_check: {report['verdict']} in {report['seconds']:.0f} s; report: {args.out}/gpu_check.md")
    return 0 if report["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
