"""Pure logic of the TensorRT path (no TensorRT, no GPU needed)."""

from __future__ import annotations

import ctypes
import enum
import json
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from madclip_runtime.engines import cuda_probe
from madclip_runtime.engines import trt_engine as te
from madclip_runtime.engines import trt_rules as tr
from madclip_runtime.errors import BackendUnavailable, BundleError, InputError

from . import trt_fakes
from .trt_fakes import FakeTrt


@pytest.mark.parametrize(
    "text, expected",
    [
        ("10.3.0.30", (10, 3, 0)),
        ("10.12", (10, 12, 0)),
        ("11.0.0", (11, 0, 0)),
        ("8.6.1.6", (8, 6, 1)),
        ("10", (10, 0, 0)),
    ],
)
def test_parse_trt_version(text, expected):
    assert tr.parse_trt_version(text) == expected


def test_parse_trt_version_rejects_garbage():
    with pytest.raises(BackendUnavailable, match="unrecognised"):
        tr.parse_trt_version("tensorrt-latest")


@pytest.mark.parametrize(
    "version, mode",
    [
        ("10.0.1", "fp16_flag"),
        ("10.3.0.30", "fp16_flag"),
        ("10.11.0", "fp16_flag"),
        ("10.12.0", "strongly_typed"),
        ("10.13.2", "strongly_typed"),
        ("11.0.0", "strongly_typed"),
        ((12, 1), "strongly_typed"),
        ((10, 3, 0), "fp16_flag"),
    ],
)
def test_typing_mode(version, mode):
    assert tr.typing_mode(version) == mode


@pytest.mark.parametrize("version", ["8.6.1", "9.3.0", (7, 2)])
def test_typing_mode_needs_trt10(version):
    with pytest.raises(BackendUnavailable, match=r"TensorRT >= 10 required"):
        tr.typing_mode(version)


def test_onnx_variant_follows_typing_mode():
    assert tr.onnx_variant("fp16", "10.3.0") == "model.onnx"  # FP16 flag + pinned islands on the FP32 graph
    assert tr.onnx_variant("fp16", "10.12.0") == "model_fp16.onnx"
    assert tr.onnx_variant("fp16", "11.0.0") == "model_fp16.onnx"
    assert tr.onnx_variant("fp32", "11.0.0") == "model.onnx"
    with pytest.raises(BackendUnavailable, match="CPU path"):
        tr.onnx_variant("int8", "10.3.0")


def test_profile_shapes():
    mn, opt, mx = tr.profile_shapes((3, 240, 240), 8)
    assert mn == (1, 3, 240, 240) and opt == (1, 3, 240, 240) and mx == (8, 3, 240, 240)
    assert tr.profile_shapes((3, 16, 16), 1)[2] == (1, 3, 16, 16)
    with pytest.raises(InputError):
        tr.profile_shapes((3, 240, 240), 0)
    with pytest.raises(BundleError, match="static"):
        tr.profile_shapes((3, -1, 240), 4)


def _key(**kw):
    base = dict(
        trt_version="10.3.0",
        compute_capability=(8, 7),
        precision="fp16",
        model_sha256="ab" * 32,
        max_batch=8,
        gpu_name="Orin",
        typing="fp16_flag",
    )
    return tr.EngineKey(**{**base, **kw})


def test_engine_and_timing_cache_names(tmp_path):
    assert tr.timing_cache_path(tmp_path, "10.3.0", (8, 7)) == tmp_path / "timing_trt10.3.0_sm87.cache"
    key = _key()
    assert key.file_name.startswith("model_fp16_trt10.3.0_sm87_") and key.file_name.endswith(".engine")
    assert key.file_name == _key().file_name  # deterministic


@pytest.mark.parametrize(
    "field, value",
    [
        ("model_sha256", "cd" * 32),  # another bundle / retrained weights (defect 3)
        ("gpu_name", "NVIDIA RTX 4090"),  # same compute capability, other GPU (defect 12)
        ("rules_version", tr.RULES_VERSION + 1),  # madclip's precision rules changed (defect 12)
        ("typing", "strongly_typed"),
        ("max_batch", 4),
        ("trt_version", "10.3.1"),
        ("compute_capability", (8, 9)),
    ],
)
def test_engine_file_name_hashes_every_key_field(field, value):
    """Defect 3: engines of different models never share a file name, so a shared --cache-dir (or a
    concurrent process replacing a file) cannot hand one model another model's engine."""
    assert _key(**{field: value}).file_name != _key().file_name
    assert _key(**{field: value}).mismatches(_key()) != []


def test_engine_key_json_round_trip_and_sidecar(tmp_path):
    key = _key(max_batch=4)
    back = tr.EngineKey.from_json(key.to_json())
    assert back == key and isinstance(back.compute_capability, tuple)
    assert json.loads(key.to_json())["compute_capability"] == [8, 7]
    assert json.loads(key.to_json())["rules_version"] == tr.RULES_VERSION
    engine = tmp_path / key.file_name
    assert tr.read_engine_key(engine) is None  # no engine yet
    engine.write_bytes(b"plan")
    assert tr.read_engine_key(engine) is None  # engine without sidecar: not trusted
    tr.sidecar_path(engine).write_text(key.to_json())
    assert tr.read_engine_key(engine) == key
    tr.sidecar_path(engine).write_text("{not json")
    assert tr.read_engine_key(engine) is None
    tr.sidecar_path(engine).write_text(json.dumps({"trt_version": "10.3.0"}))
    assert tr.read_engine_key(engine) is None


