"""madclip-bench on the tiny bundle: JSON rows, skipped combinations, the optional pytorch-eager row."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from madclip_runtime.cli.bench import batch_of, main, peak_rss_mb

from .conftest import build_tiny_bundle

ROW_KEYS = {
    "cold_start_s",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_mean_ms",
    "end_to_end_p50_ms",
    "stages_ms",
    "throughput_batch",
    "throughput_ips",
    "peak_rss_mb",
    "provider",
    "golden_score_max_abs_err",
}


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("bench") / "tiny")


def _rows(report: dict) -> dict[tuple[str, str], dict]:
    return {(r["backend"], r["precision"]): r for r in report["rows"]}


def test_bench_json(bundle, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(
        [
            "--bundle",
            str(bundle),
            "--iters",
            "3",
            "--warmup",
            "1",
            "--precisions",
            "fp32,fp16,int8",
            "--json",
            str(out),
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "Traceback" not in cap.err and "ort-cpu" in cap.out
    report = json.loads(out.read_text())
    m = report["machine"]
    assert m["cpu_count"] >= 1 and m["onnxruntime"] and "CPUExecutionProvider" in m["onnxruntime_providers"]
    assert m["cpu_model"] and m["ram_gb"] > 0 and "process" in report["peak_rss_note"]
    rows = _rows(report)
    r = rows[("ort-cpu", "fp32")]
    assert r["status"] == "ok" and ROW_KEYS <= set(r)
    assert set(r["stages_ms"]) == {"decode", "preprocess", "inference", "postprocess"}
    assert 0 < r["latency_p50_ms"] <= r["latency_p95_ms"] and r["throughput_ips"] > 0
    assert r["throughput_batch"] == 4 and r["cold_start_s"] > 0 and r["peak_rss_mb"] > 10
    assert r["stages_ms"]["decode"] > 0 and r["golden_score_max_abs_err"] < 1e-5
    assert rows[("ort-cpu", "fp16")]["status"] == "ok" and "slower" in rows[("ort-cpu", "fp16")]["note"]
    assert rows[("ort-cpu", "int8")] == {
        "backend": "ort-cpu",
        "precision": "int8",
        "status": "skipped",
        "reason": "no int8 model in the bundle",
    }
    for be in ("trt", "ort-trt", "ort-cuda"):  # no GPU on CI: listed as skipped with a reason
        if rows[(be, "fp32")]["status"] != "ok":
            assert rows[(be, "fp32")]["reason"]


def test_bench_image_and_batch(bundle, tmp_path, capsys):
    img = tmp_path / "scan.png"
    Image.fromarray(np.arange(64 * 48, dtype=np.uint32).reshape(64, 48).astype(np.uint8)).save(img)
    out = tmp_path / "b.json"
    rc = main(
        [
            "--bundle",
            str(bundle),
            "--backends",
            "ort-cpu",
            "--precisions",
            "fp32",
            "--iters",
            "2",
            "--warmup",
            "0",
            "--batch",
            "3",
            "--image",
            str(img),
            "--json",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert [(r["backend"], r["precision"]) for r in report["rows"]] == [("ort-cpu", "fp32")]
    assert report["rows"][0]["throughput_batch"] == 3 and report["settings"]["image"] == str(img)


def test_bench_errors(bundle, tmp_path, capsys):
    rc = main(["--bundle", str(bundle), "--backends", "gpu-magic"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "gpu-magic" in err
    rc = main(["--bundle", str(bundle), "--batch", "99"])
    assert rc == 2 and "--batch" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    rc = main(["--bundle", str(bundle), "--image", str(bad)])
    assert rc == 2 and "bad.png" in capsys.readouterr().err
    rc = main(["--bundle", str(bundle), "--backends", "trt", "--precisions", "fp32", "--iters", "1"])
    assert rc == 2 and "nothing could be measured" in capsys.readouterr().err


def test_helpers():
    imgs = np.arange(2 * 3 * 4 * 4, dtype=np.float64).reshape(2, 3, 4, 4)
    b = batch_of(imgs, 5)
    assert b.shape == (5, 3, 4, 4) and b.dtype == np.float32 and np.array_equal(b[2], imgs[0])
    assert peak_rss_mb() > 1


def _tiny_run(run_dir: Path) -> Path:
    """A real madclip run directory (config.json + checkpoint.safetensors) on the tiny random CLIP."""
    from madclip_train.config import ModelConfig, TrainConfig
    from madclip_train.model import build_model
    from madclip_train.rundir import CHECKPOINT, CONFIG, checkpoint_bytes

    cfg = ModelConfig(backbone="madclip-tiny", pretrained="none", objective="Brain")
    model = build_model(cfg, seed=TrainConfig().seed)
    run_dir.mkdir()
    (run_dir / CONFIG).write_text(json.dumps({"model": cfg.to_dict(), "train": TrainConfig().to_dict()}))
    (run_dir / CHECKPOINT).write_bytes(checkpoint_bytes(model))
    return run_dir


def test_pytorch_eager_row_script(tmp_path):
    """benchmarks/pytorch_eager.py gives madclip-bench's row fields for the PyTorch module the bundle comes from."""
    import subprocess

    pytest.importorskip("open_clip", reason="open_clip (madclip[train]) not installed")
    run_dir = _tiny_run(tmp_path / "run")
    b240 = build_tiny_bundle(tmp_path / "b240", size=240)  # the tiny CLIP takes 240x240 inputs
    image = tmp_path / "scan.png"
    from PIL import Image

    Image.fromarray(np.full((60, 70), 90, np.uint8)).save(image)
    out = tmp_path / "row.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "pytorch_eager.py"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "--run",
            str(run_dir),
            "--bundle",
            str(b240),
            "--image",
            str(image),
            "--iters",
            "2",
            "--warmup",
            "1",
            "--batch",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["status"] == "ok" and ROW_KEYS <= set(r) and r["provider"].startswith("torch")
    assert r["backend"] == "pytorch-eager" and r["latency_p50_ms"] > 0 and r["throughput_batch"] == 2


def test_bench_has_no_pytorch_option():
    """The runtime CLI never imports torch: the PyTorch row is the benchmarks' (see the script test above)."""
    with pytest.raises(SystemExit):
        main(["--bundle", "x", "--run", "y"])
