"""Issue 20 item 8: FP16 bundles compute their tail and their outputs in FP32.

The mixed-precision graph of every method (MadCLIP, MVFA, MediCLIP) keeps every tensor downstream of the
method's island constants float32 up to the outputs (no FP16 edge, no FP32 -> FP16 -> FP32 round trip), so
the FP16 map differs from the FP32 map only by what the FP16 body changes, never by FP16 rounding of the
output: its values are not on FP16's grid and it has about as many distinct values as the FP32 map."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxconverter_common")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from madclip_export import fp16  # noqa: E402

from .conftest import realscans_or_skip  # noqa: E402


def tail_fp16_tensors(model, constants) -> list[str]:
    """Float tensors downstream of the island constants (the FP32 tail, outputs included) typed FP16."""
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.value_info, *inferred.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    tainted = {c for c in types if any(c == k or c.startswith(k + "_fp32island") for k in constants)}
    assert tainted, f"none of {constants} is an initializer of the graph"
    bad = [c for c in tainted if types.get(c) == TensorProto.FLOAT16]
    for node in model.graph.node:  # topologically sorted
        if any(i in tainted for i in node.input):
            tainted.update(node.output)
            bad += [o for o in node.output if types.get(o) == TensorProto.FLOAT16]
    return bad


def on_fp16_grid(x: np.ndarray) -> float:
    """Fraction of the values that are exactly FP16 numbers (1.0 for a map rounded to FP16 on the way out)."""
    return float(np.mean(x == x.astype(np.float16).astype(np.float32)))


def _session(model):
    opts = ort.SessionOptions()
    # ORT_ENABLE_EXTENDED: the runtime's setting for FP16 graphs on the CPU
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _head_model():
    """image [N, 8] -> FP16-able body (MatMul, Tanh) -> L2 normalise -> dot with dt -> Sigmoid = anomaly_map,
    also read by a Mul (an output another node consumes: the case whose Identity used to be converted)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (8, 8)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.05, (8, 64)).astype(np.float32), "dt"),
        numpy_helper.from_array(np.array([-1], np.int64), "axis"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
    ]
    nodes = [
        helper.make_node("MatMul", ["image", "w"], ["h"], name="mm"),
        helper.make_node("Tanh", ["h"], ["t"], name="body_tanh"),
        helper.make_node("ReduceL2", ["t", "axis"], ["norm"], keepdims=1, name="l2"),
        helper.make_node("Div", ["t", "norm"], ["unit"], name="l2_div"),
        helper.make_node("MatMul", ["unit", "dt"], ["logit"], name="head_dot"),
        helper.make_node("Sigmoid", ["logit"], ["anomaly_map"], name="head_sigmoid"),
        helper.make_node("Mul", ["anomaly_map", "two"], ["score"], name="head_double"),
    ]
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 8])],
        [
            helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["n", 64]),
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["n", 64]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_head_and_outputs_stay_float32_in_a_small_graph():
    model = _head_model()
    mixed = fp16.to_mixed_fp16(model, ("dt",))
    assert tail_fp16_tensors(mixed, ("dt",)) == []
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in mixed.graph.output)
    assert any(i.data_type == TensorProto.FLOAT16 for i in mixed.graph.initializer)  # the body is FP16
    x = np.random.default_rng(1).normal(0, 1, (16, 8)).astype(np.float32)
    ref, got = _session(model).run(None, {"image": x}), _session(mixed).run(None, {"image": x})
    for r, g in zip(ref, got):
        assert g.dtype == np.float32
        assert on_fp16_grid(g) < 0.2  # not rounded to FP16 on the way out
        assert len(np.unique(g)) > 0.9 * len(np.unique(r))
        # the body's FP16 error (tanh of a 8-term dot product) passes through the sigmoid's slope <= 1/4
        assert np.abs(g - r).max() < 2e-3


