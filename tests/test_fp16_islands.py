"""Defect 6 (ONNX side): the mixed-precision conversion keeps only real FP32 islands; backbone sigmoids
(QuickGELU), erf (GELU) and divisions by constants go FP16, divisions by a computed norm stay FP32."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxconverter_common")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from madclip_export import fp16  # noqa: E402


def _model():
    """x -> MatMul -> QuickGELU (x*sigmoid(1.702x)) -> GELU via erf(x / sqrt2) -> L2 normalise (Div by norm)
    -> dot with dt -> Sigmoid (the head)."""
    inits = [
        numpy_helper.from_array(np.eye(8, dtype=np.float32), "w"),
        numpy_helper.from_array(np.array(1.702, np.float32), "k"),
        numpy_helper.from_array(np.array(1.4142135, np.float32), "sqrt2"),
        numpy_helper.from_array(np.ones((8, 1), np.float32), "dt"),
        numpy_helper.from_array(np.array([-1], np.int64), "axis"),
    ]
    nodes = [
        helper.make_node("MatMul", ["image", "w"], ["h"], name="mm"),
        helper.make_node("Mul", ["h", "k"], ["hk"], name="qg_scale"),
        helper.make_node("Sigmoid", ["hk"], ["s"], name="qg_sigmoid"),
        helper.make_node("Mul", ["h", "s"], ["g"], name="qg_mul"),
        helper.make_node("Div", ["g", "sqrt2"], ["gd"], name="gelu_div"),
        helper.make_node("Erf", ["gd"], ["e"], name="gelu_erf"),
        helper.make_node("Mul", ["g", "e"], ["ge"], name="gelu_mul"),
        helper.make_node("ReduceL2", ["ge", "axis"], ["norm"], keepdims=1, name="l2"),
        helper.make_node("Div", ["ge", "norm"], ["unit"], name="l2_div"),
        helper.make_node("MatMul", ["unit", "dt"], ["logit"], name="head_dot"),
        helper.make_node("Sigmoid", ["logit"], ["score"], name="head_sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [2, 1])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _fp32_nodes(converted) -> set[str]:
    """Nodes computing in FP32: those whose float inputs are not FP16 after conversion (by inferred types)."""
    inferred = onnx.shape_inference.infer_shapes(converted)
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    return {
        n.name
        for n in inferred.graph.node
        if n.op_type != "Cast" and any(types.get(i) == TensorProto.FLOAT for i in n.input[:1])
    }


def test_only_real_islands_stay_fp32():
    model = _model()
    assert fp16.computed_divisions(model) == ["l2_div"]
    fp32 = _fp32_nodes(fp16.to_mixed_fp16(model, ("dt",)))
    assert {"l2", "l2_div", "head_dot", "head_sigmoid"} <= fp32
    assert not {"qg_sigmoid", "gelu_erf", "gelu_div", "mm"} & fp32
