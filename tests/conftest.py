"""Shared fixtures and helpers: the tiny random CLIP (`madclip-tiny`), the shared real scans, and a tiny
stand-in bundle built WITHOUT the exporter (an ONNX graph whose outputs are simple functions of the image, so
expected values can be computed in numpy):
    anomaly_map = 4 * sigmoid(mean over channels(image) - 0.5)   # [B, 1, S, S]
    score = mean(anomaly_map), score_map_max = max(anomaly_map)  # [B]
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from madclip_runtime.atomic import AtomicDirectory
from madclip_runtime.bundle import write_metadata
from madclip_runtime.contract import io_metadata
from madclip_runtime.preprocess import PreprocessSpec

REALSCANS = Path(__file__).resolve().parents[2] / "shared" / "data" / "realscans"


def realscans_or_skip(name: str = "") -> Path:
    path = REALSCANS / name if name else REALSCANS
    if not path.exists():
        pytest.skip(f"real scans not available at {path} (CI and the dev machine have ../shared beside the repo)")
    return path


@pytest.fixture(scope="session")
def tiny_cfg():
    from madclip_train.config import ModelConfig

    return ModelConfig(backbone="madclip-tiny", pretrained="none", objective="Brain")


@pytest.fixture()
def tiny_model(tiny_cfg):
    from madclip_train.model import build_model

    return build_model(tiny_cfg, seed=0)


@pytest.fixture(scope="session")
def trained_tiny_run(tmp_path_factory):
    """A real madclip-tiny run (2 epochs, 2 + 2 shots) on generated demo data. Returns the run directory."""
    from madclip_train.demo import generate_demo
    from madclip_train.run import TrainRequest, train_run

    base = tmp_path_factory.mktemp("tiny_run")
    root = generate_demo(base / "data", n_valid=3, n_test=3, seed=11)
    out = base / "run"
    train_run(TrainRequest(data=str(root), out=str(out), shots=2, epochs=2, backbone="madclip-tiny",
                           pretrained="none", device="cpu"))
    return out


@pytest.fixture(scope="session")
def exported_tiny_bundle(trained_tiny_run, tmp_path_factory):
    """The trained tiny run exported with FP16, INT8 and Triton (max batch 4). Returns the bundle directory."""
    from madclip_export.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("tiny_bundle") / "b"
    export_bundle(ExportOptions(run=str(trained_tiny_run), out=str(out), fp16=True, int8=True, triton=True,
                                max_batch=4))
    return out


# ---- a tiny stand-in bundle (no exporter, no torch) ------------------------------------------------------

S = 32
THRESHOLD = 2.0  # uniform grey v: score = 4*sigmoid(v/255 - 0.5); white -> 2.49 (anomaly), black -> 1.51 (normal)


def _graph(fp16: bool, size: int = S):
    """The tiny stand-in for the exported MadCLIP graph; `fp16` computes the map in half precision."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dt = np.float16 if fp16 else np.float32
    nodes = [helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT16) if fp16
             else helper.make_node("Identity", ["image"], ["x"])]
    nodes += [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=1),  # [B, 1, S, S]
        helper.make_node("Sub", ["m", "half"], ["c"]),
        helper.make_node("Sigmoid", ["c"], ["p"]),
        helper.make_node("Mul", ["p", "four"], ["amap_h"]),
        helper.make_node("Cast", ["amap_h"], ["anomaly_map"], to=TensorProto.FLOAT) if fp16
        else helper.make_node("Identity", ["amap_h"], ["anomaly_map"]),
        helper.make_node("ReduceMean", ["anomaly_map"], ["score"], axes=[1, 2, 3], keepdims=0),  # [B]
        helper.make_node("ReduceMax", ["anomaly_map"], ["score_map_max"], axes=[1, 2, 3], keepdims=0),  # [B]
    ]
    inits = [numpy_helper.from_array(np.array(0.5, dt), "half"), numpy_helper.from_array(np.array(4.0, dt), "four")]
    graph = helper.make_graph(
        nodes, "tiny_madclip",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", 1, size, size]),
         helper.make_tensor_value_info("score_map_max", TensorProto.FLOAT, ["batch"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def expected_outputs(images: np.ndarray) -> dict[str, np.ndarray]:
    """numpy reference of the tiny graph: images [B, 3, S, S] -> outputs."""
    amap = 4.0 / (1.0 + np.exp(-(images.mean(axis=1, keepdims=True) - 0.5)))  # [B, 1, S, S]
    return {"anomaly_map": amap, "score": amap.mean(axis=(1, 2, 3)), "score_map_max": amap.max(axis=(1, 2, 3))}


def build_tiny_bundle(path: Path, score_name: str = "score", threshold: float | None = THRESHOLD,
                      size: int = S) -> Path:
    """Write a complete schema-1 bundle (fp32 + fp16 graphs, golden.npz, metadata.json) at `path`."""
    import onnx
    import onnxruntime as ort

    with AtomicDirectory(path) as tmp:
        onnx.save(_graph(False, size), os.path.join(tmp, "model.onnx"))
        onnx.save(_graph(True, size), os.path.join(tmp, "model_fp16.onnx"))
        rng = np.random.default_rng(0)
        images = np.stack([np.full((3, size, size), 0.1, np.float32), np.full((3, size, size), 0.9, np.float32),
                           rng.random((3, size, size), dtype=np.float32)])  # [3, 3, S, S]
        sess = ort.InferenceSession(os.path.join(tmp, "model.onnx"), providers=["CPUExecutionProvider"])
        score, amap, smax = sess.run(["score", "anomaly_map", "score_map_max"], {"image": images})
        np.savez(os.path.join(tmp, "golden.npz"), image=images, score=score, anomaly_map=amap, score_map_max=smax,
                 labels=np.array([-1, 1, -1]), sources=np.array(["dark", "bright", "noise"]))
        calibration = {"threshold": threshold, "score_name": score_name, "method": "fixed for tests",
                       "map_threshold": 2.2, "map_scale": [0.0, 4.0]}
        meta = {"preprocess": PreprocessSpec(image_size=size).to_dict(), **io_metadata(size, {"score": (0.0, 4.0), "anomaly_map": (0.0, 4.0)}),
                "max_batch": 4, "opset": 17, "calibration": calibration,
                "provenance": {"backbone": "test-graph", "pretrained": "none"},
                "models": {"fp32": "model.onnx", "fp16": "model_fp16.onnx"}}
        write_metadata(tmp, meta)
    return path


def _grad(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((x * 7 + y * 3) % 256).astype(np.uint8)  # [H, W]


def write_inputs(d: Path) -> dict[str, Path]:
    """PNG inputs of several kinds and sizes: 8-bit grey, 16-bit grey, RGB, palette."""
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    out["grey"] = d / "grey.png"
    Image.fromarray(_grad(40, 56)).save(out["grey"])
    out["g16"] = d / "g16.png"
    Image.fromarray((_grad(33, 20).astype(np.uint16) * 257)).save(out["g16"])
    assert Image.open(out["g16"]).mode.startswith("I")
    out["rgb"] = d / "rgb.png"
    Image.fromarray(np.stack([_grad(24, 30), _grad(24, 30)[::-1], np.full((24, 30), 99, np.uint8)], axis=2)).save(out["rgb"])
    out["pal"] = d / "pal.png"
    Image.fromarray(np.stack([_grad(50, 45)] * 3, axis=2)).convert("P").save(out["pal"])
    assert Image.open(out["pal"]).mode == "P"
    return out
