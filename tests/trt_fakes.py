"""A fake `tensorrt` that behaves like NVIDIA's bindings where madclip's builder depends on it (no GPU needed).

What it reproduces, each from the real source:

* `network.get_layer(i)` returns a plain `ILayer` (python/src/infer/pyGraph.cpp binds `getLayer` returning
  `ILayer*`): layer-specific attributes such as `IMatrixMultiplyLayer.op0` / `op1` do not exist until the
  object is re-classed (`layer.__class__ = trt.IMatrixMultiplyLayer`, as Polygraphy does in
  tools/Polygraphy/polygraphy/backend/trt/util.py). Every `get_layer` call returns a fresh `ILayer`, so a
  re-class done on one object is never seen through another.
* `FakeOnnxParser` builds the network the way onnx-tensorrt 10.x does (importerUtils.cpp, ImporterContext.cpp,
  onnxOpImporters.cpp, ModelImporter.cpp):
  - an initializer becomes a CONSTANT layer the first time a node reads it as a tensor (`convertToTensor`),
    named after the initializer (`registerLayer(constantLayer, weights.getName())`, uniquified with `_N`),
    while its output tensor keeps TensorRT's default name "(Unnamed Layer* N) [Constant]_output"; later
    readers reuse that layer (`getConstantLayer`);
  - a node's layer is named after the node (`getNodeName`: the name, or "node_of_<output>"), and the tensor a
    node returns is renamed to the ONNX output name (`registerTensor`); helper layers keep default names;
  - MatMul with a 1-D second operand and a higher-rank first: SHUFFLE "ONNXTRT_unsqueezeTensor" to [E, 1],
    then rank broadcast SHUFFLE "ONNXTRT_Broadcast" (leading 1s), kVECTOR only for operands still 1-D,
    and SHUFFLE "ONNXTRT_squeezeTensor" after the product; a 1-D first operand is broadcast to [1, .., 1, E];
  - element-wise ops broadcast every input to the highest rank with "ONNXTRT_Broadcast" (`elementwiseHelper`).
  Other ops become one layer of the TensorRT type the importer uses for them; their inner decompositions
  (e.g. Gemm's bias add) are not reproduced, as the FP32-tail rules never depend on them.
"""

from __future__ import annotations

import enum
import types
from pathlib import Path


class LayerType(enum.Enum):
    CONVOLUTION = 1
    ACTIVATION = 2
    SOFTMAX = 3
    CONCATENATION = 4
    ELEMENTWISE = 5
    UNARY = 6
    SHUFFLE = 7
    REDUCE = 8
    GATHER = 9
    MATRIX_MULTIPLY = 10
    CONSTANT = 11
    IDENTITY = 12
    SLICE = 13
    SHAPE = 14
    RESIZE = 15
    SELECT = 16
    FILL = 17
    NORMALIZATION = 18
    CAST = 19


class MatrixOperation(enum.Enum):
    NONE = 0
    TRANSPOSE = 1
    VECTOR = 2


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    BOOL = 4
    INT64 = 8


_ONNX_DTYPES = {1: DataType.FLOAT, 10: DataType.HALF, 6: DataType.INT32, 7: DataType.INT64, 9: DataType.BOOL}


class ITensor:
    def __init__(self, name: str, shape: tuple[int, ...], dtype: DataType = DataType.FLOAT):
        self.name, self.shape, self.dtype = name, tuple(shape), dtype


class _LayerImpl:
    """The C++ object behind every Python view of one layer."""

    def __init__(self, index: int, kind: LayerType, inputs: list, outputs: list, ops=None):
        self.index, self.type, self.inputs, self.outputs = index, kind, inputs, outputs
        self.name = f"(Unnamed Layer* {index}) [{kind.name.title()}]"
        self.ops = list(ops or (MatrixOperation.NONE, MatrixOperation.NONE))
        self.precision, self.output_types = DataType.FLOAT, {}
        self.precision_is_set = False


