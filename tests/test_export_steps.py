"""madclip-export as named steps over an `ExportState` (issue 22, item 6): each step on its own.

Steps that need the PyTorch model start from the suite's tiny MadCLIP run (`trained_tiny_run`); the ONNX steps
(parity gate, FP16, INT8, engine, Triton, writing the bundle) run on conftest's tiny hand-built graph, whose
outputs numpy computes (`reference_outputs`), so each is checked without an export before it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from madclip_export import export as ex
from madclip_export.export import ExportOptions, ExportState, ParityError
from madclip_runtime.contract import (
    ANOMALY_MAP,
    FP16,
    FP32,
    GOLDEN_FILE,
    INT8,
    MODEL_FILES,
    OUTPUT_NAMES,
    REPORT_FILE,
    SCORE,
    SCORE_MAP_MAX,
)
from madclip_runtime.errors import MadclipError
from madclip_runtime.preprocess import PreprocessSpec

from .conftest import SIZE, images, make_tiny_model, reference_outputs

ISLANDS = ("scales",)  # the tiny graph's Resize scales: the Resize and everything after it is its "FP32 tail"


def test_the_pipeline_is_the_named_steps_in_order():
    names = [s.__name__ for s in ex.STEPS]
    assert names == [
        "load_run_step",
        "pytorch_reference_step",
        "calibrate_step",
        "golden_reference_step",
        "export_fp32_step",
        "fp32_parity_step",
        "fp16_step",
        "engine_step",
        "int8_step",
        "openvino_step",
        "triton_step",
        "write_bundle_step",
    ]


def test_prepare_refuses_bad_options_before_any_work(tmp_path):
    with pytest.raises(MadclipError, match="--max-batch"):
        ex.prepare(ExportOptions(run=str(tmp_path), out=str(tmp_path / "b"), max_batch=0))
    with pytest.raises(MadclipError):
        ex.prepare(ExportOptions(run=str(tmp_path), out=str(tmp_path / "b"), sign=str(tmp_path / "no.key")))
    st = ex.prepare(ExportOptions(run=str(tmp_path), out=str(tmp_path / "b")))
    assert st.report == {"run": str(tmp_path), "variants": {}} and st.signing_key is None
    assert not (tmp_path / "b").exists()


# ---- the steps that need the PyTorch model -----------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(trained_tiny_run) -> ExportState:
    st = ex.prepare(ExportOptions(run=str(trained_tiny_run), out="unused", max_batch=4))
    ex.load_run_step(st)
    return st


def test_load_run_step(loaded):
    st = loaded
    assert st.model is not None and not st.model.training and st.run_dir == Path(st.opts.run)
    assert set(st.method_meta) == {"method", "ranges", "meanings", "provenance", "fp32_islands"}
    assert st.method_meta["fp32_islands"] == st.model.fp32_island_constants
    assert st.shots and st.golden[0] in st.shots  # the golden set starts with shots, then test images
    assert st.spec.image_size == st.model.image_size


def test_pytorch_reference_step(loaded):
    st = copy.copy(loaded)
    ex.pytorch_reference_step(st)
    n, s = len(st.shots), st.model.image_size
    assert st.shot_images.shape == (n, 3, s, s) and st.shot_labels.shape == (n,)
    assert st.shot_out[SCORE].shape == (n,) and st.shot_out[ANOMALY_MAP].shape == (n, 1, s, s)
    assert st.calibration_note is None  # MadCLIP calibrates on its labelled shots as they are


def test_golden_reference_step(loaded):
    st = copy.copy(loaded)
    ex.golden_reference_step(st)
    assert st.golden_images.shape[0] == len(st.golden) == len(st.golden_labels)
    again = ex.torch_outputs(st.model, st.golden_images[:2])
    for name in OUTPUT_NAMES:
        np.testing.assert_array_equal(st.torch_ref[name][:2], again[name])


def test_export_fp32_step_consumes_the_model(trained_tiny_run, tmp_path):
    st = ex.prepare(ExportOptions(run=str(trained_tiny_run), out="unused", max_batch=2))
    ex.load_run_step(st)
    st.tmp = tmp_path
    ex.export_fp32_step(st)
    graph = onnx.load(str(tmp_path / MODEL_FILES[FP32]))
    assert [o.name for o in graph.graph.output] == list(OUTPUT_NAMES)
    assert st.opset == 18 and st.model is None and st.report["export_seconds"] >= 0


# ---- calibration (numbers only) ----------------------------------------------------------------------------


def _calib_state(calib: str | None = None, note: str | None = None) -> ExportState:
    st = ExportState(opts=ExportOptions(run="r", out="o", calib=calib))
    scores = np.array([0.1, 0.2, 0.8, 0.9], np.float32)
    maps = np.zeros((4, 1, 8, 8), np.float32)
    maps[2:, 0, 2:4, 2:4] = 0.9
    st.shot_out = {SCORE: scores, SCORE_MAP_MAX: maps.reshape(4, -1).max(1), ANOMALY_MAP: maps}
    st.shot_masks = maps[:, 0] > 0.5
    st.shot_labels = np.array([0, 0, 1, 1])
    st.has_masks_data, st.calibration_note = True, note
    st.shots = [None] * 4
    st.method_meta = {"ranges": {SCORE: (0.0, 1.0), ANOMALY_MAP: (0.0, 1.0)}}
    return st


def test_calibrate_step():
    st = _calib_state()
    ex.calibrate_step(st)
    assert st.calibration["threshold"] == pytest.approx(0.5) and st.calibration["n_shots"] == 4
    assert st.calibration["map_scale"] == [0.0, 1.0] and "shots" in st.calibration["method"]
    st = _calib_state(calib="/data/x", note="synthetic anomalies added")
    ex.calibrate_step(st)
    assert st.calibration["method"].startswith(
        "Youden's J maximised over midpoints of the image scores of 4 "
        "labelled --calib images (/data/x, split valid)"
    )
    assert st.calibration["method"].endswith("; synthetic anomalies added")


# ---- the ONNX steps on the tiny hand-built graph -----------------------------------------------------------


def _onnx_state(tmp_path: Path, **opts) -> ExportState:
    onnx.save(make_tiny_model(), str(tmp_path / MODEL_FILES[FP32]))
    st = ExportState(
        opts=ExportOptions(run="r", out="o", max_batch=4, **opts),
        tmp=tmp_path,
        report={"run": "r", "variants": {}},
    )
    st.golden_images = images(3)
    st.golden_labels = np.array([0, 1, -1])
    st.torch_ref = {k: v.astype(np.float32) for k, v in reference_outputs(st.golden_images).items()}
    st.calibration = {"threshold": 0.5, "threshold_score_map_max": 0.6}
    st.method_meta = {
        "method": "madclip",
        "fp32_islands": ISLANDS,
        "ranges": {SCORE: (0.0, 1.0), ANOMALY_MAP: (0.0, 1.0)},
        "meanings": {},
        "provenance": {},
    }
    st.spec = PreprocessSpec(image_size=SIZE)
    return st


def test_fp32_parity_step_passes_and_gates(tmp_path):
    st = _onnx_state(tmp_path)
    ex.fp32_parity_step(st)
    v = st.report["variants"][FP32]
    assert v["vs_pytorch"][SCORE]["max_abs"] < 1e-5 and v["vs_pytorch_batch1"][SCORE]["max_abs"] < 1e-5
    assert st.models == {FP32: MODEL_FILES[FP32]} and st.fp32[SCORE].shape == (3,)
    bad = _onnx_state(tmp_path)
    bad.torch_ref = {**bad.torch_ref, SCORE: bad.torch_ref[SCORE] + 1e-3}
    with pytest.raises(ParityError, match="FP32 ONNX parity failed: score max abs 1.00e-03"):
        ex.fp32_parity_step(bad)
    assert bad.models == {}


def test_fp16_step(tmp_path):
    st = _onnx_state(tmp_path)
    ex.fp32_parity_step(st)
    ex.fp16_step(st)  # without --fp16: nothing
    assert FP16 not in st.models and not (tmp_path / MODEL_FILES[FP16]).exists()
    st = _onnx_state(tmp_path, fp16=True)
    ex.fp32_parity_step(st)
    ex.fp16_step(st)
    graph = onnx.load(str(tmp_path / MODEL_FILES[FP16]))
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in graph.graph.output)
    v = st.report["variants"][FP16]
    assert v["reference"] == "onnx fp32" and v["errors"][ANOMALY_MAP]["max_abs"] < 1e-2
    assert st.models[FP16] == MODEL_FILES[FP16]


def test_engine_step(tmp_path, monkeypatch):
    st = _onnx_state(tmp_path)
    ex.engine_step(st)
    assert "tensorrt" not in st.report  # no --fp16: no engine
    st = _onnx_state(tmp_path, fp16=True)
    seen = {}

    def fake(tmp, opts, step, islands):
        seen.update(tmp=tmp, islands=islands)
        return {"built": False, "reason": "no TensorRT here"}

    monkeypatch.setattr(ex, "_maybe_build_engine", fake)
    ex.engine_step(st)
    assert st.report["tensorrt"]["built"] is False and seen == {"tmp": tmp_path, "islands": ISLANDS}


def test_int8_step(tmp_path):
    st = _onnx_state(tmp_path)
    ex.fp32_parity_step(st)
    ex.int8_step(st)
    assert INT8 not in st.models
    st = _onnx_state(tmp_path, int8=True)
    ex.fp32_parity_step(st)
    ex.int8_step(st)
    assert (tmp_path / MODEL_FILES[INT8]).is_file() and st.models[INT8] == MODEL_FILES[INT8]
    v = st.report["variants"][INT8]
    assert v["reference"] == "onnx fp32" and v["seconds_per_image_cpu"] > 0


def test_int8_keeps_the_methods_tail_out_of_quantisation(tmp_path):
    from madclip_export.int8 import int8_excluded_nodes, quantize_int8

    graph = make_tiny_model()
    assert int8_excluded_nodes(graph, ISLANDS) == ["upsample", "sigmoid", "map_out", "score_mean", "map_max"]
    assert int8_excluded_nodes(graph, ("no_such_constant",)) == []
    onnx.save(graph, str(tmp_path / "m.onnx"))
    with pytest.raises(ValueError, match="fp32_island_constants"):
        quantize_int8(tmp_path / "m.onnx", tmp_path / "q.onnx", ())


def test_triton_step(tmp_path):
    st = _onnx_state(tmp_path)
    ex.triton_step(st)
    assert "triton" not in st.report and not (tmp_path / "triton").exists()
    st = _onnx_state(tmp_path, triton=True)
    ex.triton_step(st)
    assert st.report["triton"] == "triton/madclip"
    assert (tmp_path / "triton" / "madclip" / "1" / MODEL_FILES[FP32]).is_file()
    assert f"dims: [ 3, {SIZE}, {SIZE} ]" in (tmp_path / "triton" / "madclip" / "config.pbtxt").read_text()


def test_write_bundle_step(tmp_path):
    from madclip_runtime.bundles.bundle import load_bundle

    st = _onnx_state(tmp_path)
    ex.fp32_parity_step(st)
    st.calibration = {
        "threshold": 0.5,
        "score_name": SCORE,
        "threshold_score_map_max": 0.6,
        "method": "test",
        "map_threshold": 0.7,
        "map_threshold_method": "test",
        "map_scale": [0.0, 1.0],
        "n_shots": 3,
    }
    st.golden = [SimpleNamespace(path=f"/data/img{i}.png") for i in range(3)]
    st.config = {
        "model": {"backbone": "tiny-graph", "pretrained": "none", "taps": [0], "quick_gelu": False},
        "train": {"shots": 1, "seed": 0},
    }
    st.run_dir, st.opset = tmp_path, 18
    st.extra_metadata = {"note_from_a_step": "kept"}
    ex.write_bundle_step(st)
    b = load_bundle(str(tmp_path))
    assert b.meta["note_from_a_step"] == "kept" and b.meta["models"] == {FP32: MODEL_FILES[FP32]}
    golden = np.load(tmp_path / GOLDEN_FILE)
    np.testing.assert_array_equal(golden[SCORE], st.torch_ref[SCORE])
    assert list(golden["sources"]) == ["img0.png", "img1.png", "img2.png"]
    report = json.loads((tmp_path / REPORT_FILE).read_text())
    assert report["calibration"] == st.calibration and MODEL_FILES[FP32] in report["sizes_bytes"]
