"""OpenVINO backend: the export-time MatMul rewrite (every method's tiny graph compiles, FP32 ORT parity
kept), the runtime backend (fp32, bf16, NNCF int8 IR), auto's rule, the content-keyed compile cache, bundle
coverage of the IR files (checksums, integrity, signature), --selftest, madclip-bench rows, madclip-serve and
madclip-batch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from madclip_runtime.contract import OPENVINO, OPENVINO_MODEL_FILES
from madclip_runtime.errors import BackendUnavailable, BundleError

from .conftest import copy_tree

ov = pytest.importorskip("openvino", reason="openvino (madclip[openvino]) not installed")


def _ort(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, {"image": x})))


# ---- item 1: the graph rewrite ---------------------------------------------------------------------------


def _tiny_method_model(method: str):
    import torch

    from madclip_train.config import ModelConfig
    from madclip_train.methods.registry import get_method

    model = get_method(method).build(
        ModelConfig(backbone="madclip-tiny", pretrained="none", objective="Brain"), seed=0
    )
    if method == "mvfa":  # the exported graph needs its memory bank of normal shots

        class Shots:
            images = torch.rand(4, 3, 240, 240, generator=torch.Generator().manual_seed(0))
            labels, groups = torch.tensor([0, 0, 1, 0]), torch.arange(4)
            masks = torch.zeros(4, 240, 240, dtype=torch.bool)

            def __len__(self):
                return 4

        model.finalize(Shots(), "cpu")
    return model.eval()


@pytest.mark.parametrize("method", ["madclip", "mvfa", "mediclip"])
def test_every_methods_exported_graph_compiles_in_openvino(method, tmp_path, monkeypatch):
    """The rewrite of the exported graph: ORT FP32 of it equals the unrewritten graph's (<= 1e-6), and
    OpenVINO compiles it and matches ORT FP32. (export_onnx applies it: test_export_writes_the_nncf_ir...)"""
    import onnx

    import madclip_export.openvino as ovx
    from madclip_export.export import export_onnx
    from madclip_runtime.engines.backends import create_backend

    model = _tiny_method_model(method)
    raw, fixed = tmp_path / "raw.onnx", tmp_path / "model.onnx"
    with monkeypatch.context() as m:  # the export module consumes the model: export once, rewrite a copy
        m.setattr(ovx, "rewrite_vector_matmuls", lambda path: 0)
        export_onnx(model, raw, 4, 18)
    shutil.copy(raw, fixed)
    n = ovx.rewrite_vector_matmuls(fixed)
    assert n == {"madclip": 4, "mvfa": 0, "mediclip": 3}[method]  # MadCLIP's and MediCLIP's [.., E] x dt[E]
    graph = onnx.load(str(fixed))
    inits = {t.name: t for t in graph.graph.initializer}
    assert not [
        n
        for n in graph.graph.node
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 1
    ]
    if n:  # the rewritten constant keeps its name (FP16 and INT8 find the FP32 tail by it)
        assert inits["dt"].dims[-1] == 1
    x = np.random.default_rng(1).random((2, 3, 240, 240), dtype=np.float32)
    before, after = _ort(raw, x), _ort(fixed, x)
    for name in before:
        assert np.abs(before[name] - after[name]).max() <= 1e-6, name
    with create_backend(OPENVINO, str(fixed), "fp32", 4, str(tmp_path / "cache")) as backend:
        got = backend.run(x)
    for name in before:
        assert np.abs(got[name] - after[name]).max() <= 1e-5, name


def test_rewrite_keeps_a_shared_vector_and_is_exact(tmp_path):
    """A 1-D constant used by a MatMul and by another op gets an Unsqueeze column; one used only by MatMuls is
    reshaped in place under its own name. Both compute what the original did (GEMV vs GEMM: <= 1e-6 rel)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from madclip_export.openvino import rewrite_vector_matmuls

    rng = np.random.default_rng(0)
    v, w = rng.random(8, dtype=np.float32), rng.random(8, dtype=np.float32)
    nodes = [
        helper.make_node("Reshape", ["image", "shape"], ["x"]),  # [B, 3, 4, 4] -> [B, 6, 8]
        helper.make_node("MatMul", ["x", "v"], ["a"]),
        helper.make_node("Neg", ["a"], ["score_map"]),
        helper.make_node("MatMul", ["x", "w"], ["b"]),
        helper.make_node("Add", ["x", "w"], ["c"]),
        helper.make_node("ReduceSum", ["b", "ax"], ["score"], keepdims=0),
        helper.make_node("ReduceSum", ["c", "ax2"], ["anomaly_map"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
            for n in ("score", "anomaly_map", "score_map")
        ],
        [
            numpy_helper.from_array(v, "v"),
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array([0, 6, 8], np.int64), "shape"),
            numpy_helper.from_array(np.array([1], np.int64), "ax"),
            numpy_helper.from_array(np.array([2], np.int64), "ax2"),
        ],
    )
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    x = rng.random((3, 3, 4, 4), dtype=np.float32)
    before = _ort(path, x)
    assert rewrite_vector_matmuls(path) == 2
    assert rewrite_vector_matmuls(path) == 0  # idempotent
    after = _ort(path, x)
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-6, atol=1e-6)
    model = onnx.load(str(path))
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    assert inits["v"] == [8, 1] and inits["w"] == [8]
    assert any(n.op_type == "Unsqueeze" and n.input[0] == "w" for n in model.graph.node)
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled(x)
    for out in compiled.outputs:
        name = next(iter(set(out.get_names()) & set(before)))
        np.testing.assert_allclose(got[out], before[name], rtol=1e-5, atol=1e-5)


