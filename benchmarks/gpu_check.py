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

# Seconds per step. TIMEOUTS are hard limits (a hung step is killed and recorded). BUDGET is what a step
# should take on an H100/H200 with a warm package cache (ViT-B-16 at 224 px; the tiny bundle is a smoke test),
# stated in the report beside the measured time; `planned_seconds` adds them up: under 10 minutes.
# Each engine is built once: the export builds the FP16 engine into the shared cache (MADCLIP_CACHE under the
# work dir) and every later step (engine check, self-tests, madclip-bench) finds it there by key; the second
# FP16 recipe (flag path, `fp16_paths`) is one more build with the timing cache already warm; onnxruntime's
# TensorRT provider builds its own engines once, in its self-test, and the bench reuses them.
TIMEOUTS = {
    "versions": 60,
    "tests": 240,
    "train_tiny": 180,
    "train_vitb": 240,
    "export": 420,
    "engine": 300,
    "selftest": 180,
    "bench": 240,
    "flops": 120,
}
BUDGET: dict = {
    "versions": 10,
    "tests": 30,
    "flops": 10,
    ("train", "tiny"): 15,
    ("train", "vitb16"): 45,
    ("export", "tiny"): 30,
    ("export", "vitb16"): 120,  # ONNX + FP16 ONNX + parity + the FP16 engine
    ("engine", "tiny"): 5,
    ("engine", "vitb16"): 45,  # a fresh build (fp32)
    ("engine_cached", "tiny"): 5,
    ("engine_cached", "vitb16"): 5,  # the export's FP16 engine, found by key
    ("engine_flag", "tiny"): 5,
    ("engine_flag", "vitb16"): 30,  # FP16-flag recipe, warm timing cache
    ("selftest", "tiny"): 6,
    ("selftest", "vitb16"): 8,
    ("selftest_ort_trt", "tiny"): 10,
    ("selftest_ort_trt", "vitb16"): 40,  # onnxruntime builds its engine
    ("bench", "tiny"): 30,
    ("bench", "vitb16"): 40,
    ("bench_flag", "tiny"): 10,
    ("bench_flag", "vitb16"): 15,
}


def _budget(kind: str, name: str | None = None) -> float:
    return float(BUDGET[kind] if name is None else BUDGET[(kind, name)])


def planned_seconds(names: list[str], gpu_backends: list[str], paths: list[str]) -> float:
    """The whole check's budget: the sum of BUDGET over the steps `check` runs for these bundles, backends
    and FP16 recipes (the tiny bundle is not benchmarked when the ViT-B-16 one is)."""
    total = _budget("versions") + _budget("tests")
    trt = "trt" in gpu_backends
    for name in names:
        total += _budget("train", name) + _budget("export", name)
        if trt:
            total += _budget("engine", name) + _budget("engine_cached", name)
            total += _budget("engine_flag", name) * ("flag" in paths)
        for backend in gpu_backends:
            kind = "selftest_ort_trt" if backend == "ort-trt" else "selftest"
            total += _budget(kind, name) * (2 + (backend == "trt" and "flag" in paths))
        if name != "tiny" or "vitb16" not in names:
            total += _budget("bench", name) + _budget("bench_flag", name) * (trt and "flag" in paths)
    return total + (_budget("flops") if "vitb16" in names else 0.0)


FP16_PATH_ENV = "MADCLIP_TRT_FP16_PATH"  # madclip_runtime.engines.trt_rules.FP16_PATH_ENV


@dataclass
class Step:
    name: str
    status: str  # pass | fail | timeout | skipped
    seconds: float = 0.0
    detail: dict = field(default_factory=dict)
    cmd: list[str] = field(default_factory=list)
    log_tail: str = ""
    budget: float | None = None  # expected seconds on an H100/H200 (BUDGET)


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


def run_step(
    name: str,
    cmd: list[str],
    timeout: float,
    cwd: Path | None = None,
    env: dict | None = None,
    budget: float | None = None,
) -> Step:
    """Run `cmd` with a timeout; pass when it exits 0. stdout is kept in detail["stdout"] for parsers."""
    step = _run(name, cmd, timeout, cwd, env)
    step.budget = budget
    return step


# Environment every step runs with (check() points MADCLIP_CACHE at the work dir: one engine cache for all).
STEP_ENV: dict[str, str] = {}


