"""The FP16-flag FP32 tail of every method, on the network TensorRT's ONNX parser builds from the method's real
exported graph (tiny config; tests/trt_fakes.py reproduces the parser's naming and reshapes).

For each method (MadCLIP, MVFA, MediCLIP, APRIL-GAN) the layers the builder pins must be exactly the score
head the FP16 ONNX conversion keeps in FP32 (madclip_export/fp16.py `head_nodes`, from the bundle's `fp32_islands`) plus
the type/name islands (`trt_rules.fp32_island`); no other matmul (backbone, MVFA's memory bank) is pinned.
"""

from __future__ import annotations

import json

import pytest

from madclip_runtime.engines import trt_engine as te
from madclip_runtime.engines import trt_rules as tr

from . import trt_fakes
from .trt_fakes import FakeTrt, LayerType

pytest.importorskip("onnx")
pytest.importorskip("torch")

METHODS = ("madclip", "mvfa", "mediclip", "aprilgan")


@pytest.fixture(scope="module")
def method_bundles(exported_tiny_bundle, tmp_path_factory):
    """One tiny bundle per method: MadCLIP's is the suite's shared one; the others are trained 1 epoch on the
    generated demo data and exported FP32 (`--method mvfa` / `mediclip` / `aprilgan`)."""
    from madclip_export.export import ExportOptions, export_bundle
    from madclip_train.demo import generate_demo
    from madclip_train.run import TrainRequest, train_run

    base = tmp_path_factory.mktemp("trt_methods")
    root = generate_demo(base / "data", n_valid=3, n_test=3, seed=11)
    out = {"madclip": exported_tiny_bundle}
    for method in METHODS[1:]:
        run = base / f"run-{method}"
        train_run(
            TrainRequest(
                data=str(root),
                out=str(run),
                method=method,
                shots=2,
                epochs=1,
                backbone="madclip-tiny",
                pretrained="none",
                device="cpu",
            )
        )
        bundle = base / f"bundle-{method}"
        export_bundle(ExportOptions(run=str(run), out=str(bundle), max_batch=2))
        out[method] = bundle
    return out


def _pinned(network) -> dict[str, object]:
    """name -> layer for the layers pinned to FP32 (precision and every output type)."""
    out = {}
    for impl in network.layers():
        if impl.output_types:
            assert set(impl.output_types.values()) == {FakeTrt.float32}
            assert impl.type == LayerType.CONSTANT or impl.precision == FakeTrt.float32
            out[impl.name] = impl
    return out


@pytest.mark.parametrize("method", METHODS)
def test_tail_pinned_by_structure_for_every_method(method, method_bundles):
    import onnx

    from madclip_export.fp16 import head_nodes

    bundle = method_bundles[method]
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["method"] == method
    islands = tuple(meta["fp32_islands"])
    model = onnx.load(str(bundle / "model.onnx"))
    network = trt_fakes.parse(bundle / "model.onnx")
    layers = {impl.name: impl for impl in network.layers()}

    pinned_count = te.constrain_fp32_islands(FakeTrt, network, islands)
    pinned = _pinned(network)
    assert pinned_count == len(pinned) > 0

    # The island constants as the parser leaves them: layers named after the initializers, unnamed tensors;
    # every one present in the graph is found and pinned.
    initializers = {i.name for i in model.graph.initializer}
    present = [c for c in islands if c in initializers]
    assert present, f"{method}: none of {islands} is an initializer of the exported graph"
    for name in present:
        assert layers[name].type == LayerType.CONSTANT and layers[name].outputs[0].name != name
        assert name in pinned

    # The head the FP16 ONNX conversion keeps FP32: every node of it with a float output is pinned here.
    float_outputs = {
        vi.name
        for vi in onnx.shape_inference.infer_shapes(model).graph.value_info
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    }
    float_outputs |= {o.name for o in model.graph.output}
    head = [n for n in model.graph.node if n.name in set(head_nodes(model, islands))]
    assert head
    missed = [n.name for n in head if all(o in float_outputs for o in n.output) and n.name not in pinned]
    assert missed == [], f"{method}: head nodes left to FP16: {missed}"

    # Nothing else: every pinned node layer is in the head or a type/name island; no other matmul is pinned.
    head_names = {n.name for n in head}
    nodes = {n.name: n for n in model.graph.node}
    for name, impl in pinned.items():
        if name in nodes and name not in head_names:
            assert impl.type != LayerType.MATRIX_MULTIPLY, f"{method}: backbone matmul {name} pinned"
            assert tr.fp32_island(impl.type.name, name, constant_divisor=False), name
    backbone_mm = [
        impl.name
        for impl in network.layers()
        if impl.type == LayerType.MATRIX_MULTIPLY and impl.name not in head_names
    ]
    assert backbone_mm and not set(backbone_mm) & set(pinned)


@pytest.mark.parametrize("method", ("mvfa", "aprilgan"))
def test_bank_matmuls_stay_fp16_and_the_tail_is_found(method, method_bundles):
    """The memory-bank methods: the tail starts at `text` (zero-shot map; APRIL-GAN's text probability too) and
    `one` (1 - max similarity); the memory-bank matmuls (the largest constants) stay FP16; the old tensor-name
    rule found none of it."""
    bundle = method_bundles[method]
    islands = tuple(json.loads((bundle / "metadata.json").read_text())["fp32_islands"])
    network = trt_fakes.parse(bundle / "model.onnx")
    old_starts = [
        network.get_layer(i).name
        for i in range(network.num_layers)
        if any(
            tr_name in islands
            for tr_name in (
                network.get_layer(i).get_input(j).name for j in range(network.get_layer(i).num_inputs)
            )
        )
    ]
    assert old_starts == []  # no layer input TENSOR carries an island name
    te.constrain_fp32_islands(FakeTrt, network, islands)
    pinned = _pinned(network)
    assert {"text", "one"} <= set(pinned)
    layers = network.layers()
    producers = {t.name: impl for impl in layers for t in impl.outputs}
    for impl in layers:
        if impl.type != LayerType.MATRIX_MULTIPLY:
            continue
        sources = []
        for t in impl.inputs:
            src = producers.get(t.name)
            while src is not None and src.type == LayerType.SHUFFLE:
                src = producers.get(src.inputs[0].name)
            sources.append(src.name if src is not None and src.type == LayerType.CONSTANT else None)
        if any(s and s.startswith("bank_") for s in sources):
            assert impl.name not in pinned, f"bank matmul {impl.name} pinned to FP32"
        if "text" in sources:
            assert impl.name in pinned