class ILayer:
    """The base-class view `get_layer` returns: only ILayer's own members (pyGraph.cpp, TensorRT 10.3)."""

    def __init__(self, impl: _LayerImpl):
        self._impl = impl

    name = property(lambda self: self._impl.name, lambda self, v: setattr(self._impl, "name", v))
    type = property(lambda self: self._impl.type)
    num_inputs = property(lambda self: len(self._impl.inputs))
    num_outputs = property(lambda self: len(self._impl.outputs))

    def get_input(self, i: int) -> ITensor:
        return self._impl.inputs[i]

    def get_output(self, i: int) -> ITensor:
        return self._impl.outputs[i]

    @property
    def precision(self) -> DataType:
        return self._impl.precision

    @precision.setter
    def precision(self, dtype: DataType) -> None:
        self._impl.precision, self._impl.precision_is_set = dtype, True

    precision_is_set = property(lambda self: self._impl.precision_is_set)

    def set_output_type(self, i: int, dtype: DataType) -> None:
        self._impl.output_types[i] = dtype

    def get_output_type(self, i: int) -> DataType:
        return self._impl.output_types.get(i, self._impl.outputs[i].dtype)

    def output_type_is_set(self, i: int) -> bool:
        return i in self._impl.output_types


class IMatrixMultiplyLayer(ILayer):
    op0 = property(lambda self: self._impl.ops[0])
    op1 = property(lambda self: self._impl.ops[1])


class IConstantLayer(ILayer):
    shape = property(lambda self: self._impl.outputs[0].shape)


class FakeNetwork:
    """INetworkDefinition's read side plus the `add` the parser fake uses."""

    def __init__(self) -> None:
        self._layers: list[_LayerImpl] = []
        self._inputs: list[ITensor] = []
        self._outputs: list[ITensor] = []

    num_layers = property(lambda self: len(self._layers))
    num_inputs = property(lambda self: len(self._inputs))
    num_outputs = property(lambda self: len(self._outputs))

    def get_layer(self, i: int) -> ILayer:
        return ILayer(self._layers[i])  # always the base class, always a new Python object

    def get_input(self, i: int) -> ITensor:
        return self._inputs[i]

    def get_output(self, i: int) -> ITensor:
        return self._outputs[i]

    def add_input(self, name: str, dtype: DataType, shape: tuple[int, ...]) -> ITensor:
        t = ITensor(name, shape, dtype)
        self._inputs.append(t)
        return t

    def mark_output(self, tensor: ITensor) -> None:
        self._outputs.append(tensor)

    def add(
        self, kind: LayerType, inputs: list, shapes: list, dtypes: list | None = None, ops=None
    ) -> _LayerImpl:
        index = len(self._layers)
        dtypes = dtypes or [DataType.FLOAT] * len(shapes)
        outputs = [
            ITensor(f"(Unnamed Layer* {index}) [{kind.name.title()}]_output", s, d)
            for s, d in zip(shapes, dtypes)
        ]
        impl = _LayerImpl(index, kind, list(inputs), outputs, ops)
        self._layers.append(impl)
        return impl

    def layers(self) -> list[_LayerImpl]:
        """The implementation objects, for assertions (what a test reads back; the builder never calls it)."""
        return list(self._layers)


