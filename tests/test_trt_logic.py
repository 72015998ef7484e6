"""Pure logic of the TensorRT path (no TensorRT, no GPU needed)."""
from __future__ import annotations

import enum
import json
import sys
import types

import pytest

from madclip_runtime import trt_engine as te
from madclip_runtime.errors import BackendUnavailable, BundleError, InputError


@pytest.mark.parametrize(
    "text, expected",
    [("10.3.0.30", (10, 3, 0)), ("10.12", (10, 12, 0)), ("11.0.0", (11, 0, 0)), ("8.6.1.6", (8, 6, 1)), ("10", (10, 0, 0))],
)
def test_parse_trt_version(text, expected):
    assert te.parse_trt_version(text) == expected


def test_parse_trt_version_rejects_garbage():
    with pytest.raises(BackendUnavailable, match="unrecognised"):
        te.parse_trt_version("tensorrt-latest")


@pytest.mark.parametrize(
    "version, mode",
    [("10.0.1", "fp16_flag"), ("10.3.0.30", "fp16_flag"), ("10.11.0", "fp16_flag"), ("10.12.0", "strongly_typed"),
     ("10.13.2", "strongly_typed"), ("11.0.0", "strongly_typed"), ((12, 1), "strongly_typed"), ((10, 3, 0), "fp16_flag")],
)
def test_typing_mode(version, mode):
    assert te.typing_mode(version) == mode


@pytest.mark.parametrize("version", ["8.6.1", "9.3.0", (7, 2)])
def test_typing_mode_needs_trt10(version):
    with pytest.raises(BackendUnavailable, match=r"TensorRT >= 10 required"):
        te.typing_mode(version)


def test_onnx_variant_follows_typing_mode():
    assert te.onnx_variant("fp16", "10.3.0") == "model.onnx"  # FP16 flag + pinned islands on the FP32 graph
    assert te.onnx_variant("fp16", "10.12.0") == "model_fp16.onnx"
    assert te.onnx_variant("fp16", "11.0.0") == "model_fp16.onnx"
    assert te.onnx_variant("fp32", "11.0.0") == "model.onnx"
    with pytest.raises(BackendUnavailable, match="CPU path"):
        te.onnx_variant("int8", "10.3.0")


def test_profile_shapes():
    mn, opt, mx = te.profile_shapes((3, 240, 240), 8)
    assert mn == (1, 3, 240, 240) and opt == (1, 3, 240, 240) and mx == (8, 3, 240, 240)
    assert te.profile_shapes((3, 16, 16), 1)[2] == (1, 3, 16, 16)
    with pytest.raises(InputError):
        te.profile_shapes((3, 240, 240), 0)
    with pytest.raises(BundleError, match="static"):
        te.profile_shapes((3, -1, 240), 4)


def test_engine_and_timing_cache_names(tmp_path):
    assert te.engine_file_name("fp16", "10.3.0", (8, 7)) == "model_fp16_trt10.3.0_sm87.engine"
    assert te.engine_file_name("fp32", "10.13.0.35", (12, 0)) == "model_fp32_trt10.13.0.35_sm120.engine"
    assert te.timing_cache_path(tmp_path, "10.3.0", (8, 7)) == tmp_path / "timing_trt10.3.0_sm87.cache"
    key = te.EngineKey("10.3.0", (8, 7), "fp16", "ab" * 32, 8)
    assert key.file_name == "model_fp16_trt10.3.0_sm87.engine"


def test_engine_key_json_round_trip_and_sidecar(tmp_path):
    key = te.EngineKey("10.3.0", (8, 7), "fp16", "0123abcd" * 8, 4)
    back = te.EngineKey.from_json(key.to_json())
    assert back == key and isinstance(back.compute_capability, tuple)
    assert json.loads(key.to_json())["compute_capability"] == [8, 7]
    engine = tmp_path / key.file_name
    assert te.read_engine_key(engine) is None  # no engine yet
    engine.write_bytes(b"plan")
    assert te.read_engine_key(engine) is None  # engine without sidecar: not trusted
    te.sidecar_path(engine).write_text(key.to_json())
    assert te.read_engine_key(engine) == key
    te.sidecar_path(engine).write_text("{not json")
    assert te.read_engine_key(engine) is None
    te.sidecar_path(engine).write_text(json.dumps({"trt_version": "10.3.0"}))
    assert te.read_engine_key(engine) is None


