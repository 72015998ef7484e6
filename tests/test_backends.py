"""onnxruntime backends on the CPU with a tiny ONNX model of the bundle's interface (image -> score, map, max)."""
from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from madclip_runtime import backends  # noqa: E402
from madclip_runtime.errors import BackendUnavailable, BundleError, InputError  # noqa: E402

from .conftest import SIZE, images, make_tiny_model, reference_outputs  # noqa: E402

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from onnxconverter_common import float16

    d = tmp_path_factory.mktemp("bundle")
    model = make_tiny_model()
    onnx.save(model, str(d / "model.onnx"))
    fp16 = float16.convert_float_to_float16(model, keep_io_types=True)
    onnx.save(fp16, str(d / "model_fp16.onnx"))
    return d


def _assert_close(out: dict, ref: dict, atol: float) -> None:
    assert set(out) == {"score", "anomaly_map", "score_map_max"}
    for name, value in out.items():
        assert value.dtype == np.float32, name
        assert value.shape == ref[name].shape, name
        np.testing.assert_allclose(value, ref[name], atol=atol, rtol=0, err_msg=name)


@pytest.mark.parametrize("batch", [1, 3])
def test_ort_cpu_fp32_values(model_dir, batch):
    x = images(batch)
    with backends.create_backend("ort-cpu", str(model_dir / "model.onnx"), "fp32", 8, None) as be:
        assert be.name == "ort-cpu" and be.precision == "fp32"
        assert be.provider == "CPUExecutionProvider"
        assert be.load_seconds > 0
        out = be.run(x)
    _assert_close(out, reference_outputs(x), atol=1e-5)


def test_batches_larger_than_max_batch_run_in_chunks(model_dir):
    x = images(5, seed=3)
    be = backends.create_backend("ort-cpu", str(model_dir / "model.onnx"), "fp32", 2, None)
    out = be.run(x)
    be.close()
    _assert_close(out, reference_outputs(x), atol=1e-5)
    with pytest.raises(BackendUnavailable):
        be.run(x)


def test_fp16_model_on_cpu_avoids_enable_all_and_runs(model_dir):
    be = backends.create_backend("ort-cpu", str(model_dir / "model_fp16.onnx"), "fp16", 8, None)
    level = be.session.get_session_options().graph_optimization_level
    assert level != ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    x = images(3, seed=4)
    _assert_close(be.run(x), reference_outputs(x), atol=5e-3)


def test_session_options_rule():
    lv = ort.GraphOptimizationLevel
    assert backends.session_options(True, True).graph_optimization_level == lv.ORT_ENABLE_EXTENDED
    assert backends.session_options(True, False).graph_optimization_level == lv.ORT_ENABLE_EXTENDED
    assert backends.session_options(False, True).graph_optimization_level == lv.ORT_ENABLE_ALL
    assert backends.session_options(False, True).intra_op_num_threads == 0  # all cores


def test_fp16_file_name_alone_forces_safe_level(model_dir):
    # Even if the caller says fp32, a file named like the FP16 variant must not be opened at ENABLE_ALL.
    be = backends.create_backend("ort-cpu", str(model_dir / "model_fp16.onnx"), "fp32", 8, None)
    assert be.session.get_session_options().graph_optimization_level != ort.GraphOptimizationLevel.ORT_ENABLE_ALL


@pytest.mark.parametrize("name", ["ort-cuda", "ort-trt", "trt"])
def test_gpu_backends_unavailable_here_one_line(model_dir, name):
    if name in backends.available_backends():
        pytest.skip(f"{name} is available on this machine")
    with pytest.raises(BackendUnavailable) as info:
        backends.create_backend(name, str(model_dir / "model.onnx"), "fp32", 8, None)
    message = str(info.value)
    assert message and "\n" not in message
    if name != "trt":
        assert name in message


def test_available_backends_and_auto():
    found = backends.available_backends()
    assert "ort-cpu" in found
    assert set(found) <= set(backends.BACKENDS)
    assert found == [b for b in backends.BACKENDS if b in found]  # fastest first
    if not backends._visible_gpu():
        assert found == ["ort-cpu"]
        assert backends.resolve_auto("fp32") == "ort-cpu"
        assert backends.resolve_auto("fp16") == "ort-cpu"
    assert backends.resolve_auto("int8") == "ort-cpu"