_ELEMENTWISE = {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Max",
    "Min",
    "Equal",
    "Greater",
    "Less",
    "And",
    "Or",
    "Mod",
}
_UNARY = {"Sqrt", "Erf", "Neg", "Exp", "Log", "Abs", "Reciprocal", "Floor", "Ceil", "Not", "Sin", "Cos"}
_ACTIVATION = {"Sigmoid", "Relu", "LeakyRelu", "Tanh", "Clip", "Elu", "Softplus", "HardSigmoid"}
_REDUCE = {"ReduceMean", "ReduceMax", "ReduceSum", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1"}
_SIMPLE = {
    "Reshape": LayerType.SHUFFLE,
    "Transpose": LayerType.SHUFFLE,
    "Squeeze": LayerType.SHUFFLE,
    "Unsqueeze": LayerType.SHUFFLE,
    "Flatten": LayerType.SHUFFLE,
    "Concat": LayerType.CONCATENATION,
    "Gather": LayerType.GATHER,
    "Slice": LayerType.SLICE,
    "Expand": LayerType.SLICE,
    "Shape": LayerType.SHAPE,
    "Cast": LayerType.CAST,
    "Identity": LayerType.IDENTITY,
    "Where": LayerType.SELECT,
    "ConstantOfShape": LayerType.FILL,
    "Softmax": LayerType.SOFTMAX,
    "Resize": LayerType.RESIZE,
    "LayerNormalization": LayerType.NORMALIZATION,
    "Conv": LayerType.CONVOLUTION,
    "Gemm": LayerType.MATRIX_MULTIPLY,
    "Range": LayerType.FILL,
    "Tile": LayerType.SLICE,
}
_WEIGHT_INPUTS = {"Conv": (1, 2)}  # read as weights by the importer (no constant layer) when initializers


class FakeOnnxParser:
    """trt.OnnxParser(network, logger).parse_from_file(path) on an ONNX file, as onnx-tensorrt builds it."""

    def __init__(self, network: FakeNetwork, logger=None):
        self.network, self.num_errors = network, 0
        self._layer_names: set[str] = set()
        self._suffix = 0

    def _unique(self, base: str) -> str:  # weightUtils.cpp generateUniqueName (one shared suffix counter)
        name = base
        while name in self._layer_names:
            name = f"{base}_{self._suffix}"
            self._suffix += 1
        self._layer_names.add(name)
        return name

    def _register(self, impl: _LayerImpl, base: str) -> _LayerImpl:
        impl.name = self._unique(base)
        return impl

    def _tensor(self, name: str) -> ITensor:
        """convertToTensor: a tensor as is; an initializer through its one constant layer."""
        value = self._values[name]
        if isinstance(value, ITensor):
            return value
        if name not in self._constants:
            shape, dtype = value
            impl = self.network.add(LayerType.CONSTANT, [], [shape], [dtype])
            self._constants[name] = self._register(impl, name).outputs[0]
        return self._constants[name]

    def _shuffle(self, tensor: ITensor, shape: tuple[int, ...], base: str) -> ITensor:
        impl = self.network.add(LayerType.SHUFFLE, [tensor], [shape], [tensor.dtype])
        return self._register(impl, base).outputs[0]

    def _broadcast(self, tensor: ITensor, rank: int) -> ITensor:  # importerUtils.cpp broadcastTensor
        if len(tensor.shape) >= rank:
            return tensor
        return self._shuffle(tensor, (1,) * (rank - len(tensor.shape)) + tensor.shape, "ONNXTRT_Broadcast")

    def parse_from_file(self, path: str) -> bool:
        import onnx

        model = onnx.load(str(path))
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        info = {}
        for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            tt = vi.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
            info[vi.name] = (dims, _ONNX_DTYPES.get(tt.elem_type, DataType.FLOAT))
        self._values: dict = {}
        self._constants: dict[str, ITensor] = {}
        for init in model.graph.initializer:  # ModelImporter importInitializers: weights, no layer yet
            self._values[init.name] = (tuple(init.dims), _ONNX_DTYPES.get(init.data_type, DataType.FLOAT))
        for inp in model.graph.input:
            if inp.name not in self._values:
                dims, dtype = info[inp.name]
                self._values[inp.name] = self.network.add_input(inp.name, dtype, dims)
        for node in model.graph.node:
            self._import(node, info)
        for out in model.graph.output:
            self.network.mark_output(self._tensor(out.name))
        return True

    def _import(self, node, info) -> None:
        base = node.name or f"node_of_{node.output[0]}"  # getNodeName
        op = node.op_type
        if op == "Constant":  # returns weights named after its output (registerTensor)
            shape, dtype = info.get(node.output[0], ((), DataType.FLOAT))
            self._values[node.output[0]] = (shape, dtype)
            return
        out_shapes = [info[o][0] for o in node.output if o]
        out_dtypes = [info[o][1] for o in node.output if o]
        if op == "MatMul":
            result = self._matmul(node, base, out_shapes[0], out_dtypes[0])
        elif op in _ELEMENTWISE:
            tensors = [self._tensor(i) for i in node.input]
            rank = max(len(t.shape) for t in tensors)
            tensors = [self._broadcast(t, rank) for t in tensors]
            result = self._register(
                self.network.add(LayerType.ELEMENTWISE, tensors, out_shapes, out_dtypes), base
            ).outputs[0]
        else:
            kind = (
                LayerType.UNARY
                if op in _UNARY
                else LayerType.ACTIVATION
                if op in _ACTIVATION
                else LayerType.REDUCE
                if op in _REDUCE
                else _SIMPLE.get(op)
            )
            if kind is None:
                raise NotImplementedError(f"fake parser: no importer for {op}")
            weights = _WEIGHT_INPUTS.get(op, ())
            tensors = [
                self._tensor(i)
                for j, i in enumerate(node.input)
                if i and not (j in weights and not isinstance(self._values[i], ITensor))
            ]
            impl = self._register(self.network.add(kind, tensors, out_shapes, out_dtypes), base)
            for name, tensor in zip([o for o in node.output if o], impl.outputs):
                tensor.name = name
                self._values[name] = tensor
            return
        result.name = node.output[0]  # registerTensor: the returned tensor takes the ONNX name
        self._values[node.output[0]] = result

    def _matmul(self, node, base: str, out_shape, out_dtype) -> ITensor:
        """onnxOpImporters.cpp DEFINE_BUILTIN_OP_IMPORTER(MatMul), step by step."""
        a, b = self._tensor(node.input[0]), self._tensor(node.input[1])
        squeeze_tail = False
        if len(a.shape) > len(b.shape) and len(b.shape) == 1:
            b = self._shuffle(b, b.shape + (1,), "ONNXTRT_unsqueezeTensor")  # axes {1}: [E] -> [E, 1]
            squeeze_tail = True
        squeeze_head = len(a.shape) < len(b.shape) and len(a.shape) == 1
        rank = max(len(a.shape), len(b.shape))
        a, b = self._broadcast(a, rank), self._broadcast(b, rank)  # broadcastTensors
        ops = [MatrixOperation.VECTOR if len(t.shape) == 1 else MatrixOperation.NONE for t in (a, b)]
        mm_shape = tuple(out_shape) + ((1,) if squeeze_tail else ())
        if squeeze_head:
            mm_shape = mm_shape[:-1] + (1,) + mm_shape[-1:]
        impl = self._register(
            self.network.add(LayerType.MATRIX_MULTIPLY, [a, b], [mm_shape], [out_dtype], ops), base
        )
        out = impl.outputs[0]
        if squeeze_head or squeeze_tail:
            out = self._shuffle(out, tuple(out_shape), "ONNXTRT_squeezeTensor")
        return out


class FakeTrt:
    """The `tensorrt` module surface the builder's network pass uses."""

    __version__ = "10.3.0"
    LayerType = LayerType
    MatrixOperation = MatrixOperation
    DataType = DataType
    float32, float16, int32, int64, bool = (
        DataType.FLOAT,
        DataType.HALF,
        DataType.INT32,
        DataType.INT64,
        DataType.BOOL,
    )
    ILayer = ILayer
    IMatrixMultiplyLayer = IMatrixMultiplyLayer
    IConstantLayer = IConstantLayer

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1


# ---- the builder side: Builder, IBuilderConfig, ITimingCache (the calls trt_engine.build_engine makes) ------


class BuilderFlag(enum.Enum):
    FP16 = 1
    TF32 = 2
    OBEY_PRECISION_CONSTRAINTS = 3


class FakeTimingCache:
    def __init__(self, blob):
        self.blob = blob

    def serialize(self):
        return memoryview(b"timing:" + self.blob)


class FakeConfig:
    def __init__(self, accept_blob):
        self.flags = {BuilderFlag.TF32}  # TF32 is on by default (TensorRT developer guide)
        self.accept_blob, self.attached, self.progress_monitor = accept_blob, None, None

    def set_memory_pool_limit(self, pool, size):
        pass

    def add_optimization_profile(self, profile):
        pass

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def create_timing_cache(self, blob):
        return FakeTimingCache(bytes(blob))

    def set_timing_cache(self, cache, ignore_mismatch):
        ok = self.accept_blob or not cache.blob  # a foreign cache does not attach
        if ok:
            self.attached = cache
        return ok

    def get_timing_cache(self):
        return self.attached


class FakeBuilderTrt(FakeTrt):
    __version__ = "10.3.0"
    BuilderFlag = BuilderFlag
    MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)

    def __init__(self, accept_blob=True):
        self.accept_blob, self.configs, self.networks = accept_blob, [], []

    def Builder(self, logger):  # noqa: N802 (TensorRT's name)
        trt = self

        class B:
            def create_network(self, flags):
                trt.networks.append(FakeNetwork())
                return trt.networks[-1]

            def create_builder_config(self):
                trt.configs.append(FakeConfig(trt.accept_blob))
                return trt.configs[-1]

            def create_optimization_profile(self):
                return types.SimpleNamespace(set_shape=lambda *a: None)

            def build_serialized_network(self, network, config):
                return memoryview(b"PLAN")

        return B()

    OnnxParser = FakeOnnxParser


