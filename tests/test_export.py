"""Exporter: ONNX parity at B = 1 and 3, FP16 IO dtypes and FP32 islands, INT8 bound, metadata and checksums,
tamper detection, atomicity of failed exports, Triton config, TensorRT refusal without TensorRT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from madclip_export.export import ExportOptions, ParityError, export_bundle
from madclip_runtime.bundles.bundle import load_bundle
from madclip_runtime.errors import BundleError


@pytest.fixture()
def run_dir(trained_tiny_run) -> Path:
    return trained_tiny_run


@pytest.fixture()
def bundle(exported_tiny_bundle) -> Path:
    return exported_tiny_bundle


def _ort(path, images, fp16=False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if fp16:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, {"image": images})))


def test_fp32_onnx_matches_pytorch_at_batch_1_and_3(run_dir, bundle):
    from madclip_train.rundir import load_run

    model, _ = load_run(run_dir)
    x = np.random.default_rng(0).random((3, 3, 240, 240), dtype=np.float32)
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in model(torch.from_numpy(x)).items()}
    for b in (1, 3):
        got = _ort(bundle / "model.onnx", x[:b])
        assert got["score"].shape == (b,) and got["anomaly_map"].shape == (b, 1, 240, 240)
        assert got["score_map_max"].shape == (b,)
        for k in ("score", "anomaly_map", "score_map_max"):
            assert np.abs(got[k] - ref[k][:b]).max() < 1e-4, k
    report = json.loads((bundle / "export_report.json").read_text())
    assert report["variants"]["fp32"]["vs_pytorch"]["score"]["max_abs"] < 1e-4
    assert report["variants"]["fp32"]["vs_pytorch_batch1"]["anomaly_map"]["p99_abs"] < 1e-4


def test_graph_has_no_text_tower_and_a_baked_dt(bundle):
    g = onnx.load(str(bundle / "model.onnx"))
    names = {i.name for i in g.graph.initializer}
    assert "dt" in names
    assert not any(
        "token_embedding" in n or "transformer.resblocks" in n and "visual" not in n for n in names
    )
    assert [i.name for i in g.graph.input] == ["image"]
    assert [o.name for o in g.graph.output] == ["score", "anomaly_map", "score_map_max"]


def test_fp16_io_is_float32_and_islands_stay_fp32(bundle):
    g = onnx.load(str(bundle / "model_fp16.onnx"))
    assert all(
        t.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        for t in list(g.graph.input) + list(g.graph.output)
    )
    assert any(
        i.data_type == onnx.TensorProto.FLOAT16 for i in g.graph.initializer
    )  # it is really FP16 inside
    inferred = onnx.shape_inference.infer_shapes(g)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    for node in g.graph.node:
        if node.op_type in ("LayerNormalization", "ReduceL2", "Sigmoid", "Resize"):
            assert all(types.get(o, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for o in node.output), (
                node.name
            )
    x = np.random.default_rng(1).random((2, 3, 240, 240), dtype=np.float32)
    got, ref = _ort(bundle / "model_fp16.onnx", x, fp16=True), _ort(bundle / "model.onnx", x)
    assert all(v.dtype == np.float32 for v in got.values())
    assert np.abs(got["score"] - ref["score"]).max() < 1e-2
    assert np.percentile(np.abs(got["anomaly_map"] - ref["anomaly_map"]), 99) < 1e-2


def test_int8_parity_bound(bundle):
    x = np.random.default_rng(2).random((2, 3, 240, 240), dtype=np.float32)
    got, ref = _ort(bundle / "model_int8.onnx", x), _ort(bundle / "model.onnx", x)
    assert np.abs(got["score"] - ref["score"]).max() < 0.1
    assert np.percentile(np.abs(got["anomaly_map"] - ref["anomaly_map"]), 99) < 0.1
    g = onnx.load(str(bundle / "model_int8.onnx"))
    assert any(i.data_type == onnx.TensorProto.INT8 for i in g.graph.initializer)  # signed weights
    report = json.loads((bundle / "export_report.json").read_text())["variants"]["int8"]
    assert {"errors", "decision_flips", "auroc_change"} <= set(report)


def test_metadata_schema_checksums_and_calibration(bundle):
    b = load_bundle(bundle, verify=True)
    meta = b.meta
    assert meta["schema_version"] == 2 and "not for clinical decisions" in meta["intended_use"]
    assert meta["models"] == {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx"}
    for rel in (
        "model.onnx",
        "model_fp16.onnx",
        "model_int8.onnx",
        "golden.npz",
        "export_report.json",
        "triton/madclip/config.pbtxt",
    ):
        assert rel in meta["files"] and len(meta["files"][rel]["sha256"]) == 64
    assert meta["max_batch"] == 4 and meta["opset"] == 18 and meta["method"] == "madclip"
    assert meta["outputs"]["score"]["range"] == [0.0, 4.0] and meta["outputs"]["anomaly_map"]["range"] == [
        0.0,
        4.0,
    ]
    assert meta["provenance"]["backbone"] == "madclip-tiny" and meta["provenance"]["objective"] == "Brain"
    cal = meta["calibration"]
    assert 0.0 <= cal["threshold"] <= 4.0 and cal["score_name"] == "score" and "Youden" in cal["method"]
    assert meta["preprocess"]["image_size"] == 240 and meta["preprocess"]["normalize"] == "none"
    with np.load(b.golden_path, allow_pickle=False) as g:
        assert g["image"].shape[1:] == (3, 240, 240) and g["anomaly_map"].shape[0] == g["image"].shape[0]
        assert set(np.unique(g["labels"])) <= {0, 1}


def test_tampered_model_is_detected(bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    data = bytearray((copy / "model_fp16.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model_fp16.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model_fp16.onnx"):
        load_bundle(copy, verify=True)


def test_failed_export_leaves_nothing_and_keeps_a_good_bundle(run_dir, bundle, tmp_path):
    out = tmp_path / "b"
    with pytest.raises(ParityError):
        export_bundle(ExportOptions(run=str(run_dir), out=str(out), fp32_tolerance=-1.0))
    assert list(tmp_path.iterdir()) == []  # no bundle, no temp directory
    good = tmp_path / "good"
    shutil.copytree(bundle, good)
    before = (good / "metadata.json").read_text()
    with pytest.raises(ParityError):
        export_bundle(ExportOptions(run=str(run_dir), out=str(good), force=True, fp32_tolerance=-1.0))
    assert (good / "metadata.json").read_text() == before
    load_bundle(good, verify=True)
    from madclip_export.cli import main

    assert main([str(run_dir), "--out", str(good)]) == 2  # exists, no --force


def test_triton_config_is_a_valid_model_config(bundle):
    text_format = pytest.importorskip("google.protobuf.text_format")
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    cfg = text_format.Parse(
        (bundle / "triton/madclip/config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 4
    assert cfg.input[0].name == "image" and list(cfg.input[0].dims) == [3, 240, 240]
    assert [o.name for o in cfg.output] == ["score", "anomaly_map", "score_map_max"]
    assert list(cfg.output[0].reshape.shape) == [] and list(cfg.output[1].dims) == [1, 240, 240]
    assert cfg.HasField("dynamic_batching") and max(cfg.dynamic_batching.preferred_batch_size) <= 4
    g = onnx.load(str(bundle / "triton/madclip/1/model.onnx"))
    assert [i.name for i in g.graph.input] == [i.name for i in cfg.input]


def test_engine_flag_without_tensorrt_is_one_line(run_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    from madclip_export.cli import main

    assert main([str(run_dir), "--out", str(tmp_path / "b"), "--engine"]) == 2
    err = capsys.readouterr().err
    assert "TensorRT" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()