def test_remove_round_trips_keeps_fp16_consumers():
    """A float32 -> float16 -> float32 pair is dropped; an FP16 reader of the middle tensor keeps it."""
    inits = [numpy_helper.from_array(np.array(3.0, np.float16), "k")]
    nodes = [
        helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16, name="down"),
        helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT, name="up"),
        helper.make_node("Mul", ["h", "k"], ["z16"], name="fp16_user"),
        helper.make_node("Cast", ["z16"], ["z"], to=TensorProto.FLOAT, name="z_up"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [4]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [4]),
        ],
        inits,
    )
    model = fp16.remove_round_trips(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    ops = {n.name: n.op_type for n in model.graph.node}
    assert ops == {"down": "Cast", "up": "Identity", "fp16_user": "Mul", "z_up": "Cast"}
    x = np.array([1.0001, 2.0003, 0.1, 1e-3], np.float32)
    y, z = _session(model).run(None, {"x": x})
    np.testing.assert_array_equal(y, x)
    np.testing.assert_allclose(z, 3 * x, rtol=2e-3)


@pytest.fixture(scope="module", params=["madclip", "mvfa", "mediclip"])
def method_graphs(request, tmp_path_factory):
    """(method, FP32 ONNX, mixed FP16 ONNX, island constants, real test scans) for a 1-epoch tiny run."""
    from madclip_export.export import export_onnx
    from madclip_train.data import load_arrays, load_split
    from madclip_train.run import TrainRequest, train_run
    from madclip_train.rundir import load_run

    root = realscans_or_skip("Brain_AD")
    base = tmp_path_factory.mktemp(f"fp16_{request.param}")
    train_run(
        TrainRequest(
            data=str(root),
            out=str(base / "run"),
            method=request.param,
            shots=2,
            epochs=1,
            backbone="madclip-tiny",
            pretrained="none",
            device="cpu",
        )
    )
    model, _ = load_run(base / "run")
    model.eval()
    export_onnx(model, base / "model.onnx", 4, 18)
    fp32 = onnx.load(str(base / "model.onnx"))
    islands = tuple(model.fp32_island_constants)
    mixed = fp16.to_mixed_fp16(fp32, islands)
    test = load_split(str(root), "test")
    images, _, _ = load_arrays(test.abnormal[:2] + test.normal[:1], model.cfg.preprocess)
    return request.param, fp32, mixed, islands, images


def test_every_method_keeps_its_tail_float32_to_the_outputs(method_graphs):
    method, _, mixed, islands, _ = method_graphs
    assert tail_fp16_tensors(mixed, islands) == [], method
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in mixed.graph.output)


def test_every_method_fp16_map_is_not_rounded_to_fp16(method_graphs):
    """On real scans: the FP16 map is off FP16's grid and keeps (nearly) the FP32 map's distinct values; the
    score error stays within the map error (both come from the FP16 body, nothing is added at the end)."""
    method, fp32, mixed, _, images = method_graphs
    names = [o.name for o in fp32.graph.output]
    ref = dict(zip(names, _session(fp32).run(None, {"image": images})))
    got = dict(zip(names, _session(mixed).run(None, {"image": images})))
    amap, amap32 = got["anomaly_map"][0, 0], ref["anomaly_map"][0, 0]
    assert on_fp16_grid(amap) < 0.5, method  # 1.0 before: every value rounded to FP16
    assert len(np.unique(amap)) > 0.5 * len(np.unique(amap32)), method  # MediCLIP had 17 of ~30000
    err = np.abs(got["anomaly_map"] - ref["anomaly_map"]).max()
    assert np.isfinite(err) and err < 0.05, method
    assert np.abs(got["score_map_max"] - ref["score_map_max"]).max() <= err + 1e-6, method


def test_fp16_outputs_benchmark_runs(exported_tiny_bundle, tmp_path):
    """benchmarks/fp16_outputs.py (the RESULTS.md figures) on a freshly exported bundle: the bundle's own FP16
    graph and the current conversion agree that nothing is rounded to FP16 on the way out."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    env = {**os.environ, "MADCLIP_BENCH_RESULTS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(bench / "fp16_outputs.py"), str(exported_tiny_bundle)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "fp16_outputs.json").read_text())["results"]
    assert {r["graph"] for r in rows} == {"bundle's model_fp16.onnx", "current exporter"}
    for r in rows:
        assert r["share_on_fp16_grid"] < 0.5 and r["map_max_abs_err"] < 0.05
        assert r["distinct_values_first_map"] > 0.5 * r["fp32_distinct_values_first_map"]