def test_engine_key_mismatch_detection():
    key = _key(model_sha256="a" * 64)
    assert key.mismatches(key) == []
    assert key.mismatches(_key(model_sha256="a" * 64, compute_capability=[8, 7])) == []
    other = _key(trt_version="10.4.0", compute_capability=(8, 9), model_sha256="b" * 64)
    assert key.mismatches(other) == [
        "TensorRT 10.3.0 -> 10.4.0",
        "GPU compute capability (8, 7) -> (8, 9)",
        f"model sha256 {'a' * 12} -> {'b' * 12}",
    ]
    assert key.mismatches(_key(model_sha256="a" * 64, precision="fp32", typing="fp32")) == [
        "precision fp16 -> fp32",
        "typing fp16_flag -> fp32",
    ]


def test_engine_typing_and_tf32():
    """Defect 9: fp32 engines are built with TF32 cleared; the recipe is part of the key."""
    assert tr.engine_typing("fp32", "10.3.0") == "fp32" and not tr.tf32_allowed("fp32")
    assert tr.engine_typing("fp16", "10.3.0") == "fp16_flag" and tr.tf32_allowed("fp16")
    assert tr.engine_typing("fp16", "10.12.0") == "strongly_typed"


def test_content_id_from_metadata_equals_file_hash(tmp_path):
    """Defect 3: the id from a bundle's sha256 list (runtime) and from the files (export, builder) agree,
    and the external weights are part of it."""
    import hashlib

    model = tmp_path / "model.onnx"
    model.write_bytes(b"graph")
    g = hashlib.sha256(b"graph").hexdigest()
    assert tr.file_sha256(model) == tr.content_id([g]) == g
    (tmp_path / "model.onnx.data").write_bytes(b"weights")
    d = hashlib.sha256(b"weights").hexdigest()
    assert tr.file_sha256(model) == tr.content_id([g, d]) != g
    (tmp_path / "model.onnx.data").write_bytes(b"weights2")
    assert tr.file_sha256(model) != tr.content_id([g, d])


