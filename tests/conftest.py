"""Shared fixtures: the tiny random CLIP (`madclip-tiny`) and paths to the shared real scans."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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


# ---- a tiny ONNX model of the bundle's interface (image -> score, anomaly_map, score_map_max) -------------
# Shared by the backend tests (CPU) and the TensorRT tests (GPU). onnx is imported inside: collecting the
# suite must not need it.

SIZE = 16  # image H = W
PATCH = 4


def make_tiny_model(seed: int = 0):
    """image [B,3,16,16] -> Conv 4x4/4 -> channel mean [B,1,4,4] -> nearest x4 -> sigmoid = anomaly_map;
    score = mean of the map, score_map_max = max of the map (the bundle's output contract)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.2, (4, 3, PATCH, PATCH)).astype(np.float32)
    bias = rng.normal(0, 0.1, (4,)).astype(np.float32)
    inits = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(bias, "b"),
        numpy_helper.from_array(np.array([1], np.int64), "ax_c"),
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), "ax_all"),
        numpy_helper.from_array(np.array([1, 1, PATCH, PATCH], np.float32), "scales"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w", "b"], ["feat"], strides=[PATCH, PATCH], name="patch_embed"),
        helper.make_node("ReduceMean", ["feat", "ax_c"], ["logit"], keepdims=1, name="channel_mean"),
        helper.make_node("Resize", ["logit", "", "scales"], ["up"], mode="nearest", name="upsample"),
        helper.make_node("Sigmoid", ["up"], ["prob"], name="sigmoid"),
        # A graph output that other nodes also consume trips onnxconverter-common's keep_io_types casts.
        helper.make_node("Identity", ["prob"], ["anomaly_map"], name="map_out"),
        helper.make_node("ReduceMean", ["prob", "ax_all"], ["score"], keepdims=0, name="score_mean"),
        helper.make_node("ReduceMax", ["prob", "ax_all"], ["score_map_max"], keepdims=0, name="map_max"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_madclip",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", 1, SIZE, SIZE]),
            helper.make_tensor_value_info("score_map_max", TensorProto.FLOAT, ["batch"]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def reference_outputs(images: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """The tiny model computed in numpy."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.2, (4, 3, PATCH, PATCH)).astype(np.float64)
    bias = rng.normal(0, 0.1, (4,)).astype(np.float64)
    b, g = images.shape[0], SIZE // PATCH
    patches = images.astype(np.float64).reshape(b, 3, g, PATCH, g, PATCH)  # [B, C, i, p, j, q]
    feat = np.einsum("bcipjq,ocpq->boij", patches, weight) + bias[None, :, None, None]  # [B, 4, g, g]
    logit = feat.mean(axis=1, keepdims=True)  # [B, 1, g, g]
    up = logit.repeat(PATCH, axis=2).repeat(PATCH, axis=3)  # [B, 1, 16, 16]
    amap = 1.0 / (1.0 + np.exp(-up))
    return {"score": amap.mean(axis=(1, 2, 3)), "anomaly_map": amap, "score_map_max": amap.max(axis=(1, 2, 3))}


def images(batch: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (batch, 3, SIZE, SIZE)).astype(np.float32)


