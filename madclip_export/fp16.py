"""Mixed-precision (FP16 with FP32 islands) ONNX from the FP32 graph, IO kept float32.

FP32 islands (docs/ARCHITECTURE.md, "FP16"): LayerNorm (FP16 LayerNorm after attention overflows in TensorRT), the adapter standardisation (a
LayerNormalization node), the L2 normalisation (ReduceL2 / Clip / Expand and the Div by the computed norm), the
dot products with the baked dt and the whole head downstream of them (its sigmoid included), the upsampling
(Resize) and every reduction. onnxconverter-common keeps these in FP32 via op/node block lists; its
`keep_io_types=True` leaves a graph output FP16 when the output's producer is blocked, so `fix_output_casts`
re-establishes float32 outputs explicitly.
"""
from __future__ import annotations

import logging

import onnx
from onnx import TensorProto, helper

log = logging.getLogger(__name__)

# Kept FP32 by op type. Not here, on purpose: Sigmoid (QuickGELU in every block is fine in FP16; the head's
# sigmoid is FP32 as part of `head_nodes`), Erf (exact GELU: bounded, fine in FP16) and Div (only divisions by
# a computed value, i.e. the L2 normalisation, stay FP32: `computed_divisions`; GELU's / sqrt(2) and attention
# scaling divide by constants). Each of those used to be FP32 and cost two Casts per block
# (benchmarks/fp16_islands.py measures it, benchmarks/RESULTS.md has the figures).
FP32_OPS = ["LayerNormalization", "ReduceL2", "ReduceMean", "ReduceMax", "ReduceSum", "ReduceSumSquare", "Sqrt",
            "Pow", "Resize", "Clip", "Expand"]


def head_nodes(model: onnx.ModelProto, constants: tuple[str, ...] = ("dt",)) -> list[str]:
    """Names of the score-head nodes: those reading one of the method's baked constants (MadCLIP: the text
    difference dt, read by the dot products) and everything downstream of them (negation, difference,
    upsampling, sigmoid, sums, max): the whole head stays FP32."""
    tainted, names = set(constants), []
    for node in model.graph.node:  # ONNX nodes are topologically sorted
        if any(i in tainted for i in node.input):
            tainted.update(node.output)
            names.append(node.name)
    return names


def computed_divisions(model: onnx.ModelProto) -> list[str]:
    """Names of Div nodes whose divisor is computed (not an initializer or Constant output): normalisations."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "Div" and n.input[1] not in constants]


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give unnamed nodes a unique name (the converter's node block list matches by name)."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"_node_{i}_{node.op_type}"
    return model


def fix_output_casts(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make every graph output float32: insert a Cast where the converter left an FP16 output."""
    graph = model.graph
    for out in graph.output:
        if out.type.tensor_type.elem_type == TensorProto.FLOAT:
            producers = [n for n in graph.node if out.name in n.output]
            vi = {v.name: v for v in list(graph.value_info)}
            # the declared type may say float while the producer emits float16: inspect via inference below
            if not producers or out.name not in vi or vi[out.name].type.tensor_type.elem_type != TensorProto.FLOAT16:
                continue
        inner = out.name + "_fp16"
        for node in graph.node:
            node.output[:] = [inner if o == out.name else o for o in node.output]
            node.input[:] = [inner if i == out.name else i for i in node.input]
        graph.node.append(helper.make_node("Cast", [inner], [out.name], to=TensorProto.FLOAT,
                                           name=f"cast_output_{out.name}"))
        out.type.tensor_type.elem_type = TensorProto.FLOAT
        log.debug("inserted float32 cast for output %s", out.name)
    return model


def isolate_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every graph output its own Identity producer when other nodes also read it.

    onnxconverter-common mistypes edges that read a graph output (e.g. score_map_max's Reshape reading
    anomaly_map) once it inserts its float32 output casts; a dedicated Identity keeps outputs leaf tensors.
    """
    graph = model.graph
    outputs = {o.name for o in graph.output}
    consumed = {i for n in graph.node for i in n.input} & outputs
    for name in consumed:
        inner = name + "_internal"
        for node in graph.node:
            node.output[:] = [inner if o == name else o for o in node.output]
            node.input[:] = [inner if i == name else i for i in node.input]
        graph.node.append(helper.make_node("Identity", [inner], [name], name=f"output_{name}"))
    return model


def _output_elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    return {o.name: types.get(o.name, o.type.tensor_type.elem_type) for o in model.graph.output}


def unshare_initializers(model: onnx.ModelProto, blocked_nodes: set[str], blocked_ops: set[str]) -> onnx.ModelProto:
    """Give FP32-island consumers their own copy of any initializer also read by FP16 nodes.

    The ONNX exporter deduplicates equal constants (e.g. GELU's 0.5 and a head's 0.5 become one initializer);
    onnxconverter-common then keeps the shared initializer FP32 for the blocked consumer and the FP16 node reading
    it fails to type-check. A copy per side keeps both consistent."""
    init = {i.name: i for i in model.graph.initializer}
    users: dict[str, list] = {}
    for node in model.graph.node:
        for i in node.input:
            if i in init:
                users.setdefault(i, []).append(node)
    for name, nodes in users.items():
        blocked = [n for n in nodes if n.name in blocked_nodes or n.op_type in blocked_ops]
        if not blocked or len(blocked) == len(nodes):
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(init[name])
        copy.name = f"{name}_fp32island"
        model.graph.initializer.append(copy)
        for node in blocked:
            node.input[:] = [copy.name if i == name else i for i in node.input]
    return model


def to_mixed_fp16(model: onnx.ModelProto, island_constants: tuple[str, ...]) -> onnx.ModelProto:
    """FP32 ModelProto (weights loaded) -> mixed-precision ModelProto with float32 inputs and outputs; the
    consumers of `island_constants` (the method's `fp32_island_constants`) and all downstream stay FP32."""
    from onnxconverter_common import float16

    model = name_nodes(onnx.ModelProto.FromString(model.SerializeToString()))
    node_block = head_nodes(model, tuple(island_constants)) + computed_divisions(model)
    del model.graph.value_info[:]  # stale exporter value_info makes the converter emit mistyped edges
    model = isolate_outputs(model)
    model = unshare_initializers(model, set(node_block), set(FP32_OPS))
    converted = float16.convert_float_to_float16(
        model, keep_io_types=True, op_block_list=FP32_OPS, node_block_list=node_block, disable_shape_infer=False)
    # Declared output types can lie after conversion: mark any output whose producer is FP16 and fix it.
    for name, elem in _output_elem_types(converted).items():
        if elem == TensorProto.FLOAT16:
            for o in converted.graph.output:
                if o.name == name:
                    o.type.tensor_type.elem_type = TensorProto.FLOAT16
    converted = fix_output_casts(converted)
    for o in converted.graph.output:
        if o.type.tensor_type.elem_type != TensorProto.FLOAT:
            raise RuntimeError(f"FP16 conversion left output {o.name} as {o.type.tensor_type.elem_type}")
    return converted