def parse(path: str | Path) -> FakeNetwork:
    """The network TensorRT's ONNX parser would build from `path` (fake)."""
    network = FakeNetwork()
    FakeOnnxParser(network).parse_from_file(str(path))
    return network


def head_model(quick_gelu: bool = False, dt_name: str = "dt"):
    """A small MadCLIP-shaped graph: patch conv -> tokens -> (QuickGELU) -> MatMul with a weight -> / sqrt(2)
    -> LayerNorm -> L2 normalise (divisor computed) -> MatMul with the 1-D baked `dt` -> sigmoid -> map."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    e = 8
    inits = [
        numpy_helper.from_array(rng.normal(size=(e, 3, 4, 4)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(np.array([-1, e, 16], np.int64), "tok_shape"),
        numpy_helper.from_array(rng.normal(size=(e, e)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.array(1.4142135, np.float32), "sqrt2"),
        numpy_helper.from_array(np.ones(e, np.float32), "ln_w"),
        numpy_helper.from_array(np.zeros(e, np.float32), "ln_b"),
        numpy_helper.from_array(np.array([-1], np.int64), "ax_last"),
        numpy_helper.from_array(rng.normal(size=(e,)).astype(np.float32), dt_name),
        numpy_helper.from_array(np.array([-1, 1, 4, 4], np.int64), "map_shape"),
        numpy_helper.from_array(np.array([1, 1, 4, 4], np.float32), "scales"),
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), "ax_all"),
    ]
    n = helper.make_node
    nodes = [
        n("Conv", ["image", "conv_w"], ["feat"], strides=[4, 4], name="/visual/conv1/Conv"),
        n("Reshape", ["feat", "tok_shape"], ["tok_t"], name="node_view"),
        n("Transpose", ["tok_t"], ["tok"], perm=[0, 2, 1], name="node_permute"),
    ]
    x = "tok"
    if quick_gelu:
        nodes += [
            n("Sigmoid", ["tok"], ["s"], name="/visual/transformer/resblocks.0/mlp/gelu/Sigmoid"),
            n("Mul", ["tok", "s"], ["g"], name="/visual/transformer/resblocks.0/mlp/gelu/Mul"),
        ]
        x = "g"
    nodes += [
        n("MatMul", [x, "fc_w"], ["h"], name="/visual/transformer/resblocks.0/mlp/c_proj/MatMul"),
        n("Div", ["h", "sqrt2"], ["half"], name="node_div_gelu"),
        n("LayerNormalization", ["half", "ln_w", "ln_b"], ["ln"], axis=-1, name="node_layer_norm"),
        n("ReduceL2", ["ln", "ax_last"], ["nrm"], keepdims=1, name="node_linalg_vector_norm"),
        n("Div", ["ln", "nrm"], ["unit"], name="node_div"),
        n("MatMul", ["unit", dt_name], ["logit"], name="node_matmul"),
        n("Sigmoid", ["logit"], ["prob"], name="node_sigmoid"),
        n("Reshape", ["prob", "map_shape"], ["small"], name="node_view_1"),
        n("Resize", ["small", "", "scales"], ["anomaly_map"], mode="linear", name="node_upsample_bilinear2d"),
        n("ReduceMean", ["anomaly_map", "ax_all"], ["score"], keepdims=0, name="node_mean"),
        n("ReduceMax", ["anomaly_map", "ax_all"], ["score_map_max"], keepdims=0, name="node_amax"),
    ]
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", 1, 16, 16]),
            helper.make_tensor_value_info("score_map_max", TensorProto.FLOAT, ["batch"]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model