def test_auto_backend_runs(model_dir):
    x = images(2, seed=5)
    be = backends.create_backend("auto", str(model_dir / "model.onnx"), "fp32", 4, None)
    assert be.name in backends.BACKENDS
    _assert_close(be.run(x), reference_outputs(x), atol=1e-3)


def test_check_provider_detects_silent_fallback():
    assert backends.check_provider("ort-cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == "CUDAExecutionProvider"
    with pytest.raises(BackendUnavailable, match="fell back to CPUExecutionProvider"):
        backends.check_provider("ort-cuda", ["CPUExecutionProvider"])
    with pytest.raises(BackendUnavailable, match="TensorrtExecutionProvider"):
        backends.check_provider("ort-trt", ["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_trt_ep_options(tmp_path):
    opts = backends.trt_ep_options("fp16", tmp_path, 8, (3, 240, 240), (1, 20))
    assert opts["trt_fp16_enable"] is True
    assert opts["trt_engine_cache_enable"] is True and opts["trt_engine_cache_path"] == str(tmp_path)
    assert opts["trt_timing_cache_enable"] is True
    assert opts["trt_profile_min_shapes"] == "image:1x3x240x240"
    assert opts["trt_profile_opt_shapes"] == "image:1x3x240x240"
    assert opts["trt_profile_max_shapes"] == "image:8x3x240x240"
    # onnxruntime >= 1.22: strongly typed network from the mixed-precision ONNX, no blanket FP16 flag.
    assert "trt_fp16_enable" not in backends.trt_ep_options("fp16", tmp_path, 8, (3, 240, 240), (1, 31))
    assert "trt_fp16_enable" not in backends.trt_ep_options("fp32", tmp_path, 8, (3, 240, 240), (1, 20))
    assert "trt_profile_min_shapes" not in backends.trt_ep_options("fp32", tmp_path, 8, None, (1, 31))


def test_bad_inputs_are_one_line_errors(model_dir, tmp_path):
    be = backends.create_backend("ort-cpu", str(model_dir / "model.onnx"), "fp32", 8, None)
    with pytest.raises(InputError):
        be.run(np.zeros((3, SIZE, SIZE), np.float32))
    with pytest.raises(InputError):
        be.run(np.zeros((1, 1, SIZE, SIZE), np.float32))
    with pytest.raises(InputError):
        be.run(np.zeros((1, 3, SIZE, SIZE), np.uint8))
    out = be.run(images(1).astype(np.float64))  # other float dtypes are converted
    assert out["score"].dtype == np.float32
    with pytest.raises(InputError):
        backends.create_backend("ort-gpu", str(model_dir / "model.onnx"), "fp32", 8, None)
    with pytest.raises(InputError):
        backends.create_backend("ort-cpu", str(model_dir / "model.onnx"), "bf16", 8, None)
    with pytest.raises(BundleError, match="not found"):
        backends.create_backend("ort-cpu", str(tmp_path / "missing.onnx"), "fp32", 8, None)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    with pytest.raises(BundleError) as info:
        backends.create_backend("ort-cpu", str(broken), "fp32", 8, None)
    assert "\n" not in str(info.value) and "broken.onnx" in str(info.value)


def test_missing_onnxruntime_names_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(BackendUnavailable, match=r'pip install "madclip\[cpu\]"'):
        backends.import_onnxruntime()
    with pytest.raises(BackendUnavailable, match=r'pip install "madclip\[gpu\]"'):
        backends.import_onnxruntime(gpu=True)
    assert backends.available_backends() in ([], ["trt"])


def test_fp16_on_cpu_is_logged_not_changed(caplog):
    if backends._visible_gpu():
        pytest.skip("a GPU backend is available here")
    with caplog.at_level(logging.WARNING, logger="madclip_runtime.backends"):
        assert backends.resolve_auto("fp16") == "ort-cpu"
    assert "fp16" in caplog.text
