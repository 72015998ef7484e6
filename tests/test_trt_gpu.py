"""TensorRT engines on a real GPU: build, cache, rebuild on mismatch, run. Skipped without TensorRT or a GPU."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from madclip_runtime.engines import backends
from madclip_runtime.engines import trt_engine as te
from madclip_runtime.engines import trt_rules as tr
from madclip_runtime.errors import BackendUnavailable

pytestmark = [pytest.mark.trt, pytest.mark.gpu]


def _skip_reason() -> str | None:
    try:
        backends.require_trt()
    except BackendUnavailable as exc:
        return f"TensorRT backend unavailable: {exc}"
    return None


_REASON = _skip_reason()
if _REASON:
    pytest.skip(_REASON, allow_module_level=True)

onnx = pytest.importorskip("onnx")
from .conftest import images, make_tiny_model, reference_outputs  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from onnxconverter_common import float16

    d = tmp_path_factory.mktemp("trt_bundle")
    model = make_tiny_model()
    onnx.save(model, str(d / "model.onnx"))
    onnx.save(float16.convert_float_to_float16(model, keep_io_types=True), str(d / "model_fp16.onnx"))
    return d


def _close(out, ref, atol):
    for name in ("score", "anomaly_map", "score_map_max"):
        assert out[name].dtype == np.float32
        np.testing.assert_allclose(out[name], ref[name], atol=atol, rtol=0, err_msg=name)


def test_build_and_run_fp32_engine(bundle, tmp_path):
    engine = tmp_path / "tiny.engine"
    cache = tmp_path / "timing.cache"
    key = te.build_engine(
        bundle / "model.onnx",
        engine,
        te.engine_key(bundle / "model.onnx", "fp32", 4),
        timing_cache_file=cache,
    )
    assert engine.is_file() and cache.is_file()
    assert tr.read_engine_key(engine) == key and key.max_batch == 4 and key.typing == "fp32"
    runner = te.TrtRunner(engine)
    try:
        assert runner.max_batch == 4 and runner.input_chw == (3, 16, 16)
        for batch in (1, 3):
            x = images(batch)
            _close(runner.run(x), reference_outputs(x), atol=1e-4)
    finally:
        runner.close()


def test_ensure_engine_reuses_then_rebuilds_on_mismatch(bundle, tmp_path, caplog):
    onnx_path = bundle / "model.onnx"
    with caplog.at_level(logging.INFO, logger="madclip_runtime.engines.trt_engine"):
        first = te.ensure_engine(onnx_path, tmp_path, "fp32", 2)
    assert "building TensorRT engine" in caplog.text
    stamp = os.stat(first).st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="madclip_runtime.engines.trt_engine"):
        again = te.ensure_engine(onnx_path, tmp_path, "fp32", 2)
    assert again == first and os.stat(again).st_mtime_ns == stamp
    assert "using cached TensorRT engine" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="madclip_runtime.engines.trt_engine"):
        other = te.ensure_engine(onnx_path, tmp_path, "fp32", 2, model_sha256="0" * 64)
    assert other != first and "building TensorRT engine" in caplog.text  # another model: its own file


def test_fp16_engine_close_to_reference(bundle, tmp_path):
    trt = te.import_tensorrt()
    onnx_path = bundle / tr.onnx_variant("fp16", trt.__version__)
    engine = te.ensure_engine(onnx_path, tmp_path, "fp16", 4, fp32_islands=("dt",))
    runner = te.TrtRunner(engine)
    try:
        x = images(3, seed=7)
        _close(runner.run(x), reference_outputs(x), atol=1e-2)
    finally:
        runner.close()


def test_trt_backend_end_to_end(bundle, tmp_path):
    assert "trt" in backends.available_backends()
    be = backends.create_backend(
        "trt", str(bundle / "model_fp16.onnx"), "fp16", 2, str(tmp_path), fp32_islands=("dt",)
    )
    try:
        assert be.provider == "TensorRT" and be.load_seconds > 0
        x = images(5, seed=8)  # > max_batch: runs in chunks
        _close(be.run(x), reference_outputs(x), atol=1e-2)
    finally:
        be.close()


def test_timing_cache_from_this_gpu_is_reused(bundle, tmp_path, caplog):
    """The timing cache written by one build attaches to the next (set_timing_cache returns True)."""
    te.ensure_engine(bundle / "model.onnx", tmp_path, "fp32", 2)
    with caplog.at_level(logging.WARNING, logger="madclip_runtime.engines.trt_engine"):
        te.ensure_engine(bundle / "model.onnx", tmp_path, "fp16", 2, fp32_islands=("dt",))
    assert "timing cache not usable" not in caplog.text


def test_ort_trt_and_ort_cuda_run_without_fallback(bundle, tmp_path):
    for name in ("ort-cuda", "ort-trt"):
        if name not in backends.available_backends():
            pytest.skip(f"{name} not available")
        be = backends.create_backend(name, str(bundle / "model.onnx"), "fp32", 2, str(tmp_path))
        try:
            x = images(2, seed=3)
            _close(be.run(x), reference_outputs(x), atol=1e-3)  # TF32 in cuDNN/cuBLAS: 1e-3
            assert be.session._enable_fallback is False
        finally:
            be.close()


def test_fp16_flag_tail_on_the_real_parser(tmp_path, monkeypatch):
    """Issue 21 on real TensorRT: the real ONNX parser's network gets its FP32 tail by structure (the `dt`
    constant layer is found by name, the product with it is pinned, re-classing ILayer works), and the
    FP16-flag engine (forced on 10.12-10.x, native on 10.0-10.11) builds and stays close to FP32."""
    from .trt_fakes import head_model

    trt = te.import_tensorrt()
    version = tr.parse_trt_version(trt.__version__)
    if version[0] >= 11:
        pytest.skip("TensorRT 11 has no FP16 builder flag")
    monkeypatch.setenv(tr.FP16_PATH_ENV, "flag")
    path = tmp_path / "model.onnx"
    onnx.save(head_model(), str(path))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(path))
    names = {network.get_layer(i).name: i for i in range(network.num_layers)}
    assert "dt" in names and network.get_layer(names["dt"]).type == trt.LayerType.CONSTANT
    assert te.constrain_fp32_islands(trt, network, ("dt",)) > 0
    for name in ("node_matmul", "node_sigmoid", "node_layer_norm"):
        layer = network.get_layer(names[name])
        assert layer.precision_is_set and layer.precision == trt.float32, name
    backbone = network.get_layer(names["/visual/transformer/resblocks.0/mlp/c_proj/MatMul"])
    assert not backbone.precision_is_set
    key = te.engine_key(path, "fp16", 2)
    assert key.typing == "fp16_flag"
    te.build_engine(path, tmp_path / "flag.engine", key, timing_cache_file=tmp_path / "timing.cache")
    runner = te.TrtRunner(tmp_path / "flag.engine")
    try:
        x = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
        import onnxruntime as ort

        ref = dict(
            zip(
                ["score", "anomaly_map", "score_map_max"],
                ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
                    ["score", "anomaly_map", "score_map_max"], {"image": x}
                ),
            )
        )
        _close(runner.run(x), ref, atol=1e-2)
    finally:
        runner.close()
