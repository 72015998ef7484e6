"""benchmarks/gpu_check: the no-GPU path CI runs, and the pure parts of the report (FLOPs, peaks, steps)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

from .conftest import make_tiny_model  # noqa: E402


def test_script_without_a_gpu_says_so_in_one_line_and_exits_0():
    if gpu_check.no_gpu_reason() is None:
        pytest.skip("this machine has an NVIDIA GPU: the script would run the full check")
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no NVIDIA GPU" in lines[0]
    assert not (ROOT / ".gpu-check-venv").exists()  # nothing installed, no venv made
    assert gpu_check.main(["--out", "/nonexistent/never-written"]) == 0


def test_onnx_flops_counts_conv_and_matmul(tmp_path):
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    path = tmp_path / "tiny.onnx"
    onnx.save(make_tiny_model(), str(path))
    # Conv 3->4 channels, 4x4 kernel, stride 4 on 16x16: output [1, 4, 4, 4]; 2 * 64 * 3 * 16 FLOPs
    assert gpu_check.onnx_flops(path) == 2 * 64 * 3 * 16
    w = numpy_helper.from_array(np.zeros((8, 5), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 5])],
        [w],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "mm.onnx")
    )
    assert gpu_check.onnx_flops(tmp_path / "mm.onnx") == 2 * 3 * 5 * 8  # batch 1


def test_peak_table_and_fraction():
    assert gpu_check.peak_fp16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_check.peak_fp16_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_fp16_tflops("NVIDIA L4") == 121.0
    assert gpu_check.peak_fp16_tflops("Orin") is None
    assert gpu_check.tensor_core_fraction(10**12, 10.0, None) == "unknown"
    assert gpu_check.tensor_core_fraction(10**12, 10.0, 100.0) == 1.0  # 1 TFLOP in 10 ms = 100 TFLOP/s


def test_each_step_has_its_own_timeout():
    slow = gpu_check.run_step("sleep", [sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert slow.status == "timeout" and slow.detail["timeout_s"] == 0.5
    ok = gpu_check.run_step("ok", [sys.executable, "-c", "print('{\"a\": 1}')"], timeout=30)
    assert ok.status == "pass" and gpu_check._json_stdout(ok) == {"a": 1}
    bad = gpu_check.run_step("bad", [sys.executable, "-c", "raise SystemExit(3)"], timeout=30)
    assert bad.status == "fail" and bad.detail["returncode"] == 3


def test_markdown_report_lists_every_step():
    report = {
        "environment": {"gpu": "NVIDIA H100"},
        "verdict": "FAIL: export tiny",
        "seconds": 12.0,
        "steps": [
            {"name": "versions", "status": "pass", "seconds": 1.0, "detail": {}},
            {"name": "export tiny", "status": "fail", "seconds": 3.0, "detail": {"returncode": 2}},
        ],
        "engines": [{"bundle": "tiny", "precision": "fp16", "seconds": 4.2}],
        "selftests": [],
        "latencies": [],
        "tensor_core": {"gflops": 35.2, "latency_ms": 1.1, "peak_tflops": 989.4, "fraction": 0.032},
    }
    text = gpu_check.markdown(report)
    assert "| export tiny | fail |" in text and "FAIL: export tiny" in text
    assert "achieved fraction of peak: 0.032" in text and "| tiny | fp16 |  |  | 4.2 |" in text


def test_full_check_paths_run_and_report_on_a_cpu_machine(tmp_path, monkeypatch):
    """The check's steps and report writing, run for real where there is no GPU: every command resolves,
    the CUDA steps fail in their own step (not the whole check), and both report files are written."""
    monkeypatch.setitem(gpu_check.TIMEOUTS, "tests", 300)
    report = gpu_check.check(tmp_path, quick=True)
    names = [s["name"] for s in report["steps"]]
    assert names[:2] == ["versions", "gpu/trt tests"] and "train tiny on CUDA" in names
    by_name = {s["name"]: s for s in report["steps"]}
    assert by_name["versions"]["status"] == "pass" and "torch" in report["environment"]
    assert by_name["gpu/trt tests"]["status"] == "pass"  # collected and skipped without a GPU
    assert by_name["train tiny on CUDA"]["status"] == "fail" and report["verdict"].startswith("FAIL")
    assert (tmp_path / "gpu_check.json").is_file() and "| versions | pass |" in (
        tmp_path / "gpu_check.md"
    ).read_text()


def test_fp16_paths_prove_both_recipes_where_tensorrt_has_both():
    """Issue 21: on TensorRT 10.12-10.x one GPU run builds, self-tests and benchmarks the FP16-flag path
    (JetPack's TensorRT 10.3) beside the strongly typed one; elsewhere there is only one recipe."""
    assert gpu_check.fp16_paths("10.13.2.6") == ["auto", "flag"]
    assert gpu_check.fp16_paths("10.12.0") == ["auto", "flag"]
    assert gpu_check.fp16_paths("10.3.0.30") == ["auto"]  # auto already is the flag path there
    assert gpu_check.fp16_paths("11.0.0") == ["auto"]  # no FP16 builder flag in TensorRT 11
    assert gpu_check.fp16_paths("10.13.2", "auto") == ["auto"]
    assert gpu_check.fp16_paths(None) == ["auto"] and gpu_check.fp16_paths("missing (ImportError)") == [
        "auto"
    ]
    from madclip_runtime.engines import trt_rules

    assert gpu_check.FP16_PATH_ENV == trt_rules.FP16_PATH_ENV


def test_report_states_the_budget_per_step_within_ten_minutes():
    """The plan (every step's H100/H200 budget, both FP16 recipes, three GPU backends, tiny + ViT-B-16) adds
    up to under 10 minutes, and the report shows each step's budget beside its measured time."""
    full = gpu_check.planned_seconds(["tiny", "vitb16"], ["trt", "ort-trt", "ort-cuda"], ["auto", "flag"])
    assert 300 < full <= 600, full
    assert gpu_check.planned_seconds(["tiny"], ["trt", "ort-trt", "ort-cuda"], ["auto"]) < full / 2
    step = gpu_check.Step("export vitb16", "pass", 95.0, budget=gpu_check._budget("export", "vitb16"))
    report = {
        "environment": {},
        "verdict": "PASS",
        "seconds": 95.0,
        "planned_seconds": full,
        "steps": [vars(step)],
        "engines": [
            {
                "bundle": "vitb16",
                "precision": "fp16",
                "typing": "strongly_typed",
                "cached": True,
                "seconds": 0.4,
            }
        ],
    }
    md = gpu_check.markdown(report)
    assert "budget s (H100/H200)" in md and "| export vitb16 | pass | 95.0 | 120 |" in md
    assert f"budget {full:.0f} s" in md
    assert "| vitb16 | fp16 | strongly_typed | True | 0.4 |" in md


def test_engine_step_reuses_the_exports_engine(exported_tiny_bundle, tmp_path, monkeypatch, capsys):
    """Issue 21 defect 5: the export's FP16 engine (built into $MADCLIP_CACHE) is the one the GPU check's engine
    step finds (`cached`: no second build); the FP16-flag recipe is one more build, then cached too. Runs the
    step's own code on the suite's real exported bundle, against the TensorRT fakes (tests/trt_fakes.py)."""
    from madclip_export import export as ex
    from madclip_runtime.bundles.bundle import load_bundle
    from madclip_runtime.engines import backends
    from madclip_runtime.engines import trt_engine as te
    from madclip_runtime.engines import trt_rules as tr

    from .trt_fakes import FakeBuilderTrt

    trt = FakeBuilderTrt()
    trt.__version__ = "10.13.2"  # offers both FP16 recipes
    monkeypatch.setattr(te, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(backends, "require_trt", lambda: trt)
    monkeypatch.setattr(te._TrtLogger, "get", classmethod(lambda cls, t: None))
    monkeypatch.setattr(te, "compute_capability", lambda device=0: (9, 0))
    monkeypatch.setattr(te, "device_name", lambda device=0: "NVIDIA H100")
    monkeypatch.setenv("MADCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(tr.FP16_PATH_ENV, raising=False)
    b = load_bundle(exported_tiny_bundle)
    opts = ex.ExportOptions(run=str(tmp_path), out=str(tmp_path / "b"), fp16=True, max_batch=b.max_batch)
    assert ex._maybe_build_engine(exported_tiny_bundle, opts, lambda m: None, b.fp32_islands)["built"]
    builds = len(trt.configs)

    def engine_step(precision: str) -> dict:
        monkeypatch.setattr(sys, "argv", ["-c", str(exported_tiny_bundle), precision])
        exec(compile(gpu_check.ENGINE_CODE, "ENGINE_CODE", "exec"), {})
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    got = engine_step("fp16")
    assert got["cached"] is True and got["typing"] == "strongly_typed" and len(trt.configs) == builds
    monkeypatch.setenv(tr.FP16_PATH_ENV, "flag")
    got = engine_step("fp16")
    assert got["cached"] is False and got["typing"] == "fp16_flag" and len(trt.configs) == builds + 1
    assert engine_step("fp16")["cached"] is True and len(trt.configs) == builds + 1
    flag_network = trt.networks[-1]
    assert any(impl.name == "dt" and impl.output_types for impl in flag_network.layers())  # the tail, pinned
