"""Mixed-precision (FP16 with FP32 islands) ONNX from the FP32 graph, IO kept float32.

FP32 islands (docs/export.md, "FP16"): LayerNorm (FP16 LayerNorm after attention overflows in TensorRT), the
adapter standardisation (a LayerNormalization node), the L2 normalisation (ReduceL2 / Clip / Expand and the
Div by the computed norm), every reduction, and the tail: the consumers of the method's baked constants and
everything downstream of them up to the graph outputs. onnxconverter-common keeps these in FP32 via op/node
block lists; `fix_output_casts` re-establishes float32 outputs where `keep_io_types=True` leaves one FP16, and
`remove_round_trips` drops the float32 -> float16 -> float32 Cast pairs the converter leaves between FP32
nodes, so no value of the tail (and no output) is rounded to FP16.
"""

from __future__ import annotations

import logging
import warnings

import onnx
from onnx import TensorProto, helper

log = logging.getLogger(__name__)

# Kept FP32 by op type. Not here, on purpose: Sigmoid (QuickGELU in every block is fine in FP16; the head's
# sigmoid is FP32 as part of `head_nodes`), Erf (exact GELU: bounded, fine in FP16) and Div (only divisions by
# a computed value, i.e. the L2 normalisation, stay FP32: `computed_divisions`; GELU's / sqrt(2) and attention
# scaling divide by constants). Each of those used to be FP32 and cost two Casts per block
# (benchmarks/fp16_islands.py measures it, benchmarks/RESULTS.md has the figures).
FP32_OPS = [
    "LayerNormalization",
    "ReduceL2",
    "ReduceMean",
    "ReduceMax",
    "ReduceSum",
    "ReduceSumSquare",
    "Sqrt",
    "Pow",
    "Resize",
    "Clip",
    "Expand",
]


def head_nodes(model: onnx.ModelProto, constants: tuple[str, ...]) -> list[str]:
    """Names of the score-head nodes: those reading one of the method's `fp32_island_constants` (MadCLIP: the
    text difference dt, read by the dot products) and everything downstream of them (negation, difference,
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


def output_producers(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes writing graph outputs: the last step of every output is computed in FP32, so no
    output is rounded to FP16 whatever the method's islands are."""
    outputs = {o.name for o in model.graph.output}
    return [n.name for n in model.graph.node if outputs & set(n.output)]


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
            if (
                not producers
                or out.name not in vi
                or vi[out.name].type.tensor_type.elem_type != TensorProto.FLOAT16
            ):
                continue
        inner = out.name + "_fp16"
        for node in graph.node:
            node.output[:] = [inner if o == out.name else o for o in node.output]
            node.input[:] = [inner if i == out.name else i for i in node.input]
        graph.node.append(
            helper.make_node(
                "Cast", [inner], [out.name], to=TensorProto.FLOAT, name=f"cast_output_{out.name}"
            )
        )
        out.type.tensor_type.elem_type = TensorProto.FLOAT
        log.debug("inserted float32 cast for output %s", out.name)
    return model


def _is_cast(node: onnx.NodeProto, to: int) -> bool:
    return node.op_type == "Cast" and any(a.name == "to" and a.i == to for a in node.attribute)


def remove_round_trips(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop every float32 -> float16 -> float32 Cast pair: the FP32 consumer reads the float32 tensor itself.

    onnxconverter-common wraps each blocked (FP32) node in Casts and keeps some edges between two FP32 nodes
    in FP16 (an edge with several consumers, a graph output it re-types), so values inside the FP32 tail were
    rounded to FP16 on the way (a MediCLIP map had 7 distinct values). Removing the pair only removes a
    rounding: FP16 consumers keep reading the FP16 tensor."""
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({i.name: i.data_type for i in graph.initializer})
    producer = {o: n for n in graph.node for o in n.output}
    removed = 0
    for node in graph.node:
        if not _is_cast(node, TensorProto.FLOAT):
            continue
        down = producer.get(node.input[0])
        if (
            down is None
            or not _is_cast(down, TensorProto.FLOAT16)
            or types.get(down.input[0]) != TensorProto.FLOAT
        ):
            continue
        node.op_type, node.input[0] = "Identity", down.input[0]  # keeps its output name (maybe an output)
        del node.attribute[:]
        removed += 1
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    while True:  # drop Casts nobody reads any more
        dead = [n for n in graph.node if n.op_type == "Cast" and not set(n.output) & used]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    log.debug("FP16: removed %d float32 -> float16 -> float32 round trips", removed)
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


def unshare_initializers(
    model: onnx.ModelProto, blocked_nodes: set[str], blocked_ops: set[str]
) -> onnx.ModelProto:
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
    del model.graph.value_info[:]  # stale exporter value_info makes the converter emit mistyped edges
    model = isolate_outputs(model)
    # The block list is computed on the final node set: the output Identity nodes added above are part of the
    # FP32 tail (computed before them, they were converted and every output went through a Cast to FP16).
    node_block = list(
        dict.fromkeys(
            head_nodes(model, tuple(island_constants)) + computed_divisions(model) + output_producers(model)
        )
    )
    model = unshare_initializers(model, set(node_block), set(FP32_OPS))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=FP32_OPS,
            node_block_list=node_block,
            disable_shape_infer=False,
        )
    if caught:  # one line per tiny weight otherwise; FP16 has no such magnitudes (smallest normal 6e-5)
        log.debug(
            "FP16 conversion: %d FP16-body constants below FP16's range were clamped by "
            "onnxconverter-common (e.g. %s)",
            len(caught),
            caught[0].message,
        )
    # Declared output types can lie after conversion: mark any output whose producer is FP16 and fix it.
    for name, elem in _output_elem_types(converted).items():
        if elem == TensorProto.FLOAT16:
            for o in converted.graph.output:
                if o.name == name:
                    o.type.tensor_type.elem_type = TensorProto.FLOAT16
    converted = remove_round_trips(fix_output_casts(converted))
    for o in converted.graph.output:
        if o.type.tensor_type.elem_type != TensorProto.FLOAT:
            raise RuntimeError(f"FP16 conversion left output {o.name} as {o.type.tensor_type.elem_type}")
    return converted