def test_one_cache_root(monkeypatch, tmp_path):
    """Engines and training features share one root, honouring MADCLIP_CACHE and XDG_CACHE_HOME."""
    monkeypatch.delenv("MADCLIP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tr.cache_root() == tmp_path / "xdg" / "madclip"
    assert tr.engine_cache_dir() == tmp_path / "xdg" / "madclip" / "engines"
    monkeypatch.setenv("MADCLIP_CACHE", str(tmp_path / "mine"))
    assert tr.cache_root() == tmp_path / "mine"
    monkeypatch.delenv("MADCLIP_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tr.cache_root() == Path.home() / ".cache" / "madclip"


def test_ort_trt_cache_dir_is_per_model(tmp_path):
    assert tr.ort_trt_cache_dir(tmp_path, "a" * 64) != tr.ort_trt_cache_dir(tmp_path, "b" * 64)
    assert tr.ort_trt_cache_dir(tmp_path, "a" * 64).parent == tmp_path / "ort-trt"


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
        # activations: none by themselves (the head's sigmoid is FP32 as part of the tail; a QuickGELU
        # sigmoid in every block stays FP16, defect 6)
        ("ACTIVATION", "node_sigmoid", False),
        ("ACTIVATION", "/head/Sigmoid", False),
        ("ACTIVATION", "node_leaky_relu", False),
        ("ACTIVATION", "/visual/transformer/resblocks.0/mlp/gelu/Gelu", False),
        # arithmetic of standardisation / L2 normalisation
        ("ELEMENTWISE", "node_div", True),  # divisor computed (an L2 norm)
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
    assert tr.fp32_island(layer_type, name) is expected


def test_div_by_constant_is_not_an_island():
    """Defect 6: exact GELU's x / sqrt(2) and attention scaling divide by constants: FP16 is fine there."""
    assert tr.fp32_island("ELEMENTWISE", "node_div_3", constant_divisor=False) is True
    assert tr.fp32_island("ELEMENTWISE", "node_div_3", constant_divisor=True) is False
    assert tr.fp32_island("ELEMENTWISE", "/ln_post/Div", constant_divisor=True) is True  # inside a norm


def test_check_trt_precision():
    tr.check_trt_precision("fp16")
    tr.check_trt_precision("fp32")
    with pytest.raises(BackendUnavailable, match="ort-cpu"):
        tr.check_trt_precision("int8")


def test_file_sha256_covers_external_data(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"graph")
    alone = tr.file_sha256(model)
    (tmp_path / "model.onnx.data").write_bytes(b"weights")
    with_data = tr.file_sha256(model)
    assert alone != with_data and len(with_data) == 64
    (tmp_path / "model.onnx.data").write_bytes(b"weights2")
    assert tr.file_sha256(model) != with_data


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
    with pytest.raises(BackendUnavailable, match=r'pip install "madclip\[trt\]"'):
        cuda_probe.import_cudart()
    assert cuda_probe.probe_gpu().count == 0


# ---- builder logic on the network TensorRT's ONNX parser builds (tests/trt_fakes.py) ---------------------


_head_model = trt_fakes.head_model


def _parsed(tmp_path, model):
    import onnx

    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return trt_fakes.parse(path)


def _fp32_layers(network) -> set[str]:
    """Layers the builder pinned: precision FP32 (computing layers) and every output typed FP32."""
    out = set()
    for impl in network.layers():
        typed = impl.output_types and all(v == FakeTrt.float32 for v in impl.output_types.values())
        if typed and (impl.precision_is_set or impl.type == trt_fakes.LayerType.CONSTANT):
            assert impl.type == trt_fakes.LayerType.CONSTANT or impl.precision == FakeTrt.float32
            out.add(impl.name)
    return out


def test_fake_parser_names_constants_and_reshapes_vectors_like_onnx_tensorrt(tmp_path):
    """The fake is faithful where the tail rule depends on it: the initializer's LAYER carries its name, its
    tensor a default one; the 1-D operand reaches the MatMul as [1, E, 1] through the parser's shuffles."""
    pytest.importorskip("onnx")
    net = _parsed(tmp_path, _head_model())
    layers = {impl.name: impl for impl in net.layers()}
    dt = layers["dt"]
    assert dt.type == trt_fakes.LayerType.CONSTANT and dt.outputs[0].name != "dt"
    assert dt.outputs[0].name.startswith("(Unnamed Layer* ") and dt.outputs[0].shape == (8,)
    mm = layers["node_matmul"]
    assert [t.shape for t in mm.inputs] == [(-1, 16, 8), (1, 8, 1)]
    assert mm.ops == [trt_fakes.MatrixOperation.NONE, trt_fakes.MatrixOperation.NONE]  # no kVECTOR here
    assert {"ONNXTRT_unsqueezeTensor", "ONNXTRT_Broadcast", "ONNXTRT_squeezeTensor"} <= set(layers)
    assert all(t.name != "dt" for impl in net.layers() for t in impl.inputs)  # no tensor is called dt
    layer = net.get_layer(mm.index)
    assert type(layer) is trt_fakes.ILayer and not hasattr(layer, "op0")  # until downcast
    layer.__class__ = FakeTrt.IMatrixMultiplyLayer
    assert layer.op1 == trt_fakes.MatrixOperation.NONE
    assert not hasattr(net.get_layer(mm.index), "op0")  # every get_layer is a fresh ILayer


def _old_is_vector_matmul(trt, layer):
    """The code before issue 21, verbatim: reads op0/op1 on what get_layer returned."""
    if layer.type != trt.LayerType.MATRIX_MULTIPLY:
        return False
    if trt.MatrixOperation.VECTOR in (layer.op0, layer.op1):
        return True
    other = layer.get_input(1)
    shape = tuple(other.shape) if other is not None else ()
    return len(shape) == 1 or (len(shape) >= 2 and shape[-1] == 1)


def _old_tail_starts(trt, network, constants):
    """The old tail start (before issue 21): a layer INPUT TENSOR named after an island constant."""
    names = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        inputs = [layer.get_input(j).name for j in range(layer.num_inputs)]
        if any(n in constants or n.split("/")[-1] in constants for n in inputs):
            names.append(layer.name)
    return names


def test_old_code_fails_against_tensorrt_like_fakes(tmp_path):
    """Issue 21 defects 1 and 2, shown on the fakes: the old vector-matmul check raises AttributeError on
    the un-downcast ILayer (the FP16-flag build crashed), and the old tensor-name tail start finds nothing."""
    pytest.importorskip("onnx")
    net = _parsed(tmp_path, _head_model())
    mm_index = next(impl.index for impl in net.layers() if impl.name == "node_matmul")
    with pytest.raises(AttributeError, match="op0"):
        _old_is_vector_matmul(FakeTrt, net.get_layer(mm_index))
    assert _old_tail_starts(FakeTrt, net, ("dt",)) == []
    assert te._is_vector_matmul(
        FakeTrt,
        net.get_layer(mm_index),
        {t.name: net.get_layer(impl.index) for impl in net.layers() for t in impl.outputs},
    )


def test_tail_pinned_by_structure_on_the_parsed_network(tmp_path):
    """The head from the `dt` constant layer on (through the parser's reshapes) plus the type/name islands
    are FP32; the backbone, the division by a constant and integer shape maths are not."""
    pytest.importorskip("onnx")
    net = _parsed(tmp_path, _head_model())
    pinned = te.constrain_fp32_islands(FakeTrt, net, ("dt",))
    fp32 = _fp32_layers(net)
    assert pinned == len(fp32)
    head = {
        "dt",
        "node_matmul",
        "node_sigmoid",
        "node_view_1",
        "node_upsample_bilinear2d",
        "node_mean",
        "node_amax",
    }
    islands = {"node_layer_norm", "node_linalg_vector_norm", "node_div"}
    assert {n for n in fp32 if not n.startswith("ONNXTRT_")} == head | islands
    helpers = sorted(n.split("_")[1].rstrip("0123456789") for n in fp32 if n.startswith("ONNXTRT_"))
    assert helpers == ["Broadcast", "squeezeTensor", "unsqueezeTensor"]  # only the reshapes on dt's path
    for impl in net.layers():
        if impl.name not in fp32:
            assert impl.output_types == {} and not impl.precision_is_set


def test_tail_found_by_constant_vector_shape_when_the_name_is_lost(tmp_path):
    """A bundle whose island list does not name the constant (an older metadata, a renamed initializer):
    the matmul with a constant [1, E, 1] operand still starts the tail; an activation operand never does."""
    pytest.importorskip("onnx")
    net = _parsed(tmp_path, _head_model(dt_name="onnx::MatMul_123"))
    te.constrain_fp32_islands(FakeTrt, net, ("dt",))
    fp32 = _fp32_layers(net)
    assert {"node_matmul", "node_sigmoid", "node_upsample_bilinear2d"} <= fp32
    assert "/visual/transformer/resblocks.0/mlp/c_proj/MatMul" not in fp32


def test_missing_tail_is_reported(tmp_path, caplog):
    pytest.importorskip("onnx")
    net = _parsed(tmp_path, _head_model())
    with caplog.at_level(logging.WARNING, logger="madclip_runtime.engines.trt_engine"):
        te.constrain_fp32_islands(FakeTrt, trt_fakes.FakeNetwork(), ("dt",))
    assert "not pinned" in caplog.text
    assert net.num_layers > 0


def test_network_flags():
    assert te._network_flags(FakeTrt, "strongly_typed", (10, 12, 0)) == 1 << 1
    assert te._network_flags(FakeTrt, "fp16_flag", (10, 3, 0)) == 0  # FP16 builder flag path
    assert te._network_flags(FakeTrt, "fp16_flag", (10, 13, 0)) == 0  # forced flag path on 10.12+
    assert (
        te._network_flags(FakeTrt, "strongly_typed", (11, 0, 0)) == 0
    )  # always strongly typed; flag deprecated
    assert te._network_flags(FakeTrt, "fp32", (10, 12, 0)) == 0


def test_quick_gelu_sigmoids_do_not_pin_the_backbone(tmp_path):
    """Defect 6: with --quick-gelu every block has a sigmoid; the FP32 tail starts at the baked dt, so the
    backbone (its sigmoids, its matmuls, divisions by constants) stays FP16."""
    pytest.importorskip("onnx")
    net = _parsed(tmp_path, _head_model(quick_gelu=True))
    te.constrain_fp32_islands(FakeTrt, net, ("dt",))
    fp32 = _fp32_layers(net)
    backbone = {
        "/visual/transformer/resblocks.0/mlp/gelu/Sigmoid",
        "/visual/transformer/resblocks.0/mlp/gelu/Mul",
        "/visual/transformer/resblocks.0/mlp/c_proj/MatMul",
        "node_div_gelu",
        "/visual/conv1/Conv",
    }
    assert not backbone & fp32
    assert {"node_layer_norm", "node_matmul", "node_sigmoid", "node_mean"} <= fp32


# ---- the builder on a fake tensorrt (the API calls NVIDIA documents; no GPU) --------------------------------


_Flag, _Config, _FakeBuilderTrt = trt_fakes.BuilderFlag, trt_fakes.FakeConfig, trt_fakes.FakeBuilderTrt


@pytest.fixture()
def fake_trt(monkeypatch, tmp_path):
    import onnx

    trt = _FakeBuilderTrt()
    monkeypatch.setattr(te, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(te._TrtLogger, "get", classmethod(lambda cls, trt: None))
    monkeypatch.setattr(te, "compute_capability", lambda device=0: (8, 7))
    monkeypatch.setattr(te, "device_name", lambda device=0: "Orin")
    monkeypatch.delenv(tr.FP16_PATH_ENV, raising=False)
    onnx_path = tmp_path / "model.onnx"
    onnx.save(_head_model(), str(onnx_path))
    return trt, onnx_path


def test_fp16_flag_build_pins_the_tail_through_build_engine(fake_trt, tmp_path):
    """The whole FP16-flag build on TensorRT 10.3 (fakes): parse, downcast, pin, build; the key records it."""
    trt, onnx_path = fake_trt
    key = te.engine_key(onnx_path, "fp16", 2, fp32_islands=("dt",))
    assert key.typing == "fp16_flag" and key.fp32_islands == ("dt",)
    assert key.builder_flags == ("+FP16", "+OBEY_PRECISION_CONSTRAINTS")
    te.build_engine(onnx_path, tmp_path / "e.engine", key)
    fp32 = _fp32_layers(trt.networks[-1])
    assert {"dt", "node_matmul", "node_sigmoid", "node_layer_norm"} <= fp32
    assert "/visual/transformer/resblocks.0/mlp/c_proj/MatMul" not in fp32
    te.build_engine(onnx_path, tmp_path / "e32.engine", te.engine_key(onnx_path, "fp32", 2))
    assert _fp32_layers(trt.networks[-1]) == set()  # fp32 engines: no constraints (TF32 cleared instead)


def test_forced_fp16_flag_path_on_trt_10_12(fake_trt, tmp_path, monkeypatch):
    """gpu_check's option: $MADCLIP_TRT_FP16_PATH=flag builds the JetPack path on a TensorRT that has both."""
    trt, onnx_path = fake_trt
    monkeypatch.setattr(_FakeBuilderTrt, "__version__", "10.13.2")
    assert te.engine_key(onnx_path, "fp16", 2).typing == "strongly_typed"
    monkeypatch.setenv(tr.FP16_PATH_ENV, "flag")
    key = te.engine_key(onnx_path, "fp16", 2, fp32_islands=("dt",))
    assert key.typing == "fp16_flag" and tr.onnx_variant("fp16", "10.13.2") == "model.onnx"
    te.build_engine(onnx_path, tmp_path / "e.engine", key)
    assert "node_matmul" in _fp32_layers(trt.networks[-1])
    with pytest.raises(BackendUnavailable, match="no FP16 builder flag"):
        tr.typing_mode("11.0.0")
    monkeypatch.setenv(tr.FP16_PATH_ENV, "sometimes")
    with pytest.raises(BackendUnavailable, match="expected one of"):
        tr.typing_mode("10.3.0")


def test_engine_key_changes_with_islands_flags_and_rules(fake_trt, tmp_path):
    """Defect 4: an engine built for other FP32 islands, builder flags or rules is never reused."""
    trt, onnx_path = fake_trt
    cache = tmp_path / "cache"
    first = te.ensure_engine(onnx_path, cache, "fp16", 2, fp32_islands=("dt",))
    n = len(trt.configs)
    assert (
        te.ensure_engine(onnx_path, cache, "fp16", 2, fp32_islands=("dt",)) == first and len(trt.configs) == n
    )
    other = te.ensure_engine(onnx_path, cache, "fp16", 2, fp32_islands=("text", "one"))
    assert other != first and len(trt.configs) == n + 1
    assert tr.read_engine_key(other).fp32_islands == ("text", "one")
    assert tr.RULES_VERSION >= 3


def test_fp32_engine_is_built_without_tf32(fake_trt, tmp_path):
    """Defect 9: TF32 is on by default; an "fp32" engine clears it. FP16 keeps it."""
    trt, onnx_path = fake_trt
    te.build_engine(onnx_path, tmp_path / "e32.engine", te.engine_key(onnx_path, "fp32", 2))
    assert _Flag.TF32 not in trt.configs[-1].flags
    te.build_engine(
        onnx_path, tmp_path / "e16.engine", te.engine_key(onnx_path, "fp16", 2, fp32_islands=("dt",))
    )
    assert {_Flag.TF32, _Flag.FP16, _Flag.OBEY_PRECISION_CONSTRAINTS} <= trt.configs[-1].flags


def test_foreign_timing_cache_is_replaced_by_a_fresh_one(fake_trt, tmp_path, caplog):
    """Defect 8: set_timing_cache's result is checked; a cache that does not attach is replaced, and the
    saved cache is the one the build used (get_timing_cache would otherwise return None)."""
    trt, onnx_path = fake_trt
    trt.accept_blob = False
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from-another-gpu")
    with caplog.at_level(logging.WARNING, logger="madclip_runtime.engines.trt_engine"):
        te.build_engine(
            onnx_path, tmp_path / "e.engine", te.engine_key(onnx_path, "fp32", 2), timing_cache_file=cache
        )
    assert "starting a new one" in caplog.text
    assert trt.configs[-1].attached is not None and trt.configs[-1].attached.blob == b""
    assert cache.read_bytes() == b"timing:"  # the fresh cache was saved


def test_timing_cache_that_never_attaches_does_not_break_the_build(fake_trt, tmp_path, monkeypatch):
    trt, onnx_path = fake_trt
    monkeypatch.setattr(_Config, "set_timing_cache", lambda self, cache, ignore: False)
    cache = tmp_path / "timing.cache"
    te.build_engine(
        onnx_path, tmp_path / "e.engine", te.engine_key(onnx_path, "fp32", 2), timing_cache_file=cache
    )
    assert (tmp_path / "e.engine").read_bytes() == b"PLAN" and not cache.exists()


def test_ensure_engine_shared_dir_keyed_by_model(fake_trt, tmp_path):
    """Defect 3: one cache dir, two models (same file name, other weights incl. external data): two engines;
    the same model again: reused."""
    trt, onnx_path = fake_trt
    cache = tmp_path / "cache"
    first = te.ensure_engine(onnx_path, cache, "fp32", 2)
    (tmp_path / "model.onnx.data").write_bytes(b"retrained weights")
    second = te.ensure_engine(onnx_path, cache, "fp32", 2)
    assert first != second and first.is_file() and second.is_file()
    assert tr.read_engine_key(second).model_sha256 == tr.file_sha256(onnx_path)
    n = len(trt.configs)
    assert te.ensure_engine(onnx_path, cache, "fp32", 2) == second and len(trt.configs) == n  # no rebuild
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_ensure_engine_does_not_probe_the_gpu_again(fake_trt, tmp_path, monkeypatch):
    """Structure: the GPU is checked once, by backends; the builder does not re-check it."""
    _, onnx_path = fake_trt
    monkeypatch.setattr(cuda_probe, "probe_gpu", lambda: pytest.fail("trt_engine probed the GPU again"))
    te.ensure_engine(onnx_path, tmp_path, "fp32", 2)


# ---- the GPU probe (defect 4) and stream handles (defect 12) -------------------------------------------------


class _Err(enum.Enum):
    cudaSuccess = 0
    cudaErrorInsufficientDriver = 35


def _fake_cudart(err):
    return types.SimpleNamespace(
        cudaError_t=_Err,
        cudaGetDeviceCount=lambda: (err, 0 if err != _Err.cudaSuccess else 2),
        cudaGetErrorString=lambda e: (
            _Err.cudaSuccess,
            b"CUDA driver version is insufficient for CUDA runtime version",
        ),
    )


def test_probe_falls_back_to_libcuda_and_keeps_the_error(monkeypatch):
    """Defect 4: cuda-python 13 on an older driver answers cudaErrorInsufficientDriver: that is not "no GPU";
    the driver library is asked, the error is kept (shown), and TensorRT (which needs cuda-python) is off."""
    monkeypatch.setattr(cuda_probe, "import_cudart", lambda: _fake_cudart(_Err.cudaErrorInsufficientDriver))
    monkeypatch.setattr(cuda_probe, "_libcuda_count", lambda: (1, None))
    found = cuda_probe.probe_gpu()
    assert found.count == 1 and found.source == "libcuda" and not found.cudart_ok
    assert "cudaErrorInsufficientDriver" in found.error and "insufficient" in found.error
    monkeypatch.setattr(cuda_probe, "import_cudart", lambda: _fake_cudart(_Err.cudaSuccess))
    assert cuda_probe.probe_gpu() == cuda_probe.GpuProbe(2, "cuda-python")


def test_backends_use_the_probe(monkeypatch):
    from madclip_runtime.engines import backends

    probe = cuda_probe.GpuProbe(1, "libcuda", "cuda-python: cudaErrorInsufficientDriver: ...")
    monkeypatch.setattr(cuda_probe, "cached_probe", lambda: probe)
    assert backends._visible_gpu() is True  # ort-cuda / ort-trt stay available
    monkeypatch.setattr(
        backends.trt_engine, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.3.0")
    )
    with pytest.raises(BackendUnavailable, match=r"cuda-python<13"):
        backends.require_trt()


def test_native_handle_uses_cuda_bindings_13_helper(monkeypatch):
    """Defect 12: int(stream) is deprecated in cuda-bindings 13; its get_cuda_native_handle is used."""
    utils = types.ModuleType("cuda.bindings.utils")
    utils.get_cuda_native_handle = lambda obj: 0xBEEF
    monkeypatch.setitem(sys.modules, "cuda.bindings.utils", utils)

    class Stream:
        def __int__(self):
            raise AssertionError("int() used")

    assert cuda_probe.native_handle(Stream()) == 0xBEEF
    monkeypatch.setitem(sys.modules, "cuda.bindings.utils", None)  # cuda-bindings 12: no helper
    assert cuda_probe.native_handle(7) == 7


def test_trt_extra_pins_cuda_python_below_13():
    """Defect 4: cuda-python 13 needs an R580+ driver, which JetPack 6 does not have."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    cuda = [d for d in extras["trt"] if d.replace(" ", "").startswith("cuda-python")]
    assert cuda and "<13" in cuda[0]


# ---- the runner on a fake engine and a fake cudart whose "device" is host memory ------------------------------


class _FakeCudart:
    """cuda-python's runtime API surface the runner uses; device and pinned memory are ctypes buffers."""

    cudaError_t = _Err
    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def __init__(self):
        self.buffers, self.pinned, self.freed_host, self.copies = {}, set(), set(), []

    def _alloc(self, n):
        buf = ctypes.create_string_buffer(n)
        self.buffers[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    def cudaMalloc(self, n):  # noqa: N802 (cuda-python's names)
        return _Err.cudaSuccess, self._alloc(n)

    def cudaMallocHost(self, n):  # noqa: N802
        ptr = self._alloc(n)
        self.pinned.add(ptr)
        return _Err.cudaSuccess, ptr

    def cudaFreeHost(self, ptr):  # noqa: N802
        self.freed_host.add(ptr)
        return (_Err.cudaSuccess,)

    def cudaFree(self, ptr):  # noqa: N802
        return (_Err.cudaSuccess,)

    def cudaStreamCreate(self):  # noqa: N802
        return _Err.cudaSuccess, "stream"

    def cudaStreamDestroy(self, s):  # noqa: N802
        return (_Err.cudaSuccess,)

    def cudaStreamSynchronize(self, s):  # noqa: N802
        return (_Err.cudaSuccess,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):  # noqa: N802
        self.copies.append((src in self.pinned if kind == 1 else dst in self.pinned, kind))
        ctypes.memmove(dst, src, n)
        return (_Err.cudaSuccess,)

    def cudaGetErrorString(self, e):  # noqa: N802
        return _Err.cudaSuccess, b"error"


class _FakeEngineTrt:
    __version__ = "10.3.0"
    TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")

    @staticmethod
    def nptype(dtype):
        return dtype

    def Runtime(self, logger):  # noqa: N802
        return types.SimpleNamespace(deserialize_cuda_engine=lambda blob: _FakeEngine())


class _FakeEngine:
    names = ["image", "score", "anomaly_map", "score_map_max"]
    num_io_tensors = 4

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, n):
        return "in" if n == "image" else "out"

    def get_tensor_dtype(self, n):
        return np.float32

    def get_tensor_profile_shape(self, n, p):
        return (1, 3, 4, 4), (1, 3, 4, 4), (3, 3, 4, 4)

    def create_execution_context(self):
        return _FakeContext()


class _FakeContext:
    def __init__(self):
        self.batch, self.addr, self.handles = 3, {}, []

    def set_input_shape(self, name, shape):
        self.batch = shape[0]
        return True

    def get_tensor_shape(self, n):
        b = self.batch
        return {"image": (b, 3, 4, 4), "score": (b,), "anomaly_map": (b, 1, 4, 4), "score_map_max": (b,)}[n]

    def set_tensor_address(self, n, ptr):
        self.addr[n] = ptr

    def execute_async_v3(self, handle):
        self.handles.append(handle)
        b = self.batch
        x = np.frombuffer((ctypes.c_float * (b * 48)).from_address(self.addr["image"]), np.float32).reshape(
            b, 3, 4, 4
        )
        amap = x.mean(axis=1, keepdims=True)
        for name, value in (
            ("anomaly_map", amap),
            ("score", amap.mean(axis=(1, 2, 3))),
            ("score_map_max", amap.max(axis=(1, 2, 3))),
        ):
            flat = np.ascontiguousarray(value, np.float32).ravel()
            ctypes.memmove(self.addr[name], flat.ctypes.data, flat.nbytes)
        return True


def test_runner_uses_pinned_host_buffers_and_native_stream_handle(monkeypatch, tmp_path):
    """Defect 12: the async copies go through pinned (cudaMallocHost) buffers, the stream handle comes from
    `native_handle`, results are right for every batch size and independent of the next call."""
    cudart = _FakeCudart()
    monkeypatch.setattr(te, "import_tensorrt", lambda: _FakeEngineTrt())
    monkeypatch.setattr(te, "import_cudart", lambda: cudart)
    monkeypatch.setattr(te._TrtLogger, "get", classmethod(lambda cls, trt: None))
    monkeypatch.setattr(te, "native_handle", lambda s: 4242)
    (tmp_path / "e.engine").write_bytes(b"PLAN")
    runner = te.TrtRunner(tmp_path / "e.engine")
    assert runner.max_batch == 3 and runner.input_chw == (3, 4, 4)
    rng = np.random.default_rng(0)
    first = None
    for batch in (1, 3, 2):
        x = rng.normal(size=(batch, 3, 4, 4)).astype(np.float32)
        out = runner.run(x)
        amap = x.mean(axis=1, keepdims=True)
        np.testing.assert_allclose(out["anomaly_map"], amap, rtol=1e-6)
        np.testing.assert_allclose(out["score"], amap.mean(axis=(1, 2, 3)), rtol=1e-6)
        assert out["score_map_max"].shape == (batch,) and out["score"].dtype == np.float32
        first = first if first is not None else (out, x)
    np.testing.assert_allclose(
        first[0]["anomaly_map"], first[1].mean(axis=1, keepdims=True), rtol=1e-6
    )  # not overwritten
    assert cudart.copies and all(pinned for pinned, _ in cudart.copies)
    assert runner._context.handles == [4242, 4242, 4242]
    with pytest.raises(InputError):
        runner.run(np.zeros((4, 3, 4, 4), np.float32))
    pinned = set(cudart.pinned)
    runner.close()
    assert cudart.freed_host == pinned


def test_trt_and_backend_tests_import_no_other_test_module():
    """Defect 1: `from test_backends import ...` raises at collection (tests/ is a package), so on a machine
    with TensorRT and a GPU the TensorRT tests would never run. Shared helpers live in tests/conftest.py."""
    import ast

    here = Path(__file__).resolve().parent
    for path in [*here.glob("test_trt_*.py"), here / "test_backends.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = (node.module or "").split(".")[-1]
                assert not module.startswith("test_"), f"{path.name} imports {node.module}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.split(".")[-1].startswith("test_") for a in node.names), path.name


def test_trt_gpu_module_collects_where_tensorrt_and_a_gpu_are(monkeypatch):
    """Defect 1, the behaviour: with the backend usable (faked), the GPU test module imports cleanly."""
    import importlib

    from madclip_runtime.engines import backends

    pytest.importorskip("onnx")
    monkeypatch.setattr(backends, "require_trt", lambda: None)
    monkeypatch.delitem(sys.modules, "tests.test_trt_gpu", raising=False)
    try:
        module = importlib.import_module("tests.test_trt_gpu")
        assert callable(module.test_build_and_run_fp32_engine)
    finally:
        sys.modules.pop("tests.test_trt_gpu", None)


def test_fp16_flag_build_pins_the_tail_from_the_bundles_own_constants(tmp_path):
    """A method whose head starts at other constants than MadCLIP's `dt` (MVFA: its text and normalisers) gets its
    FP32 tail pinned on the TensorRT FP16-flag path: the bundle metadata's `fp32_islands` reach the builder."""
    from madclip_runtime.bundles import bundle as bundle_mod
    from madclip_runtime.bundles import metadata_schema
    from madclip_runtime.engines import trt_engine
    from madclip_runtime.errors import BundleError

    from .conftest import build_tiny_bundle

    calls = []

    class _Config:
        def set_flag(self, flag):
            pass

        def clear_flag(self, flag):
            pass

    trt = types.SimpleNamespace(
        BuilderFlag=types.SimpleNamespace(TF32="tf32", FP16="fp16", OBEY_PRECISION_CONSTRAINTS="obey"),
        __version__="10.3.0",
    )  # configure_precision only; the network is not read
    key = types.SimpleNamespace(precision="fp16", typing="fp16_flag")
    orig = trt_engine.constrain_fp32_islands
    trt_engine.constrain_fp32_islands = lambda t, n, tail: calls.append(tuple(tail)) or 0
    try:
        trt_engine.configure_precision(trt, _Config(), object(), key, ("text", "norm_lo"))
        trt_engine.configure_precision(trt, _Config(), object(), key, ("dt",))
        with pytest.raises(ValueError, match="fp32_islands"):  # no MadCLIP default: the bundle must name them
            trt_engine.configure_precision(trt, _Config(), object(), key)
    finally:
        trt_engine.constrain_fp32_islands = orig
    assert calls == [("text", "norm_lo"), ("dt",)]
    b = bundle_mod.Bundle(path=str(tmp_path), meta={"fp32_islands": ["text", "one"]}, spec=None)
    assert b.fp32_islands == ("text", "one")
    assert bundle_mod.Bundle(path=str(tmp_path), meta={}, spec=None).fp32_islands == ("dt",)  # older bundles
    meta = json.loads((build_tiny_bundle(tmp_path / "b") / "metadata.json").read_text())
    metadata_schema.validate_metadata({**meta, "fp32_islands": ["text", "one"]}, "metadata.json")
    with pytest.raises(BundleError, match="fp32_islands"):
        metadata_schema.validate_metadata({**meta, "fp32_islands": [3]}, "metadata.json")


def test_export_survives_an_engine_build_error_unless_engine_was_asked(monkeypatch, tmp_path):
    """Defect 5: a TensorRT build error other than "backend unavailable" does not abort an export that did
    not ask for --engine (the bundle is written, the reason reported); with --engine it does."""
    pytest.importorskip("onnx")
    from madclip_export import export as ex
    from madclip_runtime.engines import backends

    def boom(*a, **k):
        raise RuntimeError("[TRT] [E] 2: [optimizer.cpp::computeCosts] Error Code 2: Internal Error\nmore")

    monkeypatch.setattr(backends, "require_trt", lambda: None)
    monkeypatch.setattr(backends, "prebuild_trt_engine", boom)
    opts = ex.ExportOptions(run=str(tmp_path), out=str(tmp_path / "b"), fp16=True, max_batch=2)
    got = ex._maybe_build_engine(tmp_path, opts, lambda msg: None, ("dt",))
    assert got["built"] is False and "RuntimeError" in got["reason"] and "\n" not in got["reason"]
    import dataclasses

    opts = dataclasses.replace(opts, engine=True)
    with pytest.raises(RuntimeError, match="Internal Error"):
        ex._maybe_build_engine(tmp_path, opts, lambda msg: None, ("dt",))


def test_export_engine_is_found_again_by_the_runtime_key(fake_trt, tmp_path, monkeypatch):
    """Defect 5: the engine madclip-export builds (into $MADCLIP_CACHE) is the one the GPU check and the
    runtime look up afterwards (same key, islands included): built once, never twice."""
    from madclip_export import export as ex
    from madclip_runtime.engines import backends

    trt, onnx_path = fake_trt
    monkeypatch.setenv("MADCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(backends, "require_trt", lambda: trt)
    opts = ex.ExportOptions(run=str(tmp_path), out=str(tmp_path / "b"), fp16=True, max_batch=2)
    got = ex._maybe_build_engine(onnx_path.parent, opts, lambda msg: None, ("text", "one"))
    assert got["built"] is True
    builds = len(trt.configs)
    again, _ = backends.prebuild_trt_engine(onnx_path.parent, "fp16", 2, fp32_islands=("text", "one"))
    assert str(again) == got["cached_engine"] and len(trt.configs) == builds
    assert again.parent == tmp_path / "cache" / "engines" / "trt"


def test_engine_built_under_older_rules_is_rebuilt_with_a_reason(fake_trt, tmp_path, caplog):
    """Defect 4: a sidecar written before the islands/flags fields existed (rules version 2) is read, and the
    engine is rebuilt, saying why."""
    trt, onnx_path = fake_trt
    cache = tmp_path / "cache"
    want = te.engine_key(onnx_path, "fp16", 2, fp32_islands=("dt",))
    old = {
        k: v
        for k, v in json.loads(want.to_json()).items()
        if k not in ("fp32_islands", "builder_flags", "workspace_bytes")
    }
    old["rules_version"] = 2
    cache.mkdir()
    (cache / want.file_name).write_bytes(b"OLD PLAN")
    tr.sidecar_path(cache / want.file_name).write_text(json.dumps(old))
    assert tr.read_engine_key(cache / want.file_name).rules_version == 2
    with caplog.at_level(logging.INFO, logger="madclip_runtime.engines.trt_engine"):
        path = te.ensure_engine(onnx_path, cache, "fp16", 2, fp32_islands=("dt",))
    assert "precision rules version 2 -> 3" in caplog.text and "FP32 islands () -> ('dt',)" in caplog.text
    assert path.read_bytes() == b"PLAN"
