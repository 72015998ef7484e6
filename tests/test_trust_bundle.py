"""Tamper-evident bundles: integrity of every metadata field, validation at load, signatures, self-test decisions.

Regression tests for issue 10's observed cases: an edited threshold (-1, NaN, Infinity) was served with exit 0
and --selftest PASSED; metadata values of the wrong type or range failed late with tracebacks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from madclip_runtime.bundles.bundle import load_bundle, write_metadata
from madclip_runtime.bundles.integrity import seal
from madclip_runtime.cli.infer import main as infer_main
from madclip_runtime.errors import BundleError, MadclipError

from .conftest import cli_error_lines, copy_tree


@pytest.fixture()
def bundle(exported_tiny_bundle, tmp_path) -> Path:
    return copy_tree(exported_tiny_bundle, tmp_path / "b")


@pytest.fixture()
def scan(tmp_path) -> Path:
    path = tmp_path / "scan.png"
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)).save(path)
    return path


def _meta(b: Path) -> dict:
    return json.loads((b / "metadata.json").read_text())


def _write_raw(b: Path, text: str) -> None:
    (b / "metadata.json").write_text(text)


def _edit(b: Path, fn, reseal: bool = False) -> None:
    """Edit metadata.json like a user with a text editor (reseal: like an attacker who recomputes the digests)."""
    meta = _meta(b)
    fn(meta)
    _write_raw(b, json.dumps(seal(meta) if reseal else meta))


def _infer(capsys, *args) -> tuple[int, str, str]:
    rc = infer_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line(rc: int, err: str, *needles: str, code: int = 2) -> None:
    assert rc == code, (rc, err)
    assert "Traceback" not in err
    lines = cli_error_lines(err)
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


# ------------------------------------------------------------------------------------------ integrity


@pytest.mark.parametrize("value", [-1, 0.5, "NaN", "Infinity"])
def test_edited_threshold_refused_naming_the_field(bundle, scan, capsys, value):
    text = (bundle / "metadata.json").read_text()
    t = _meta(bundle)["calibration"]["threshold"]
    edited = text.replace(f'"threshold": {json.dumps(t)}', f'"threshold": {value}', 1)
    assert edited != text
    _write_raw(bundle, edited)
    with pytest.raises(BundleError, match=r"field calibration\.threshold was edited"):
        load_bundle(bundle)
    import madclip_runtime as mr

    with pytest.raises(BundleError, match=r"calibration\.threshold"):
        mr.load(bundle)
    for args in (
        [scan, "--bundle", bundle],
        [scan, "--bundle", bundle, "--json"],
        ["--bundle", bundle, "--selftest"],
    ):
        rc, out, err = _infer(capsys, *args)
        _one_line(rc, err, "calibration.threshold", "edited")
        assert out == ""


@pytest.mark.parametrize(
    "field, edit",
    [
        ("calibration.score_name", lambda m: m["calibration"].update(score_name="score_map_max")),
        ("calibration.map_scale", lambda m: m["calibration"].update(map_scale=[0.0, 2.0])),
        ("calibration.method", lambda m: m["calibration"].update(method="chosen on the test split")),
        ("preprocess.image_size", lambda m: m["preprocess"].update(image_size=224)),
        ("preprocess.normalize", lambda m: m["preprocess"].update(normalize="clip")),
        ("outputs.score", lambda m: m["outputs"]["score"].update(range=[0, 1])),
        ("models.int8", lambda m: m["models"].pop("int8")),
        ("max_batch", lambda m: m.update(max_batch=2)),
        ("calibration.extra", lambda m: m["calibration"].update(extra=1)),
    ],
)
def test_every_decision_relevant_field_is_covered(bundle, field, edit):
    _edit(bundle, edit)
    with pytest.raises(
        BundleError, match=rf"field {field.replace('.', '[.]')} was (edited|removed|added)"
    ) as ei:
        load_bundle(bundle, verify="none")
    assert "\n" not in str(ei.value)


def test_schema_1_bundle_refused_with_reexport_advice(bundle):
    _edit(bundle, lambda m: m.update(schema_version=1))
    with pytest.raises(BundleError, match="schema_version 1 bundle.*re-export"):
        load_bundle(bundle)


def test_missing_integrity_record_refused(bundle):
    _edit(bundle, lambda m: m.pop("integrity"))
    with pytest.raises(BundleError, match="integrity: missing"):
        load_bundle(bundle)


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "field, edit",
    [
        ("preprocess.image_size", lambda m: m["preprocess"].update(image_size="abc")),
        ("preprocess.image_size", lambda m: m["preprocess"].update(image_size=-5)),
        ("max_batch", lambda m: m.update(max_batch="abc")),
        ("max_batch", lambda m: m.update(max_batch=0)),
        ("calibration.map_scale", lambda m: m["calibration"].update(map_scale=[1, 1])),
        ("calibration.threshold", lambda m: m["calibration"].update(threshold=float("nan"))),
        ("calibration.threshold", lambda m: m["calibration"].update(threshold=float("inf"))),
        ("calibration.threshold", lambda m: m["calibration"].update(threshold=-1)),
        ("calibration.threshold", lambda m: m["calibration"].update(threshold="0.5")),
        ("calibration.map_threshold", lambda m: m["calibration"].update(map_threshold=99)),
        ("preprocess.window", lambda m: m["preprocess"].update(window="wide")),
        ("opset", lambda m: m.update(opset=5)),
        ("n_layers", lambda m: m.update(n_layers=True)),
        ("preprocess.std[1]", lambda m: m["preprocess"].update(std=[0.2, 0.0, 0.2])),
    ],
)
def test_validation_names_the_field_before_any_model_file_is_opened(bundle, field, edit):
    # resealed: the digests match, so the validation itself must catch it; model.onnx is gone to prove
    # that the validation comes first
    _edit(bundle, edit, reseal=True)
    (bundle / "model.onnx").unlink()
    with pytest.raises(BundleError) as ei:
        load_bundle(bundle)
    msg = str(ei.value)
    assert f"metadata.json: {field}:" in msg and "\n" not in msg, msg


def test_writer_refuses_what_the_reader_refuses(bundle):
    meta = _meta(bundle)
    meta["calibration"]["threshold"] = math.nan
    with pytest.raises(BundleError, match=r"calibration\.threshold: must be a finite number"):
        write_metadata(bundle, meta)


def test_metadata_records_the_opset_of_the_written_graph(exported_tiny_bundle):
    import onnx

    meta = _meta(exported_tiny_bundle)
    graph = onnx.load(str(exported_tiny_bundle / "model.onnx"), load_external_data=False)
    assert meta["opset"] == [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")][0] == 18


def test_written_opset_mismatch_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from madclip_export.export import written_opset

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    assert written_opset(path, 18) == 18
    with pytest.raises(MadclipError, match="wrote opset 18 instead"):
        written_opset(path, 20)


# ------------------------------------------------------------------------------------------ signatures


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from madclip_export.cli import keygen_main

    d = tmp_path_factory.mktemp("keys")
    assert keygen_main([str(d / "alice")]) == 0 and keygen_main([str(d / "mallory")]) == 0
    assert (d / "alice.key").stat().st_mode & 0o077 == 0  # private key readable by its owner only
    return d


def _sign(b: Path, key: Path) -> None:
    from madclip_runtime.bundles.signing import load_private_key

    write_metadata(b, _meta(b), signing_key=load_private_key(key))


def test_signed_bundle_loads_with_its_trusted_key(bundle, keys, scan, capsys):
    import madclip_runtime as mr

    _sign(bundle, keys / "alice.key")
    b = load_bundle(bundle, trusted_key=keys / "alice.pub")
    assert b.signed_by is not None
    with mr.load(bundle, backend="ort-cpu", trusted_key=keys / "alice.pub") as p:
        assert p.predict(scan).label in ("normal", "anomaly")
    rc, out, err = _infer(capsys, scan, "--bundle", bundle, "--trusted-key", keys / "alice.pub", "--json")
    assert rc == 0 and json.loads(out)["label"] in ("normal", "anomaly"), err
    rc, _, err = _infer(capsys, "--bundle", bundle, "--selftest", "--trusted-key", keys / "alice.pub")
    assert rc == 0 and "PASSED" in err


def test_unsigned_or_foreign_signed_bundle_refused(bundle, keys, scan, capsys):
    import madclip_runtime as mr

    with pytest.raises(BundleError, match="unsigned bundle refused"):
        mr.load(bundle, trusted_key=keys / "alice.pub")
    rc, out, err = _infer(capsys, scan, "--bundle", bundle, "--trusted-key", keys / "alice.pub")
    _one_line(rc, err, "unsigned bundle refused")
    _sign(bundle, keys / "mallory.key")
    with pytest.raises(BundleError, match="not by the trusted key"):
        load_bundle(bundle, trusted_key=keys / "alice.pub")
    rc, out, err = _infer(capsys, "--bundle", bundle, "--selftest", "--trusted-key", keys / "alice.pub")
    _one_line(rc, err, "not by the trusted key")


def test_resealed_edit_of_a_signed_bundle_is_caught_by_the_signature(bundle, keys):
    _sign(bundle, keys / "alice.key")
    _edit(
        bundle, lambda m: m["calibration"].update(threshold=0.0), reseal=True
    )  # digests recomputed by an attacker
    meta = _meta(bundle)
    assert "signature" not in meta  # seal drops it: the attacker cannot re-sign...
    _edit(bundle, lambda m: m.update(signature=json.loads(json.dumps(_signature_of(keys, bundle)))))
    with pytest.raises(BundleError, match="signature does not match the metadata"):
        load_bundle(
            bundle
        )  # ...and an old signature does not cover the new content, even without a trusted key
    with pytest.raises(BundleError, match="signature does not match"):
        load_bundle(bundle, trusted_key=keys / "alice.pub")


def _signature_of(keys: Path, b: Path) -> dict:
    """A valid signature by alice over DIFFERENT content (the bundle before the edit is gone: sign a variant)."""
    from madclip_runtime.bundles.signing import load_private_key, sign_metadata

    meta = _meta(b)
    meta["calibration"]["threshold"] = 0.123
    return sign_metadata(seal(meta), load_private_key(keys / "alice.key"))["signature"]


def test_bad_key_files_are_one_line(tmp_path, bundle):
    from madclip_runtime.bundles.signing import load_private_key

    (tmp_path / "k.pem").write_text("not a key\n")
    with pytest.raises(MadclipError, match="not a PEM private key"):
        load_private_key(tmp_path / "k.pem")
    with pytest.raises(MadclipError, match="not an Ed25519 public key"):
        load_bundle(bundle, trusted_key=tmp_path / "k.pem")


# ------------------------------------------------------------------------------------------ self-test decisions


def test_golden_records_the_export_decisions(exported_tiny_bundle):
    meta = _meta(exported_tiny_bundle)
    with np.load(exported_tiny_bundle / "golden.npz") as g:
        t = float(g["decision_threshold"])
        assert t == meta["calibration"]["threshold"]
        assert str(g["decision_score_name"]) == "score"
        np.testing.assert_array_equal(g["decisions"], (g["score"] >= t).astype(np.int8))


def test_selftest_fails_when_calibration_no_longer_reproduces_decisions(bundle, capsys):
    from madclip_runtime.bundles.selftest import run_selftest

    with np.load(bundle / "golden.npz") as g:
        scores, decisions = g["score"].astype(np.float64), g["decisions"]
    # a threshold that flips at least one recorded decision: above every score if some were "anomaly", else below
    new_t = float(scores.max()) + 1e-3 if decisions.any() else float(scores.min()) - 1e-3
    assert 0 <= new_t <= 4
    _edit(bundle, lambda m: m["calibration"].update(threshold=new_t), reseal=True)
    res = run_selftest(bundle, "ort-cpu")
    assert res["score_max_abs_err"] <= res["tolerance"]["score"]  # the numbers still match...
    assert res["decisions_reproduced"] is False and res["passed"] is False  # ...the decisions do not
    rc, _, err = _infer(capsys, "--bundle", bundle, "--selftest")
    assert rc == 1 and "no longer reproduces the decisions made at export" in err and "Traceback" not in err


def test_signed_bundle_on_a_machine_without_cryptography(bundle, keys, monkeypatch, caplog):
    import builtins
    import logging

    _sign(bundle, keys / "alice.key")
    real_import = builtins.__import__

    def no_crypto(name, *args, **kwargs):
        if name.startswith("cryptography"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_crypto)
    with caplog.at_level(logging.WARNING):
        load_bundle(bundle)  # still served: the integrity record is checked; the signature cannot be
    assert any("signature is not checked" in r.getMessage() for r in caplog.records)
    from madclip_runtime.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="cryptography"):
        load_bundle(bundle, trusted_key=keys / "alice.pub")  # but a required signature is never skipped