def test_engine_key_mismatch_detection():
    key = te.EngineKey("10.3.0", (8, 7), "fp16", "a" * 64, 8)
    assert key.mismatches(key) == []
    assert key.mismatches(te.EngineKey("10.3.0", [8, 7], "fp16", "a" * 64, 8)) == []
    other = te.EngineKey("10.4.0", (8, 9), "fp16", "b" * 64, 8)
    diffs = key.mismatches(other)
    assert diffs == ["TensorRT 10.3.0 -> 10.4.0", "GPU compute capability (8, 7) -> (8, 9)",
                     f"ONNX sha256 {'a' * 12} -> {'b' * 12}"]
    assert key.mismatches(te.EngineKey("10.3.0", (8, 7), "fp32", "a" * 64, 8)) == ["precision fp16 -> fp32"]
    assert key.mismatches(te.EngineKey("10.3.0", (8, 7), "fp16", "a" * 64, 16)) == ["max batch 8 -> 16"]


@pytest.mark.parametrize(
    "layer_type, name, expected",
    [
        # normalisation, reductions, upsampling: always FP32
        ("NORMALIZATION", "/visual/transformer/resblocks.3/ln_1/LayerNormalization", True),
        ("NORMALIZATION", "node_layer_norm_1", True),
        ("REDUCE", "node_linalg_vector_norm", True),
        ("REDUCE", "node_ReduceMean_32", True),
        ("RESIZE", "node_upsample_bilinear2d", True),
        ("LayerType.RESIZE", "/head/Resize", True),
        # activations: only the sigmoid
        ("ACTIVATION", "node_sigmoid", True),
        ("ACTIVATION", "/head/Sigmoid", True),
        ("ACTIVATION", "node_leaky_relu", False),
        ("ACTIVATION", "/visual/transformer/resblocks.0/mlp/gelu/Gelu", False),
        # arithmetic of standardisation / L2 normalisation
        ("ELEMENTWISE", "node_div", True),
        ("ELEMENTWISE", "/adapter/Pow", True),
        ("UNARY", "/adapter/Sqrt", True),
        ("ELEMENTWISE", "/ln_post/Sub", True),
        ("ELEMENTWISE", "node_Add_29", False),
        ("ELEMENTWISE", "/visual/transformer/resblocks.0/Add_1", False),
        ("UNARY", "node_Erf_27", False),
        # matmuls: only the scoring dot products with dt
        ("MATRIX_MULTIPLY", "/head/dt/MatMul", True),
        ("MATRIX_MULTIPLY", "score_logit_matmul", True),
        ("MATRIX_MULTIPLY", "/visual/transformer/resblocks.0/attn/MatMul", False),
        ("MATRIX_MULTIPLY", "node_MatMul_1", False),
        ("MATRIX_MULTIPLY", "/width/MatMul", False),  # 'dt' inside 'width' is not the token dt
        # the rest stays FP16-eligible
        ("CONVOLUTION", "/visual/conv1/Conv", False),
        ("SOFTMAX", "node_softmax", False),
        ("SHUFFLE", "node_view", False),
        ("CONSTANT", "dt", False),
    ],
)
def test_fp32_island(layer_type, name, expected):
    assert te.fp32_island(layer_type, name) is expected


def test_check_trt_precision():
    te.check_trt_precision("fp16")
    te.check_trt_precision("fp32")
    with pytest.raises(BackendUnavailable, match="ort-cpu"):
        te.check_trt_precision("int8")


def test_file_sha256_covers_external_data(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"graph")
    alone = te.file_sha256(model)
    (tmp_path / "model.onnx.data").write_bytes(b"weights")
    with_data = te.file_sha256(model)
    assert alone != with_data and len(with_data) == 64
    (tmp_path / "model.onnx.data").write_bytes(b"weights2")
    assert te.file_sha256(model) != with_data


def test_missing_tensorrt_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailable) as info:
        te.import_tensorrt()
    assert "\n" not in str(info.value) and "TensorRT" in str(info.value)


