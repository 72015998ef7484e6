"""onnxruntime backends on the CPU with a tiny ONNX model of the bundle's interface (image -> score, map, max)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from madclip_runtime.engines import backends  # noqa: E402
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
    assert (
        be.session.get_session_options().graph_optimization_level != ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )


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
        assert found == [b for b in ("openvino", "ort-cpu") if b in found]
        assert backends.resolve_auto("fp32") == "ort-cpu"  # openvino: bf16 / its int8 IR (docs/runtime.md)
        assert backends.resolve_auto("fp16") == "ort-cpu"
    assert backends.resolve_auto("int8") == "ort-cpu"


def test_auto_backend_runs(model_dir):
    x = images(2, seed=5)
    be = backends.create_backend("auto", str(model_dir / "model.onnx"), "fp32", 4, None)
    assert be.name in backends.BACKENDS
    _assert_close(be.run(x), reference_outputs(x), atol=1e-3)


def test_check_provider_detects_silent_fallback():
    assert (
        backends.check_provider("ort-cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"])
        == "CUDAExecutionProvider"
    )
    with pytest.raises(BackendUnavailable, match="fell back to CPUExecutionProvider"):
        backends.check_provider("ort-cuda", ["CPUExecutionProvider"])
    with pytest.raises(BackendUnavailable, match="TensorrtExecutionProvider"):
        backends.check_provider("ort-trt", ["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_trt_ep_options(tmp_path):
    opts = backends.trt_ep_options("fp16", tmp_path, 8, (3, 240, 240), (1, 20))
    assert opts["trt_engine_cache_enable"] is True and opts["trt_engine_cache_path"] == str(tmp_path)
    assert opts["trt_timing_cache_enable"] is True
    assert opts["trt_profile_min_shapes"] == "image:1x3x240x240"
    assert opts["trt_profile_opt_shapes"] == "image:1x3x240x240"
    assert opts["trt_profile_max_shapes"] == "image:8x3x240x240"
    assert "trt_profile_min_shapes" not in backends.trt_ep_options("fp32", tmp_path, 8, None, (1, 31))


@pytest.mark.parametrize("version", [(1, 20), (1, 21), (1, 22), (1, 31)])
def test_ort_trt_fp16_is_strongly_typed_on_every_supported_onnxruntime(tmp_path, version):
    """Defect 5: the provider builds strongly typed networks (FP16 flag off) since PR 19695, long before
    1.22: on 1.20-1.21 the blanket FP16 flag let TensorRT put LayerNorm in FP16."""
    opts = backends.trt_ep_options("fp16", tmp_path, 8, (3, 240, 240), version)
    assert "trt_fp16_enable" not in opts and "trt_layer_norm_fp32_fallback" not in opts


def test_ort_trt_fp16_flag_path_keeps_layernorm_fp32(tmp_path):
    """Defect 5: where only the FP16 flag exists, LayerNorm falls back to FP32 (provider option)."""
    opts = backends.trt_ep_options("fp16", tmp_path, 8, (3, 240, 240), (1, 17))
    assert opts["trt_fp16_enable"] is True and opts["trt_layer_norm_fp32_fallback"] is True
    assert "trt_fp16_enable" not in backends.trt_ep_options("fp32", tmp_path, 8, None, (1, 17))


class _FakeSession:
    def __init__(self, providers):
        self._providers, self.fallback = providers, True

    def get_providers(self):
        return self._providers

    def get_inputs(self):
        return [type("I", (), {"name": "image"})()]

    def get_outputs(self):
        return [type("O", (), {"name": n})() for n in ("score", "anomaly_map", "score_map_max")]

    def disable_fallback(self):
        self.fallback = False


class _FakeOrt:
    """onnxruntime with GPU providers: records sessions; can print the fallback banner like the real one."""

    __version__ = "1.20.1"
    GraphOptimizationLevel = type("L", (), {"ORT_ENABLE_ALL": 99, "ORT_ENABLE_EXTENDED": 2})

    class SessionOptions:
        def add_session_config_entry(self, key, value):
            pass

    def __init__(self, banner=False):
        self.banner, self.calls = banner, []

    def get_available_providers(self):
        return ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

    def InferenceSession(self, path, sess_options=None, providers=None, **kwargs):  # noqa: N802 (onnxruntime's name)
        self.calls.append({"path": path, "providers": providers, **kwargs})
        if self.banner:
            print("EP Error: something when using TensorrtExecutionProvider")
        return _FakeSession([p[0] if isinstance(p, tuple) else p for p in providers])


def _gpu_env(monkeypatch, fake):
    monkeypatch.setattr(backends, "import_onnxruntime", lambda gpu=False: fake)
    monkeypatch.setattr(backends, "_visible_gpu", lambda: True)
    monkeypatch.setattr(backends, "_trt_usable", lambda: False)


def test_gpu_sessions_cannot_fall_back_and_print_nothing(monkeypatch, model_dir, tmp_path, capsys, caplog):
    """Defect 10: GPU sessions are created with enable_fallback=0, get disable_fallback(), and any banner
    onnxruntime prints goes to the log, not stdout (which may be --json)."""
    fake = _FakeOrt(banner=True)
    _gpu_env(monkeypatch, fake)
    with caplog.at_level(logging.WARNING, logger="madclip_runtime.engines.backends"):
        be = backends.create_backend("ort-cuda", str(model_dir / "model.onnx"), "fp32", 4, str(tmp_path))
    assert capsys.readouterr().out == ""
    assert "EP Error" in caplog.text
    assert fake.calls[-1]["enable_fallback"] == 0
    assert be.session.fallback is False
    cpu = backends.create_backend("ort-cpu", str(model_dir / "model.onnx"), "fp32", 4, None)
    assert cpu.provider == "CPUExecutionProvider"


def test_ort_trt_engine_cache_is_per_model_content(monkeypatch, tmp_path):
    """Defect 2: two bundles of the same backbone (same names, other weights) get separate provider caches."""
    fake = _FakeOrt()
    _gpu_env(monkeypatch, fake)
    dirs = []
    for seed in (0, 1):
        d = tmp_path / f"bundle{seed}"
        d.mkdir()
        onnx.save(make_tiny_model(seed), str(d / "model.onnx"))
        backends.create_backend("ort-trt", str(d / "model.onnx"), "fp32", 4, str(tmp_path / "cache"))
        dirs.append(fake.calls[-1]["providers"][0][1]["trt_engine_cache_path"])
    assert dirs[0] != dirs[1]
    assert all(str(tmp_path / "cache" / "ort-trt") in d for d in dirs)
    # the same model again (e.g. the bundle copied elsewhere) reuses its folder
    backends.create_backend(
        "ort-trt", str(tmp_path / "bundle0" / "model.onnx"), "fp32", 4, str(tmp_path / "cache")
    )
    assert fake.calls[-1]["providers"][0][1]["trt_engine_cache_path"] == dirs[0]


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
        backends.create_backend("ort-cpu", str(model_dir / "model.onnx"), "int4", 8, None)
    with pytest.raises(BackendUnavailable, match="bf16 runs on the openvino backend"):
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
    assert [b for b in backends.available_backends() if b != "openvino"] in ([], ["trt"])


def test_fp16_on_cpu_is_logged_not_changed(caplog):
    if backends._visible_gpu():
        pytest.skip("a GPU backend is available here")
    with caplog.at_level(logging.WARNING, logger="madclip_runtime.engines.backends"):
        assert backends.resolve_auto("fp16") == "ort-cpu"
    assert "fp16" in caplog.text


def test_export_engine_lands_where_the_runtime_looks(monkeypatch, model_dir, tmp_path):
    """Defect 7: `madclip-export --engine` no longer writes an engine into the bundle (which the runtime never
    read); it builds through the runtime's own lookup, so the runtime finds the same file under the same key."""
    import types as _types

    from madclip_export import export

    calls = []
    monkeypatch.setenv("MADCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(backends, "require_trt", lambda: _types.SimpleNamespace(__version__="10.13.0"))
    monkeypatch.setattr(
        backends.trt_engine,
        "ensure_engine",
        lambda onnx_path, engine_dir, precision, max_batch, sha=None, fp32_islands=("dt",): (
            calls.append((Path(onnx_path).name, Path(engine_dir), precision, max_batch, tuple(fp32_islands)))
            or Path(engine_dir) / "e"
        ),
    )
    monkeypatch.setattr(backends.trt_engine, "TrtRunner", lambda path: _types.SimpleNamespace(max_batch=4))
    before = sorted(p.name for p in model_dir.iterdir())
    islands = ("text", "norm_lo")  # a method whose FP32 tail starts elsewhere than MadCLIP's dt (MVFA)
    report = export._maybe_build_engine(
        model_dir, _types.SimpleNamespace(engine=True, max_batch=4), lambda s: None, islands
    )
    assert report["built"] is True and report["in_bundle"] is False
    assert sorted(p.name for p in model_dir.iterdir()) == before  # nothing added to the bundle
    backends.create_backend("trt", str(model_dir / "model_fp16.onnx"), "fp16", 4, None, fp32_islands=islands)
    assert (
        calls[0]
        == calls[1]
        == ("model_fp16.onnx", tmp_path / "cache" / "engines" / "trt", "fp16", 4, islands)
    )


def test_export_without_tensorrt_says_so(monkeypatch, model_dir):
    import types as _types

    from madclip_export import export

    def missing():
        raise BackendUnavailable("TensorRT is not installed")

    monkeypatch.setattr(backends, "require_trt", missing)
    report = export._maybe_build_engine(
        model_dir, _types.SimpleNamespace(engine=False, max_batch=4), lambda s: None, ("dt",)
    )
    assert report["built"] is False and "TensorRT is not installed" in report["reason"]
    with pytest.raises(BackendUnavailable):
        export._maybe_build_engine(
            model_dir, _types.SimpleNamespace(engine=True, max_batch=4), lambda s: None, ("dt",)
        )


def test_model_content_id_from_bundle_metadata(tmp_path):
    """Defect 3: the runtime's id of a bundle model covers model.onnx.data when the metadata lists it, and
    equals what hashing the files gives (so export-side and runtime-side engine keys agree)."""
    import hashlib
    import types as _types

    from madclip_runtime import predictor
    from madclip_runtime.engines import trt_rules

    (tmp_path / "model.onnx").write_bytes(b"graph")
    g = hashlib.sha256(b"graph").hexdigest()
    files = {"model.onnx": {"sha256": g, "bytes": 5}}
    bundle = _types.SimpleNamespace(meta={"models": {"fp32": "model.onnx"}, "files": files})
    assert predictor.model_sha256(bundle, "fp32") == trt_rules.file_sha256(tmp_path / "model.onnx") == g
    (tmp_path / "model.onnx.data").write_bytes(b"weights")
    files["model.onnx.data"] = {"sha256": hashlib.sha256(b"weights").hexdigest(), "bytes": 7}
    assert predictor.model_sha256(bundle, "fp32") == trt_rules.file_sha256(tmp_path / "model.onnx") != g
    assert predictor.model_sha256(bundle, "fp16") is None
