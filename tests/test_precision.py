"""Mixed-precision training (`--precision`): bf16 close to fp32 on the CPU, refusals, defaults, records;
and the CUDA training path (gpu-marked: device placement, no per-step host syncs, FP32 checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from madclip_runtime.errors import MadclipError
from madclip_train import precision as prec
from madclip_train.config import TrainConfig
from madclip_train.data import load_arrays, load_split, sample_shots
from madclip_train.demo import generate_demo
from madclip_train.train import ShotTensors, fit

# bf16 keeps 8 mantissa bits: after a few Adam steps on the tiny model the epoch loss stays within this
# relative distance of the fp32 run (measured: see benchmarks/RESULTS.md, section "GPU readiness").
BF16_LOSS_RTOL = 0.05


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> ShotTensors:
    root = generate_demo(tmp_path_factory.mktemp("demo"), n_valid=4, n_test=2, seed=5)
    images, masks, labels = load_arrays(sample_shots(load_split(root, "valid"), 2, 111))
    return ShotTensors(torch.from_numpy(images), torch.from_numpy(masks), torch.from_numpy(labels))


def _fit(tiny_cfg, shots, precision, device="cpu", epochs=3):
    from madclip_train.model import build_model

    tcfg = TrainConfig(shots=2, epochs=epochs, batch_size=16, augment=False, precision=precision)
    torch.manual_seed(tcfg.seed)
    model = build_model(tiny_cfg, seed=tcfg.seed)
    summary = fit(model, shots, True, tcfg, torch.device(device))
    return model, summary


def test_bf16_training_runs_and_tracks_fp32(tiny_cfg, shots):
    _, s32 = _fit(tiny_cfg, shots, "fp32")
    model, s16 = _fit(tiny_cfg, shots, "bf16")
    assert s16["precision"] == {
        "precision": "bf16",
        "autocast_dtype": "torch.bfloat16",
        "grad_scaler": False,
        "device": "cpu",
    }
    for a, b in zip(s32["history"], s16["history"]):
        assert abs(b["loss_total"] - a["loss_total"]) <= BF16_LOSS_RTOL * abs(a["loss_total"]), (a, b)
    assert s32["history"][0]["loss_total"] != s16["history"][0]["loss_total"]  # bf16 really ran
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters(True))  # FP32 master weights


def test_fp16_uses_a_gradient_scaler(tiny_cfg, shots):
    model, s = _fit(tiny_cfg, shots, "fp16", epochs=1)
    assert s["precision"]["grad_scaler"] is True
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.trainable_parameters(True))


def test_defaults_follow_the_reference_on_cuda_and_fp32_on_cpu(monkeypatch):
    assert prec.resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(prec, "autocast_works", lambda device_type, name: True)
    assert prec.resolve_precision("auto", torch.device("cuda")) == prec.REFERENCE_CUDA_PRECISION == "fp16"
    assert prec.resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_unsupported_precisions_are_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(prec, "autocast_works", lambda device_type, name: False)
    with pytest.raises(MadclipError, match="not supported on cpu") as info:
        prec.resolve_precision("fp16", torch.device("cpu"))
    assert "\n" not in str(info.value)
    monkeypatch.setattr(prec, "autocast_works", lambda device_type, name: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(MadclipError, match="no BF16 support"):
        prec.resolve_precision("bf16", torch.device("cuda"))
    with pytest.raises(MadclipError, match="must be one of"):
        prec.resolve_precision("fp8", torch.device("cpu"))


def test_cli_records_precision_and_saves_fp32(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    from madclip_train.cli import train_main

    root = generate_demo(tmp_path / "data", n_valid=3, n_test=2, seed=7)
    out = tmp_path / "run"
    argv = [
        "--data",
        str(root),
        "--out",
        str(out),
        "--shots",
        "2",
        "--epochs",
        "1",
        "--backbone",
        "madclip-tiny",
        "--pretrained",
        "none",
        "--device",
        "cpu",
        "--no-augment",
    ]
    assert train_main([*argv, "--precision", "bf16"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["precision"] == "bf16"
    ckpt = next(p for p in out.iterdir() if p.suffix == ".safetensors")
    assert all(t.dtype == torch.float32 for t in load_file(str(ckpt)).values() if t.is_floating_point())
    monkeypatch.setattr(prec, "autocast_works", lambda device_type, name: False)
    assert train_main([*argv, "--out", str(tmp_path / "r2"), "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "--precision fp16 is not supported" in err and "Traceback" not in err
    assert not (tmp_path / "r2").exists()


# ---- the CUDA training path (run by benchmarks/gpu_check.sh on a GPU machine) --------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to torch")


@pytest.mark.gpu
@cuda
def test_cuda_training_keeps_everything_on_the_device(tiny_cfg, shots):
    """Feature cache, labels and masks on the GPU (they fit), default precision = the reference's fp16 with a
    scaler, weights and checkpoint FP32, and the result close to the CPU fp32 run."""
    assert prec.resolve_precision("auto", torch.device("cuda")) == "fp16"
    model, s = _fit(tiny_cfg, shots, "fp16", device="cuda")
    assert s["cache"]["train"]["placement"] == "device"
    assert s["precision"]["grad_scaler"] is True
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in model.trainable_parameters(True))
    _, ref = _fit(tiny_cfg, shots, "fp32", device="cpu")
    assert (
        abs(s["history"][-1]["loss_total"] - ref["history"][-1]["loss_total"])
        <= 0.1 * ref["history"][-1]["loss_total"]
    )


@pytest.mark.gpu
@cuda
def test_cuda_training_loop_has_no_per_step_host_sync(tiny_cfg, shots):
    """torch's sync debug mode counts synchronising calls: the loop may sync once per epoch (the logged loss),
    not once per step (float(loss) each step was one)."""
    import warnings

    from madclip_train.model import build_model

    tcfg = TrainConfig(
        shots=2, epochs=2, batch_size=2, augment=False, precision="fp32"
    )  # several steps/epoch
    model = build_model(tiny_cfg, seed=0)
    n_steps = tcfg.epochs * -(-len(shots) // tcfg.batch_size)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(model, shots, True, tcfg, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert n_steps > 2 * tcfg.epochs and len(syncs) < n_steps, [str(w.message) for w in syncs][:5]


@pytest.mark.gpu
@cuda
def test_pinned_host_placement_when_the_cache_does_not_fit(monkeypatch):
    from madclip_train import device as dev

    big = torch.zeros(4, 8, 16)
    placed, where = dev.place_on_device(big, torch.device("cuda"), budget=0.0)
    assert where == "pinned-host" and placed.is_pinned()
    rows = dev.gather_to_device(placed, torch.tensor([0, 3]), torch.device("cuda"))
    assert rows.device.type == "cuda" and rows.shape == (4, 2, 16)


def test_bench_train_precision_sweep_records_each_precision(tmp_path):
    """benchmarks/bench_train.py --precisions keeps working: one cached run + step breakdown per precision."""
    import os
    import subprocess
    import sys

    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    env = {
        **os.environ,
        "MADCLIP_BENCH_WORK": str(tmp_path / "work"),
        "MADCLIP_BENCH_RESULTS": str(tmp_path / "res"),
    }
    proc = subprocess.run(
        [
            sys.executable,
            str(bench / "bench_train.py"),
            "--backbones",
            "madclip-tiny",
            "--shots",
            "1",
            "--epochs-cached",
            "1",
            "--precisions",
            "fp32,bf16",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "res" / "train_precision_madclip-tiny.json").read_text())
    assert [r["precision"] for r in out["results"]] == ["fp32", "bf16"]
    assert all(r["step_breakdown"]["full_cached_step_ms"] > 0 for r in out["results"])
    a, b = (r["final_loss"] for r in out["results"])
    assert abs(a - b) <= BF16_LOSS_RTOL * abs(a)
