"""Atomic writes and the bundle format: round trip and every BundleError case."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from madclip_runtime import INTENDED_USE
from madclip_runtime.atomic import (
    AtomicDirectory,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_text,
    sha256_file,
)
from madclip_runtime.bundles.bundle import (
    SCHEMA_VERSION,
    load_bundle,
    write_metadata,
)
from madclip_runtime.contract import io_metadata
from madclip_runtime.errors import BundleError, MadclipError
from madclip_runtime.preprocess import PreprocessSpec


def _siblings(tmp_path, name):
    return sorted(p for p in os.listdir(tmp_path) if name in p)


# ---------------------------------------------------------------- atomic files


def test_atomic_write_and_sha(tmp_path):
    p = tmp_path / "a.bin"
    atomic_write_bytes(p, b"hello")
    assert p.read_bytes() == b"hello"
    atomic_write_text(p, "héllo")
    assert p.read_text(encoding="utf-8") == "héllo"
    # sha256 of a file larger than one chunk equals hashlib on the whole content
    import hashlib

    data = os.urandom(3 * (1 << 20) + 17)
    atomic_write_bytes(p, data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    atomic_save_npy(tmp_path / "x.npy", arr)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), arr)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_atomic_write_failure_keeps_old_and_no_temp(tmp_path):
    p = tmp_path / "x.npy"
    atomic_write_text(p, "old")

    class Boom:
        def __array__(self, *a, **k):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save_npy(p, Boom())
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.npy"]


# ---------------------------------------------------------------- atomic directory


def test_atomic_directory_success(tmp_path):
    final = tmp_path / "bundle"
    with AtomicDirectory(final) as tmp:
        assert os.path.basename(tmp).startswith(".bundle.tmp-")
        assert not final.exists()
        (open(os.path.join(tmp, "f.txt"), "w")).write("x")
    assert (final / "f.txt").read_text() == "x"
    assert os.listdir(tmp_path) == ["bundle"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_directory_failure_leaves_nothing(tmp_path, exc):
    final = tmp_path / "bundle"
    with pytest.raises(exc):
        with AtomicDirectory(final) as tmp:
            open(os.path.join(tmp, "f.txt"), "w").write("x")
            raise exc()
    assert os.listdir(tmp_path) == []


def test_atomic_directory_exists_without_force_fails_early(tmp_path):
    final = tmp_path / "bundle"
    final.mkdir()
    (final / "old.txt").write_text("old")
    entered = False
    with pytest.raises(MadclipError, match="exists; use --force to overwrite"):
        with AtomicDirectory(final):
            entered = True
    assert not entered  # raised at __enter__, before any work
    assert (final / "old.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["bundle"]


def test_atomic_directory_exists_appearing_during_write(tmp_path):
    final = tmp_path / "bundle"
    with pytest.raises(MadclipError, match="use --force"):
        with AtomicDirectory(final):
            final.mkdir()  # someone else created it meanwhile
    assert os.listdir(tmp_path) == ["bundle"]


def test_atomic_directory_force_replaces(tmp_path):
    final = tmp_path / "bundle"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with AtomicDirectory(final, force=True) as tmp:
        assert (final / "old.txt").exists()  # old one untouched while building
        open(os.path.join(tmp, "new.txt"), "w").write("new")
    assert sorted(os.listdir(final)) == ["new.txt"]
    assert os.listdir(tmp_path) == ["bundle"]


def test_atomic_directory_force_failure_keeps_old(tmp_path):
    final = tmp_path / "bundle"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(ValueError):
        with AtomicDirectory(final, force=True) as tmp:
            open(os.path.join(tmp, "new.txt"), "w").write("new")
            raise ValueError("export failed")
    assert sorted(os.listdir(final)) == ["old.txt"]
    assert os.listdir(tmp_path) == ["bundle"]


# ---------------------------------------------------------------- bundle


def _make_bundle(root, name="bundle", precisions=("fp32", "fp16"), external=True, **meta_over):
    """A small but complete bundle: fake model bytes (the reader does not parse ONNX), golden, report."""
    final = os.path.join(root, name)
    spec = PreprocessSpec(image_size=32)
    files = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx"}
    with AtomicDirectory(final) as tmp:
        for p in precisions:
            atomic_write_bytes(os.path.join(tmp, files[p]), os.urandom(2048))
        if external and "fp32" in precisions:
            atomic_write_bytes(os.path.join(tmp, "model.onnx.data"), os.urandom(4096))
        with open(os.path.join(tmp, "golden.npz"), "wb") as f:
            np.savez(f, image=np.zeros((2, 3, 32, 32), np.float32), score=np.ones(2, np.float32))
        atomic_write_text(os.path.join(tmp, "export_report.json"), json.dumps({"fp16": {"max_abs": 1e-3}}))
        meta = {
            "preprocess": spec.to_dict(),
            **io_metadata(32, {"score": (0.0, 4.0), "anomaly_map": (0.0, 4.0)}),
            "method": "madclip",
            "max_batch": 8,
            "opset": 18,
            "calibration": {
                "threshold": 1.25,
                "score_name": "score",
                "method": "Youden on held-out shots",
                "map_threshold": 2.0,
                "map_scale": [0.0, 4.0],
            },
            "provenance": {"backbone": "madclip-tiny", "pretrained": "none", "shots": 4, "seed": 111},
            "models": {p: files[p] for p in precisions},
        }
        meta.update(meta_over)
        write_metadata(tmp, meta)
    return final


def _edit_meta(bundle, fn, reseal=True):
    """Edit metadata.json; `reseal` recomputes its integrity record (as a careless writer or an attacker would),
    so the edit reaches the schema validation instead of the tamper check."""
    from madclip_runtime.bundles.integrity import seal

    p = os.path.join(bundle, "metadata.json")
    meta = json.load(open(p))
    fn(meta)
    open(p, "w").write(json.dumps(seal(meta) if reseal else meta))


def test_metadata_roundtrip(tmp_path):
    path = _make_bundle(tmp_path)
    b = load_bundle(path)
    assert b.path == os.path.abspath(path)
    assert b.meta["schema_version"] == SCHEMA_VERSION
    assert b.meta["intended_use"] == INTENDED_USE
    assert b.spec == PreprocessSpec(image_size=32)
    assert b.image_size == 32 and b.max_batch == 8 and b.method == "madclip"
    assert b.threshold == pytest.approx(1.25) and b.score_name == "score"
    assert b.map_threshold == pytest.approx(2.0) and b.map_scale == (0.0, 4.0)
    assert b.precisions == ("fp32", "fp16")
    assert b.model_path("fp16") == os.path.join(b.path, "model_fp16.onnx")
    assert b.golden_path == os.path.join(b.path, "golden.npz") and b.has_golden
    files = b.meta["files"]
    assert set(files) == {
        "model.onnx",
        "model.onnx.data",
        "model_fp16.onnx",
        "golden.npz",
        "export_report.json",
    }
    assert files["model.onnx.data"]["bytes"] == 4096
    assert files["model.onnx"]["sha256"] == sha256_file(os.path.join(path, "model.onnx"))
    assert b.meta["outputs"]["anomaly_map"]["shape"] == ["batch", 1, 32, 32]


def test_missing_dir(tmp_path):
    with pytest.raises(BundleError, match="no such bundle directory") as ei:
        load_bundle(tmp_path / "nope")
    assert "nope" in str(ei.value) and "\n" not in str(ei.value)


def test_missing_metadata(tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(BundleError, match=r"metadata\.json: missing"):
        load_bundle(tmp_path / "b")


def test_invalid_json(tmp_path):
    path = _make_bundle(tmp_path)
    open(os.path.join(path, "metadata.json"), "w").write("{not json")
    with pytest.raises(BundleError, match=r"metadata\.json: invalid JSON") as ei:
        load_bundle(path)
    assert "\n" not in str(ei.value)


def test_unknown_schema(tmp_path):
    path = _make_bundle(tmp_path)
    _edit_meta(path, lambda m: m.update(schema_version=7))
    with pytest.raises(BundleError, match=r"unknown schema_version 7 \(this madclip reads 2\)"):
        load_bundle(path)


def test_missing_key(tmp_path):
    path = _make_bundle(tmp_path)
    _edit_meta(path, lambda m: m.pop("preprocess"))
    with pytest.raises(BundleError, match="preprocess: missing"):
        load_bundle(path)


@pytest.mark.parametrize("verify", [True, "model", False])
def test_missing_model_file(tmp_path, verify):
    path = _make_bundle(tmp_path)
    os.remove(os.path.join(path, "model_fp16.onnx"))
    with pytest.raises(BundleError, match=r"model_fp16\.onnx: missing"):
        load_bundle(path, verify=verify, precision="fp32")


@pytest.mark.parametrize("victim", ["model.onnx", "model.onnx.data", "model_fp16.onnx", "golden.npz"])
def test_tampered_byte_sha_mismatch(tmp_path, victim):
    path = _make_bundle(tmp_path)
    full = os.path.join(path, victim)
    data = bytearray(open(full, "rb").read())
    data[100] ^= 0x01
    open(full, "wb").write(bytes(data))
    with pytest.raises(BundleError, match="tampered or corrupt: " + re.escape(victim) + " sha256 mismatch"):
        load_bundle(path)


def test_verify_model_mode_hashes_only_that_variant(tmp_path):
    path = _make_bundle(tmp_path)
    full = os.path.join(path, "model_fp16.onnx")
    data = bytearray(open(full, "rb").read())
    data[0] ^= 0xFF
    open(full, "wb").write(bytes(data))
    b = load_bundle(path, verify="model", precision="fp32")  # fp16 not hashed in this mode
    with pytest.raises(BundleError, match=r"model_fp16\.onnx sha256 mismatch"):
        load_bundle(path, verify="model", precision="fp16")
    with pytest.raises(BundleError, match=r"model_fp16\.onnx sha256 mismatch"):
        b.verify("all")


def test_external_data_belongs_to_fp32(tmp_path):
    path = _make_bundle(tmp_path)
    full = os.path.join(path, "model.onnx.data")
    data = bytearray(open(full, "rb").read())
    data[-1] ^= 0x01
    open(full, "wb").write(bytes(data))
    load_bundle(path, verify="model", precision="fp16")
    with pytest.raises(BundleError, match=r"model\.onnx\.data sha256 mismatch"):
        load_bundle(path, verify="model", precision="fp32")


def test_size_mismatch(tmp_path):
    path = _make_bundle(tmp_path)
    with open(os.path.join(path, "export_report.json"), "a") as f:
        f.write(" ")
    with pytest.raises(BundleError, match=r"tampered or corrupt: export_report\.json size mismatch"):
        load_bundle(path, verify="model", precision="fp32")


def test_model_path_absent_variant(tmp_path):
    b = load_bundle(_make_bundle(tmp_path))
    with pytest.raises(
        BundleError, match=r"no int8 model \(model_int8\.onnx\) in this bundle \(has fp32, fp16\)"
    ):
        b.model_path("int8")


def test_model_listed_but_not_in_files(tmp_path):
    path = _make_bundle(tmp_path)
    _edit_meta(path, lambda m: m["models"].update(int8="model_int8.onnx"))
    with pytest.raises(BundleError, match=r"models\.int8: model_int8\.onnx is not in the bundle's file list"):
        load_bundle(path)


def test_file_entry_outside_bundle_rejected(tmp_path):
    path = _make_bundle(tmp_path)
    _edit_meta(path, lambda m: m["files"].update({"../evil": {"sha256": "0" * 64, "bytes": 1}}))
    with pytest.raises(BundleError, match="must be a relative path inside the bundle"):
        load_bundle(path)


def test_no_golden_and_no_calibration(tmp_path):
    final = tmp_path / "b"
    with AtomicDirectory(final) as tmp:
        atomic_write_bytes(os.path.join(tmp, "model_int8.onnx"), b"abc")
        write_metadata(tmp, {"preprocess": PreprocessSpec().to_dict(), "models": {"int8": "model_int8.onnx"}})
    b = load_bundle(final)
    assert b.threshold is None and b.map_threshold is None and b.max_batch is None
    assert b.precisions == ("int8",)
    assert not b.has_golden
    with pytest.raises(BundleError, match="no golden.npz"):
        _ = b.golden_path


def test_write_metadata_rejects_missing_model(tmp_path):
    with pytest.raises(BundleError, match="model.onnx is not in the bundle's file list"):
        write_metadata(tmp_path, {"preprocess": PreprocessSpec().to_dict(), "models": {"fp32": "model.onnx"}})
    assert not (tmp_path / "metadata.json").exists()
