"""The benchmark scripts keep working: run them on madclip-tiny with minimal settings in a scratch folder.

They are not timed here (timings live in benchmarks/RESULTS.md); these tests check that each script runs end
to end and that the figures it records are the ones RESULTS.md relies on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run_script(name: str, args: list[str], work: Path, results: Path) -> dict:
    env = {**os.environ, "MADCLIP_BENCH_WORK": str(work), "MADCLIP_BENCH_RESULTS": str(results)}
    proc = subprocess.run(
        [sys.executable, str(BENCH / name), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return json.loads((results / name.replace("bench_", "").replace(".py", ".json")).read_text())


def test_bench_train_cached_and_uncached_agree(tmp_path):
    out = _run_script(
        "bench_train.py",
        ["--backbones", "madclip-tiny", "--shots", "1", "--epochs-cached", "1", "--epochs-uncached", "1"],
        tmp_path / "work",
        tmp_path / "results",
    )
    (res,) = out["results"]
    assert out["machine"]["cpu_count"] >= 1
    assert res["cached"]["feature_cache"] == "memory" and res["uncached"]["feature_cache"] == "off"
    assert res["cached"]["n_train_images"] == 32  # 1 + 1 shots x16 augmentation
    assert res["cached"]["cache_bytes"] > 0 and res["cached"]["cache_build_seconds"] > 0
    assert res["uncached"]["cache_bytes"] is None
    # same seed and config: the first epoch sees the same fp16-rounded features either way
    assert res["cached"]["epoch1_loss"] == pytest.approx(res["uncached"]["epoch1_loss"], rel=1e-4)
    assert res["epoch_speedup"] > 0
    assert not (tmp_path / "results" / "export.json").exists()


def test_bench_runtime_rows_and_infer_overhead(tmp_path, exported_tiny_bundle, trained_tiny_run):
    work = tmp_path / "work"
    (work / "bundles").mkdir(parents=True)
    (work / "runs").mkdir()
    (work / "bundles" / "madclip-tiny").symlink_to(exported_tiny_bundle)
    (work / "runs" / "export-madclip-tiny").symlink_to(trained_tiny_run)
    out = _run_script(
        "bench_runtime.py",
        ["--backbones", "madclip-tiny", "--iters", "3", "--repeats", "1"],
        work,
        tmp_path / "results",
    )
    (res,) = out["results"]
    ok = {(r["backend"], r["precision"]) for r in res["bench"]["rows"] if r["status"] == "ok"}
    assert {("ort-cpu", "fp32"), ("ort-cpu", "fp16"), ("ort-cpu", "int8"), ("pytorch-eager", "fp32")} <= ok
    assert [o["precision"] for o in res["infer_overhead"]] == ["fp32", "fp16", "int8"]
    for o in res["infer_overhead"]:
        assert o["load_only_wall_s"] > 0 and o["infer_one_wall_s"] > 0 and o["model_latency_ms"] > 0
    assert set(res["export_parity"]) == {"fp32", "fp16", "int8"}