def _run(name: str, cmd: list[str], timeout: float, cwd: Path | None, env: dict | None) -> Step:
    env = {**STEP_ENV, **(env or {})}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})}
        )
    except subprocess.TimeoutExpired as exc:
        tail = (
            (exc.stderr or b"").decode(errors="replace")
            if isinstance(exc.stderr, bytes)
            else (exc.stderr or "")
        )
        return Step(
            name, "timeout", round(time.perf_counter() - t0, 2), {"timeout_s": timeout}, cmd, tail[-2000:]
        )
    except OSError as exc:
        return Step(name, "fail", round(time.perf_counter() - t0, 2), {"error": str(exc)}, cmd)
    status = "pass" if proc.returncode == 0 else "fail"
    return Step(
        name,
        status,
        round(time.perf_counter() - t0, 2),
        {"returncode": proc.returncode, "stdout": proc.stdout},
        cmd,
        (proc.stderr or "")[-2000:],
    )


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
    lines = [
        "# madclip GPU check",
        "",
        f"- verdict: **{report['verdict']}** ({report['seconds']:.0f} s; "
        f"budget {report.get('planned_seconds', 0):.0f} s on an H100/H200)",
    ]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", "| step | status | seconds | budget s (H100/H200) | detail |", "|---|---|---:|---:|---|"]
    for s in report["steps"]:
        detail = {k: v for k, v in s["detail"].items() if k not in ("stdout",)}
        budget = "" if s.get("budget") is None else f"{s['budget']:.0f}"
        lines.append(
            f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {budget} | {json.dumps(detail)[:300]} |"
        )
    if report.get("engines"):
        lines += [
            "",
            "## TensorRT engines (each built once; `cached`: built by the export step and reused)",
            "",
            "| bundle | precision | recipe | cached | seconds |",
            "|---|---|---|---|---:|",
        ]
        lines += [
            f"| {e['bundle']} | {e['precision']} | {e.get('typing', '')} | {e.get('cached', '')} | "
            f"{e['seconds']:.1f} |"
            for e in report["engines"]
        ]
    if report.get("selftests"):
        lines += [
            "",
            "## Self-tests (parity with the bundle's golden outputs)",
            "",
            "| bundle | backend | precision | passed | score max err | map p99 err |",
            "|---|---|---|---|---:|---:|",
        ]
        lines += [
            f"| {t['bundle']} | {t['backend']} | {t['precision']} | {t.get('passed')} | "
            f"{t.get('score_max_abs_err', '')} | {t.get('map_p99_abs_err', '')} |"
            for t in report["selftests"]
        ]
    if report.get("latencies"):
        lines += [
            "",
            "## Latency (madclip-bench, model only, batch 1)",
            "",
            "| bundle | backend | precision | p50 ms | p95 ms | cold s |",
            "|---|---|---|---:|---:|---:|",
        ]
        lines += [
            f"| {r['bundle']} | {r['backend']} | {r['precision']} | {r.get('p50_ms')} | {r.get('p95_ms')} | "
            f"{r.get('cold_s')} |"
            for r in report["latencies"]
        ]
    if report.get("tensor_core"):
        tc = report["tensor_core"]
        lines += [
            "",
            "## ViT-B-16 FP16 on TensorRT vs the GPU's dense FP16 tensor-core peak",
            "",
            f"- model GFLOPs (batch 1, from the ONNX graph): {tc['gflops']}",
            f"- batch-1 latency: {tc['latency_ms']} ms; peak: {tc['peak_tflops']} TFLOP/s",
            f"- achieved fraction of peak: {tc['fraction']}",
        ]
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


ENGINE_CODE = r"""
import json, sys, time
from pathlib import Path
from madclip_runtime.bundles.bundle import load_bundle
from madclip_runtime.engines import backends, trt_engine, trt_rules
b, precision = load_bundle(sys.argv[1]), sys.argv[2]
trt = backends.require_trt()
onnx_path = Path(b.path) / trt_rules.onnx_variant(precision, trt.__version__)
batch = b.max_batch or 8
key = trt_engine.engine_key(onnx_path, precision, batch, fp32_islands=b.fp32_islands)
cached = trt_rules.read_engine_key(backends.default_cache_dir() / "trt" / key.file_name) == key
t = time.perf_counter()
path, version = backends.prebuild_trt_engine(b.path, precision, batch, fp32_islands=b.fp32_islands)
print(json.dumps({"engine": str(path), "tensorrt": version, "typing": key.typing, "cached": cached,
                  "seconds": time.perf_counter() - t}))
"""


def fp16_paths(trt_version: str | None, wanted: str = "both") -> list[str]:
    """Which FP16 recipes to prove here: "auto" (what this TensorRT picks) and, where TensorRT offers both
    (10.12 <= version < 11) and `wanted` is "both", also "flag" (the JetPack 10.3 path) on the same GPU."""
    if wanted == "auto" or not trt_version:
        return ["auto"]
    try:
        major, minor = (int(v) for v in str(trt_version).split(".")[:2])
    except ValueError:
        return ["auto"]
    return ["auto", "flag"] if (10, 12) <= (major, minor) < (11, 0) else ["auto"]