# ---- items 2 and 3: the backend on an exported bundle ----------------------------------------------------


@pytest.fixture()
def bundle(exported_tiny_bundle) -> Path:
    return exported_tiny_bundle


def test_export_writes_the_nncf_ir_covered_by_checksums_and_report(bundle):
    import onnx

    graph = onnx.load(str(bundle / "model.onnx"))
    inits = {t.name: list(t.dims) for t in graph.graph.initializer}
    assert (
        inits["dt"][-1] == 1
        and sum(n.op_type == "Squeeze" and n.name.endswith("__squeeze") for n in graph.graph.node) == 4
    )  # export_onnx rewrote the head's MatMuls
    meta = json.loads((bundle / "metadata.json").read_text())
    xml = OPENVINO_MODEL_FILES["int8"]
    assert meta["openvino_models"] == {"int8": xml}
    assert {xml, xml[:-4] + ".bin"} <= set(meta["files"])
    assert meta["openvino_int8"]["ignored_scope_nodes"] > 0 and meta["openvino_int8"]["fp32_islands"] == [
        "dt"
    ]
    assert "files.model_int8_ov.bin" in meta["integrity"]["fields"]
    report = json.loads((bundle / "export_report.json").read_text())["openvino"]
    assert report["checked"] and "int8" in report["variants"] and "fp32" in report["variants"]
    fp32 = report["variants"]["fp32"]
    assert fp32["errors"]["score"]["max_abs"] <= 1e-5 and fp32["errors"]["anomaly_map"]["p99_abs"] <= 1e-5
    assert fp32["decision_flips"] == 0
    int8 = report["variants"]["int8"]
    assert int8["errors"]["anomaly_map"]["p99_abs"] <= 1e-1 and int8["decision_flips"] is not None
    assert fp32["cached_start_seconds"] > 0