def test_old_tensorrt_is_rejected(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1.6"))
    with pytest.raises(BackendUnavailable, match=r"TensorRT >= 10 required \(found 8\.6\.1\)"):
        te.import_tensorrt()


def test_gpu_count_is_zero_without_gpu_or_bindings(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda.cudart", None)
    with pytest.raises(BackendUnavailable, match="pip install cuda-python"):
        te.import_cudart()
    assert te.gpu_count() == 0


# ---- builder logic on a fake network (the objects TensorRT's parser would produce) -----------------------


class LayerType(enum.Enum):
    CONVOLUTION = 1
    NORMALIZATION = 2
    MATRIX_MULTIPLY = 3
    ACTIVATION = 4
    ELEMENTWISE = 5
    REDUCE = 6
    RESIZE = 7
    SHUFFLE = 8
    CONSTANT = 9


class MatrixOperation(enum.Enum):
    NONE = 0
    TRANSPOSE = 1
    VECTOR = 2


class FakeTrt:
    LayerType = LayerType
    MatrixOperation = MatrixOperation
    float32, float16, int64 = "float32", "float16", "int64"

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1


class Tensor:
    def __init__(self, name, dtype="float16", shape=(-1, 290, 1024)):
        self.name, self.dtype, self.shape = name, dtype, shape


class Layer:
    def __init__(self, kind, name, inputs, outputs, op0=MatrixOperation.NONE, op1=MatrixOperation.NONE):
        self.type, self.name = kind, name
        self._in, self._out = inputs, outputs
        self.op0, self.op1 = op0, op1
        self.precision = None
        self.output_types = {}

    num_inputs = property(lambda self: len(self._in))
    num_outputs = property(lambda self: len(self._out))

    def get_input(self, i):
        return self._in[i]

    def get_output(self, i):
        return self._out[i]

    def set_output_type(self, i, dtype):
        self.output_types[i] = dtype


class Network:
    def __init__(self, layers):
        self.layers = layers

    num_layers = property(lambda self: len(self.layers))

    def get_layer(self, i):
        return self.layers[i]


def test_constrain_fp32_islands_on_fake_network():
    t = {n: Tensor(n) for n in ["img", "x", "ln", "fc", "dt", "logit", "prob", "up", "score", "amap", "attn"]}
    t["dt"].shape = (768,)
    shape_t = Tensor("shape", dtype="int64", shape=(4,))
    layers = [
        Layer(LayerType.CONVOLUTION, "/visual/conv1/Conv", [t["img"]], [t["x"]]),
        Layer(LayerType.MATRIX_MULTIPLY, "/visual/transformer/resblocks.0/attn/MatMul", [t["x"], t["x"]], [t["attn"]]),
        Layer(LayerType.NORMALIZATION, "node_layer_norm", [t["attn"]], [t["ln"]]),
        Layer(LayerType.MATRIX_MULTIPLY, "node_MatMul_1", [t["ln"], Tensor("w", shape=(1024, 768))], [t["fc"]]),
        Layer(LayerType.CONSTANT, "node_dt", [], [t["dt"]]),
        Layer(LayerType.MATRIX_MULTIPLY, "node_matmul", [t["fc"], t["dt"]], [t["logit"]], op1=MatrixOperation.VECTOR),
        Layer(LayerType.ACTIVATION, "node_sigmoid", [t["logit"]], [t["prob"]]),
        Layer(LayerType.SHUFFLE, "node_view", [t["prob"]], [t["up"]]),  # after the sigmoid: tail
        Layer(LayerType.ELEMENTWISE, "node_add_layers", [t["up"], t["up"]], [t["amap"]]),  # tail
        Layer(LayerType.REDUCE, "node_shape_prod", [shape_t], [Tensor("n", dtype="int64", shape=())]),
        Layer(LayerType.ACTIVATION, "node_gelu", [t["x"]], [Tensor("g")]),
    ]
    pinned = te.constrain_fp32_islands(FakeTrt, Network(layers))
    fp32 = {layer.name for layer in layers if layer.precision == "float32"}
    assert fp32 == {"node_layer_norm", "node_matmul", "node_sigmoid", "node_view", "node_add_layers"}
    assert pinned == len(fp32)
    for layer in layers:
        if layer.name in fp32:
            assert layer.output_types == {0: "float32"}
        else:
            assert layer.output_types == {}  # backbone, constants and integer shape maths untouched


def test_vector_matmul_detection_by_shape():
    mm = Layer(LayerType.MATRIX_MULTIPLY, "node_matmul_7", [Tensor("a"), Tensor("dt", shape=(8, 768, 1))], [Tensor("o")])
    assert te._is_vector_matmul(FakeTrt, mm)
    mm2 = Layer(LayerType.MATRIX_MULTIPLY, "node_MatMul_3", [Tensor("a"), Tensor("w", shape=(1024, 768))], [Tensor("o")])
    assert not te._is_vector_matmul(FakeTrt, mm2)


def test_network_flags():
    assert te._network_flags(FakeTrt, "fp16", (10, 12, 0)) == 1 << 1
    assert te._network_flags(FakeTrt, "fp16", (10, 3, 0)) == 0  # FP16 builder flag path
    assert te._network_flags(FakeTrt, "fp16", (11, 0, 0)) == 0  # always strongly typed; flag deprecated
    assert te._network_flags(FakeTrt, "fp32", (10, 12, 0)) == 0