def check(out_dir: Path, quick: bool = False, fp16_path: str = "both") -> dict:
    """Run every step; return the report (also written as JSON and Markdown into `out_dir`)."""
    t_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "work"
    STEP_ENV["MADCLIP_CACHE"] = str(work / "cache")  # export, engine checks, self-tests, bench: one cache
    steps: list[Step] = []
    report: dict = {
        "environment": {"host": platform.node(), "python": platform.python_version()},
        "engines": [],
        "selftests": [],
        "latencies": [],
    }

    versions = run_step("versions", _py(VERSIONS_CODE), TIMEOUTS["versions"], budget=_budget("versions"))
    steps.append(versions)
    info = _json_stdout(versions)
    report["environment"].update(info)
    gpu_backends = [b for b in info.get("backends", []) if b != "ort-cpu"]
    paths = fp16_paths(info.get("tensorrt") if "trt" in gpu_backends else None, fp16_path)
    engine_variants = [("fp32", "auto")] + [("fp16", path) for path in paths]
    report["environment"]["fp16_paths"] = paths
    report["planned_seconds"] = planned_seconds(
        ["tiny"] if quick else ["tiny", "vitb16"], gpu_backends, paths
    )

    steps.append(
        run_step(
            "gpu/trt tests",
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-m",
                "gpu or trt",
                str(ROOT / "tests"),
            ],
            TIMEOUTS["tests"],
            cwd=ROOT,
            budget=_budget("tests"),
        )
    )

    data = work / "demo" / "Brain_AD"  # madclip-demo-data writes the dataset folder under --out
    if not data.exists():
        steps.append(
            run_step("demo data", [_bin("madclip-demo-data"), "--out", str(data.parent), "--force"], 120)
        )
    runs = {
        "tiny": (["--backbone", "madclip-tiny", "--epochs", "3", "--shots", "2"], "train_tiny"),
        "vitb16": (
            ["--backbone", "ViT-B-16", "--epochs", "1", "--shots", "2", "--image-size", "224"],
            "train_vitb",
        ),
    }
    bundles = {}
    for name, (extra, tkey) in runs.items():
        if quick and name == "vitb16":
            continue
        run_dir = work / f"run-{name}"
        s = run_step(
            f"train {name} on CUDA",
            [
                _bin("madclip-train"),
                "--data",
                str(data),
                "--out",
                str(run_dir),
                "--pretrained",
                "none",
                "--device",
                "cuda",
                "--force",
                *extra,
            ],
            TIMEOUTS[tkey],
            budget=_budget("train", name),
        )
        if s.status == "pass":
            cfg = json.loads((run_dir / "config.json").read_text())
            hist = [
                json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines() if x.strip()
            ]
            s.detail.update(
                {
                    "precision": cfg["train"].get("precision"),
                    "device": cfg.get("device"),
                    "epoch_seconds": [h["seconds"] for h in hist],
                    "final_loss": hist[-1]["loss_total"],
                }
            )
        steps.append(s)
        if s.status != "pass":
            continue
        bundle = work / f"bundle-{name}"
        e = run_step(
            f"export {name}",
            [_bin("madclip-export"), str(run_dir), "--out", str(bundle), "--fp16", "--force"],
            TIMEOUTS["export"],
            budget=_budget("export", name),
        )
        steps.append(e)
        if e.status == "pass":
            bundles[name] = bundle

    for name, bundle in bundles.items():
        for precision, path in engine_variants:
            label = precision if path == "auto" else f"{precision} ({path} path)"
            env = {} if path == "auto" else {FP16_PATH_ENV: path}
            if "trt" not in gpu_backends:
                steps.append(
                    Step(
                        f"trt engine {name} {label}", "skipped", detail={"reason": "trt backend unavailable"}
                    )
                )
                continue
            s = run_step(
                f"trt engine {name} {label}",
                [*_py(ENGINE_CODE), str(bundle), precision],
                TIMEOUTS["engine"],
                env=env,
            )
            got = _json_stdout(s)
            s.budget = _budget(
                "engine_cached" if got.get("cached") else "engine_flag" if path == "flag" else "engine", name
            )
            s.detail.update({k: got[k] for k in ("tensorrt", "seconds", "typing", "cached") if k in got})
            steps.append(s)
            if s.status == "pass":
                report["engines"].append(
                    {
                        "bundle": name,
                        "precision": label,
                        "typing": got.get("typing"),
                        "cached": got.get("cached"),
                        "seconds": got.get("seconds", s.seconds),
                    }
                )
        for backend in gpu_backends:
            for precision, path in [(p, "auto") for p in ("fp32", "fp16")] + (
                [("fp16", "flag")] if backend == "trt" and ("fp16", "flag") in engine_variants else []
            ):
                label = precision if path == "auto" else f"{precision} ({path} path)"
                env = {} if path == "auto" else {FP16_PATH_ENV: path}
                s = run_step(
                    f"selftest {name} {backend} {label}",
                    [
                        _bin("madclip-infer"),
                        "--bundle",
                        str(bundle),
                        "--selftest",
                        "--json",
                        "--backend",
                        backend,
                        "--precision",
                        precision,
                    ],
                    TIMEOUTS["selftest"],
                    env=env,
                    budget=_budget("selftest_ort_trt" if backend == "ort-trt" else "selftest", name),
                )
                res = _json_stdout(s).get("selftest", {})
                s.detail.update(
                    {k: res.get(k) for k in ("passed", "provider", "score_max_abs_err", "map_p99_abs_err")}
                )
                steps.append(s)
                report["selftests"].append(
                    {"bundle": name, "backend": backend, "precision": label, **s.detail}
                )
        if name == "tiny" and "vitb16" in bundles:
            continue  # the tiny bundle's latencies say nothing; the ViT-B-16 one is benchmarked
        benches = [("", gpu_backends + ["ort-cpu"], None, {}, "bench")]
        if "trt" in gpu_backends and ("fp16", "flag") in engine_variants:
            benches.append((" trt fp16 (flag path)", ["trt"], "fp16", {FP16_PATH_ENV: "flag"}, "bench_flag"))
        for suffix, names, precisions, env, kind in benches:
            bench_json = (
                work / f"bench-{name}{suffix.replace(' ', '-').replace('(', '').replace(')', '')}.json"
            )
            cmd = [
                _bin("madclip-bench"),
                "--bundle",
                str(bundle),
                "--backends",
                ",".join(names),
                "--iters",
                "30",
                "--json",
                str(bench_json),
            ] + (["--precisions", precisions] if precisions else [])
            s = run_step(
                f"madclip-bench {name}{suffix}", cmd, TIMEOUTS["bench"], env=env, budget=_budget(kind, name)
            )
            steps.append(s)
            if bench_json.exists():
                for row in json.loads(bench_json.read_text()).get("rows", []):
                    if row.get("status") == "ok":
                        label = row.get("precision") if not env else f"{row.get('precision')} (flag path)"
                        report["latencies"].append(
                            {
                                "bundle": name,
                                "backend": row.get("backend"),
                                "precision": label,
                                "p50_ms": row.get("latency_p50_ms"),
                                "p95_ms": row.get("latency_p95_ms"),
                                "cold_s": row.get("cold_start_s"),
                                "throughput_ips": row.get("throughput_ips"),
                            }
                        )

    if "vitb16" in bundles:
        trt_fp16 = next(
            (
                r
                for r in report["latencies"]
                if r["bundle"] == "vitb16" and r["backend"] == "trt" and r["precision"] == "fp16"
            ),
            None,
        )
        s = run_step(
            "ViT-B-16 FLOPs",
            _py(
                f"import sys; sys.path.insert(0, {str(HERE)!r}); import gpu_check; "
                f"print(gpu_check.onnx_flops({str(bundles['vitb16'] / 'model.onnx')!r}))"
            ),
            TIMEOUTS["flops"],
            budget=_budget("flops"),
        )
        steps.append(s)
        if s.status == "pass" and trt_fp16 and trt_fp16.get("p50_ms"):
            flops = int(s.detail["stdout"].strip().splitlines()[-1])
            peak = peak_fp16_tflops(str(info.get("gpu") or ""))
            report["tensor_core"] = {
                "gflops": round(flops / 1e9, 2),
                "latency_ms": trt_fp16["p50_ms"],
                "peak_tflops": peak if peak is not None else "unknown",
                "fraction": tensor_core_fraction(flops, float(trt_fp16["p50_ms"]), peak),
            }

    report["steps"] = [
        asdict(s) | {"detail": {k: v for k, v in s.detail.items() if k != "stdout"}} for s in steps
    ]
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
    p.add_argument(
        "--fp16-path",
        choices=("both", "auto"),
        default="both",
        help="both (default): where TensorRT offers both FP16 recipes (10.12-10.x), also build, "
        "self-test and benchmark the FP16-flag path of JetPack's TensorRT 10.3; auto: only "
        "the one this TensorRT picks",
    )
    args = p.parse_args(argv)
    reason = no_gpu_reason()
    if reason:
        print(f"gpu_check: {reason}; nothing to check (exit 0)")
        return 0
    report = check(Path(args.out), quick=args.quick, fp16_path=args.fp16_path)
    print(f"gpu_check: {report['verdict']} in {report['seconds']:.0f} s; report: {args.out}/gpu_check.md")
    return 0 if report["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