def test_tampered_ir_weights_are_refused(bundle, tmp_path):
    from madclip_runtime.bundles.bundle import load_bundle

    b = copy_tree(bundle, tmp_path / "b")
    data = bytearray((b / "model_int8_ov.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "model_int8_ov.bin").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model_int8_ov.bin sha256 mismatch"):
        load_bundle(b, verify="model", precision="int8")
    load_bundle(b, verify="model", precision="fp32")  # the other variants are still usable


def test_signature_covers_the_ir(bundle, tmp_path):
    """A signed bundle's metadata lists the IR's sha256s; swapping in another .bin fails verification."""
    from madclip_runtime.bundles.bundle import load_bundle, write_metadata
    from madclip_runtime.bundles.signing import generate_keypair, load_private_key

    b = copy_tree(bundle, tmp_path / "b")
    private, public = tmp_path / "k.pem", tmp_path / "k.pub"
    generate_keypair(private, public)
    meta = json.loads((b / "metadata.json").read_text())
    write_metadata(b, meta, signing_key=load_private_key(private))
    loaded = load_bundle(b, verify=True, trusted_key=public)
    assert "model_int8_ov.xml" in loaded.meta["files"] and loaded.signed_by
    (b / "model_int8_ov.bin").write_bytes(b"\0" * (b / "model_int8_ov.bin").stat().st_size)
    with pytest.raises(BundleError, match="model_int8_ov.bin"):
        load_bundle(b, verify=True, trusted_key=public)


def test_schema_refuses_an_ir_without_its_weights(bundle, tmp_path):
    from madclip_runtime.bundles import integrity
    from madclip_runtime.bundles.bundle import load_bundle

    b = copy_tree(bundle, tmp_path / "b")
    meta = json.loads((b / "metadata.json").read_text())
    del meta["files"]["model_int8_ov.bin"]
    (b / "metadata.json").write_text(json.dumps(integrity.seal(meta)))
    with pytest.raises(
        BundleError, match="openvino_models.int8: model_int8_ov.bin is not in the bundle's file list"
    ):
        load_bundle(b, verify=False)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_predictor_on_openvino_matches_the_golden_set(bundle, precision, tmp_path):
    import madclip_runtime as mr
    from madclip_runtime.bundles.selftest import read_golden, tolerance
    from madclip_runtime.engines.openvino_engine import bf16_supported

    if precision == "bf16" and not bf16_supported():
        with pytest.raises(BackendUnavailable, match="no BF16 support"):
            mr.load(bundle, backend=OPENVINO, precision="bf16", cache_dir=tmp_path)
        return
    with mr.load(bundle, backend=OPENVINO, precision=precision, cache_dir=tmp_path) as p:
        assert p.backend_name == OPENVINO and p.precision == precision and "OpenVINO" in p.provider
        golden = read_golden(p.bundle)
        out = p.backend.run(golden["image"].astype(np.float32))
    tol = tolerance(precision, OPENVINO)
    assert np.abs(out["score"] - golden["score"]).max() <= tol["score"]
    assert np.percentile(np.abs(out["anomaly_map"] - golden["anomaly_map"]), 99) <= tol["map_p99"]


def test_compile_cache_is_keyed_by_content_and_reused(bundle, tmp_path):
    import madclip_runtime as mr
    from madclip_runtime.predictor import model_sha256

    with mr.load(bundle, backend=OPENVINO, precision="int8", cache_dir=tmp_path) as p:
        key = model_sha256(p.bundle, "int8", OPENVINO)
    folder = tmp_path / OPENVINO / key[:16]
    assert folder.is_dir() and any(folder.iterdir())  # OpenVINO wrote its compiled blob there
    blobs = sorted(folder.iterdir())
    with mr.load(bundle, backend=OPENVINO, precision="int8", cache_dir=tmp_path):
        pass
    assert sorted(folder.iterdir()) == blobs  # the second start read the cache, nothing new compiled
    with mr.load(bundle, backend=OPENVINO, precision="fp32", cache_dir=tmp_path) as p:
        other = model_sha256(p.bundle, "fp32", OPENVINO)
    assert other != key and (tmp_path / OPENVINO / other[:16]).is_dir()


def test_int8_without_the_ir_and_wrong_precisions_are_one_line(tmp_path):
    from madclip_runtime.engines.backends import create_backend

    from .conftest import build_tiny_bundle

    b = build_tiny_bundle(tmp_path / "tiny")
    import madclip_runtime as mr

    with pytest.raises(BundleError, match="no int8 model in this bundle"):
        mr.load(b, backend=OPENVINO, precision="int8")
    with pytest.raises(BundleError, match="no OpenVINO int8 model"):
        mr.load(b, backend=OPENVINO, precision="int8", verify="none")
    with pytest.raises(BackendUnavailable, match="fp16 is the GPU variant"):
        create_backend(OPENVINO, str(b / "model_fp16.onnx"), "fp16", 4, str(tmp_path))
    with pytest.raises(BackendUnavailable, match="bf16 runs on the openvino backend"):
        create_backend("ort-cpu", str(b / "model.onnx"), "bf16", 4, None)


def test_auto_rule(monkeypatch):
    """bf16 -> openvino; int8 -> openvino with the IR; fp32 -> ort-cpu (openvino only without onnxruntime)."""
    from madclip_runtime.engines import backends, openvino_engine

    monkeypatch.setattr(backends, "_trt_usable", lambda: False)
    monkeypatch.setattr(backends, "_visible_gpu", lambda: False)
    assert backends.resolve_auto("bf16") == OPENVINO
    assert backends.resolve_auto("int8", has_openvino_int8=True) == OPENVINO
    assert backends.resolve_auto("int8", has_openvino_int8=False) == "ort-cpu"
    assert backends.resolve_auto("fp32") == "ort-cpu"
    monkeypatch.setattr(
        backends, "import_onnxruntime", lambda gpu=False: (_ for _ in ()).throw(BackendUnavailable("x"))
    )
    assert backends.resolve_auto("fp32") == OPENVINO  # the only CPU backend installed
    monkeypatch.undo()
    monkeypatch.setattr(backends, "_trt_usable", lambda: False)
    monkeypatch.setattr(backends, "_visible_gpu", lambda: False)
    monkeypatch.setattr(openvino_engine, "installed", lambda: False)
    assert OPENVINO not in backends.available_backends()
    assert backends.resolve_auto("fp32") == "ort-cpu"
    with pytest.raises(BackendUnavailable, match='pip install "madclip\\[openvino\\]"'):
        backends.resolve_auto("bf16")


def test_missing_openvino_is_one_line(monkeypatch):
    import builtins

    from madclip_runtime.engines import openvino_engine

    real = builtins.__import__

    def no_openvino(name, *a, **k):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(BackendUnavailable, match=r'pip install "madclip\[openvino\]"'):
        openvino_engine.import_openvino()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_selftest_cli_on_openvino(bundle, precision, tmp_path, capsys):
    from madclip_runtime.cli.infer import main

    rc = main(
        [
            "--selftest",
            "--bundle",
            str(bundle),
            "--backend",
            OPENVINO,
            "--precision",
            precision,
            "--json",
            "--cache-dir",
            str(tmp_path),
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    res = json.loads(cap.out.strip().splitlines()[-1])["selftest"]
    assert res["backend"] == OPENVINO and res["passed"] and res["decisions_reproduced"]
    assert res["decision_flips"] is not None and res["decision_flips"] <= res["n"]
    assert "Traceback" not in cap.err


def test_bench_has_openvino_rows(bundle, tmp_path, capsys):
    from madclip_runtime.cli.bench import main

    out = tmp_path / "bench.json"
    rc = main(
        [
            "--bundle",
            str(bundle),
            "--backends",
            f"ort-cpu,{OPENVINO}",
            "--precisions",
            "fp32,bf16,int8",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--throughput-iters",
            "1",
            "--cache-dir",
            str(tmp_path / "c"),
            "--json",
            str(out),
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    rows = {(r["backend"], r["precision"]): r for r in json.loads(out.read_text())["rows"]}
    for prec in ("fp32", "int8"):
        r = rows[(OPENVINO, prec)]
        assert r["status"] == "ok" and r["second_start_s"] > 0 and r["golden_decision_flips"] is not None
        assert r["golden_map_p99_abs_err"] <= 1e-1
    assert (
        rows[("ort-cpu", "bf16")]["status"] == "skipped" and OPENVINO in rows[("ort-cpu", "bf16")]["reason"]
    )


# ---- item 5: madclip-serve and madclip-batch take the backend through to the Predictor ---------------------


def test_serve_and_batch_accept_openvino(bundle, tmp_path):
    from madclip_runtime.serve import batch, cli
    from madclip_runtime.serve.replica import ServeConfig, open_verified

    args = cli.build_parser().parse_args(
        ["--bundle", str(bundle), "--backend", OPENVINO, "--precision", "int8"]
    )
    assert (args.backend, args.precision) == (OPENVINO, "int8")
    args = batch.build_parser().parse_args(
        [
            "x.png",
            "--bundle",
            str(bundle),
            "--out",
            str(tmp_path),
            "--backend",
            OPENVINO,
            "--precision",
            "bf16",
        ]
    )
    assert (args.backend, args.precision) == (OPENVINO, "bf16")
    cfg = ServeConfig(bundle=str(bundle), backend=OPENVINO, precision="int8", cache_dir=str(tmp_path))
    predictor, meta = open_verified(cfg)  # what each Serve replica and each madclip-batch actor runs
    try:
        assert meta["backend"] == OPENVINO and meta["precision"] == "int8" and meta["warmup_selftest"]
    finally:
        predictor.close()
    scorer = batch.Scorer(cfg, None, "npy")
    try:
        from madclip_runtime.bundles.selftest import read_golden

        golden = read_golden(scorer.predictor.bundle)
        n = len(golden["image"])
        rows = scorer(
            {
                "path": np.array([f"g{i}" for i in range(n)]),
                "image": golden["image"],
                "error": np.array([""] * n),
                "height": np.full(n, 240),
                "width": np.full(n, 240),
                "index": np.arange(n),
                "key": np.array([f"k{i}" for i in range(n)]),
                "source": np.array([f"g{i}" for i in range(n)]),
                "n_slices": np.ones(n, int),
            }
        )
        assert np.abs(np.asarray(rows["score"], np.float64) - golden["score"]).max() <= 1e-1
    finally:
        scorer.predictor.close()


def test_bench_cpu_script_runs_every_engine_side_by_side(tmp_path):
    """benchmarks/bench_cpu.py on the tiny backbone, one round: seven engines, their workers, the JSON."""
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpu.py"
    out = tmp_path / "cpu.json"
    env = {**os.environ, "MADCLIP_BENCH_WORK": str(tmp_path / "work"), "OMP_NUM_THREADS": "1"}
    args = [
        "--methods",
        "madclip",
        "--rounds",
        "1",
        "--threads",
        "1",
        "--timing-backbone",
        "madclip-tiny",
        "--no-flips",
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (res,) = json.loads(out.read_text())["methods"]
    assert set(res["engines"]) == {
        "torch-fp32",
        "torch-bf16",
        "ort-fp32",
        "ort-int8",
        "ov-fp32",
        "ov-bf16",
        "ov-int8",
    }
    for name, e in res["engines"].items():
        assert e["batch1_ms"] > 0 and e["batch8_images_per_s"] > 0 and e["peak_rss_mb"] > 50, name
        assert e["map_rel_l2_vs_ort_fp32"] < 0.05, name
    assert res["engines"]["ov-int8"]["cached_start_s"] > 0
    assert res["engines"]["ort-fp32"]["cached_start_s"] is None
