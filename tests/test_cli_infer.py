"""madclip-infer end to end on a tiny real bundle: outputs, JSON lines, and every bad input as one stderr line."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from madclip_runtime.cli.infer import main, output_stem

from .conftest import THRESHOLD, build_tiny_bundle, write_inputs

JSON_KEYS = {
    "file",
    "score",
    "score_map_max",
    "label",
    "threshold",
    "backend",
    "precision",
    "latency_ms",
    "provider",
}


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("cli") / "tiny")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def assert_one_error(rc: int, err: str, *needles: str, code: int | None = None) -> str:
    assert rc != 0 and (code is None or rc == code), (rc, err)
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def files_in(d: Path) -> list[str]:
    """Files of an output directory, without the results marker (madclip_runtime.outputs)."""
    return sorted(f for f in os.listdir(d) if f != ".madclip-output") if d.exists() else []


def test_json_lines_and_outputs(bundle, tmp_path, capsys):
    inputs = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    rc, stdout, err = run(
        capsys, tmp_path / "in", "--bundle", bundle, "--json", "--out", out, "--backend", "ort-cpu"
    )
    assert rc == 0, err
    assert "backend ort-cpu (provider CPUExecutionProvider)" in err and "research use" in err
    recs = [json.loads(line) for line in stdout.splitlines()]
    assert len(recs) == len(inputs)
    for r in recs:
        assert JSON_KEYS <= set(r)
        assert r["backend"] == "ort-cpu" and r["precision"] == "fp32" and r["threshold"] == THRESHOLD
        assert r["label"] == ("anomaly" if r["score"] >= THRESHOLD else "normal")
    by_stem = {Path(r["file"]).stem: r for r in recs}
    for stem, path in inputs.items():
        assert {f"{stem}.json", f"{stem}_overlay.png", f"{stem}_map.png"} <= set(files_in(out))
        doc = json.loads((out / f"{stem}.json").read_text())
        assert doc["score"] == pytest.approx(by_stem[stem]["score"]) and "research use" in doc["intended_use"]
        with Image.open(path) as src, Image.open(out / f"{stem}_map.png") as m:
            assert m.size == src.size  # map at native resolution
    assert len(files_in(out)) == 3 * len(inputs)  # nothing else (no temporary or probe files)


def test_table_output_and_npy_maps(bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inputs = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    rc, stdout, err = run(
        capsys,
        inputs["grey"],
        inputs["rgb"],
        "--bundle",
        bundle,
        "--out",
        out,
        "--map-format",
        "npy",
        "--threshold",
        "3.5",
    )
    assert rc == 0, err
    assert "grey.png" in stdout and "normal" in stdout and "research use" in stdout
    amap = np.load(out / "grey_map.npy")
    assert amap.shape == (40, 56) and amap.dtype == np.float32
    assert json.loads((out / "rgb.json").read_text())["threshold"] == 3.5


def test_folder_with_one_bad_file(bundle, tmp_path, capsys):
    d = tmp_path / "in"
    write_inputs(d)
    (d / "broken.png").write_bytes(b"this is not a png")
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, d, "--bundle", bundle, "--json", "--out", out)
    assert_one_error(rc, err, "broken.png", code=1)
    recs = [json.loads(line) for line in stdout.splitlines()]
    assert len(recs) == 4 and not any("broken" in r["file"] for r in recs)
    assert not any(f.startswith("broken") for f in files_in(out)) and len(files_in(out)) == 12


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _bad_zero(p: Path) -> str:
    p.write_bytes(b"")
    return "empty"


def _bad_truncated(p: Path) -> str:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(p)
    p.write_bytes(p.read_bytes()[:200])
    return "truncated"


def _bad_text(p: Path) -> str:
    p.write_text("hello, I am text\n")
    return "not an image"


def _bad_tiny(p: Path) -> str:
    Image.new("L", (1, 1)).save(p)
    return "at least"


def _bad_bomb(p: Path) -> str:
    ihdr = struct.pack(">IIBBBBB", 50000, 50000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 50001)
    p.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )
    return "too large"


@pytest.mark.parametrize(
    "make",
    [_bad_zero, _bad_truncated, _bad_text, _bad_tiny, _bad_bomb],
    ids=["zero-byte", "truncated", "text-as-png", "1x1", "bomb"],
)
def test_bad_image_inputs(bundle, tmp_path, capsys, make):
    p = tmp_path / "scan.png"
    what = make(p)
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, p, "--bundle", bundle, "--out", out, "--json")
    assert_one_error(rc, err, str(p), what)
    assert stdout == "" and files_in(out) == []


def _write_float_dicom(path: Path, values: np.ndarray) -> Path:
    pytest.importorskip("pydicom", reason="pydicom (madclip[medical]) not installed")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated = 1, "MONOCHROME2", 32
    ds.FloatPixelData = values.astype(np.float32).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_dicom_with_nan(bundle, tmp_path, capsys):
    v = np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20)
    good = _write_float_dicom(tmp_path / "good.dcm", v)
    v[3, 4] = np.nan
    bad = _write_float_dicom(tmp_path / "nan.dcm", v)
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, bad, good, "--bundle", bundle, "--out", out, "--json")
    assert_one_error(rc, err, str(bad), "NaN", code=1)
    assert [json.loads(x)["file"] for x in stdout.splitlines()] == [str(good)]
    assert files_in(out) == ["good.json", "good_map.png", "good_overlay.png"]


def test_volume_slices_named(bundle, tmp_path, capsys):
    nib = pytest.importorskip("nibabel", reason="nibabel (madclip[medical]) not installed")
    vol = np.random.default_rng(1).random((16, 18, 3)).astype(np.float32)
    p = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(p))
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, p, "--bundle", bundle, "--out", out, "--json")
    assert rc == 0, err  # a volume: one answer per scan (see tests/test_volume.py)
    (rec,) = [json.loads(x) for x in stdout.splitlines()]
    assert rec["file"] == str(p) and [s["source"] for s in rec["slices"]] == [
        f"{p}#slice={k}" for k in range(3)
    ]
    assert files_in(out) == ["vol.json", "vol_map.nii.gz", "vol_montage.png"]
    rc, stdout, err = run(capsys, p, "--bundle", bundle, "--slice", "1", "--json")
    assert rc == 0 and [json.loads(x)["file"] for x in stdout.splitlines()] == [f"{p}#slice=1"]
    rc, stdout, err = run(capsys, p, "--bundle", bundle, "--slice", "7")
    assert_one_error(rc, err, str(p), "out of range")


def test_output_stems():
    used: set[str] = set()
    assert output_stem("a/x.png", used) == "x"
    assert output_stem("b/x.png", used) == "x_2"
    assert output_stem("v.nii.gz#slice=12", used) == "v_s012"


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def _bad_bundle_case(capsys, tmp_path, b: Path, *needles: str) -> None:
    img = write_inputs(tmp_path / "in")["grey"]
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, img, "--bundle", b, "--out", out, "--json")
    assert_one_error(rc, err, *needles, code=2)
    assert stdout == "" and not out.exists()  # refused before the output directory is touched


def test_missing_bundle_file(bundle, tmp_path, capsys):
    b = _copy(bundle, tmp_path)
    (b / "model.onnx").unlink()
    _bad_bundle_case(capsys, tmp_path, b, "model.onnx", "missing")


def test_missing_bundle_dir_and_metadata(tmp_path, capsys):
    _bad_bundle_case(capsys, tmp_path, tmp_path / "nope", "no such bundle directory")
    (tmp_path / "empty").mkdir()
    _bad_bundle_case(capsys, tmp_path, tmp_path / "empty", "metadata.json", "missing")


def test_tampered_model(bundle, tmp_path, capsys):
    b = _copy(bundle, tmp_path)
    data = bytearray((b / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (b / "model.onnx").write_bytes(bytes(data))
    _bad_bundle_case(capsys, tmp_path, b, "tampered", "model.onnx")


def test_unknown_schema_version(bundle, tmp_path, capsys):
    b = _copy(bundle, tmp_path)
    meta = json.loads((b / "metadata.json").read_text())
    meta["schema_version"] = 99
    (b / "metadata.json").write_text(json.dumps(meta))
    _bad_bundle_case(capsys, tmp_path, b, "schema_version 99")


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write into a 0o500 directory"
)
def test_unwritable_out_chmod(bundle, tmp_path, capsys):
    img = write_inputs(tmp_path / "in")["grey"]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc, stdout, err = run(capsys, img, "--bundle", bundle, "--out", locked, "--json")
        assert_one_error(rc, err, str(locked), "not writable", code=2)
        assert stdout == "" and files_in(locked) == []
    finally:
        locked.chmod(0o700)


def test_unwritable_out_under_a_file(bundle, tmp_path, capsys):
    """Works as root too: an --out below a regular file cannot be created."""
    img = write_inputs(tmp_path / "in")["grey"]
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    rc, stdout, err = run(capsys, img, "--bundle", bundle, "--out", blocker / "sub", "--json")
    assert_one_error(rc, err, "not writable", code=2)
    assert stdout == "" and blocker.read_text() == "x"


def test_missing_input_and_usage(bundle, tmp_path, capsys):
    rc, stdout, err = run(capsys, tmp_path / "ghost.png", "--bundle", bundle)
    assert_one_error(rc, err, "ghost.png", "no such file", code=2)
    img = write_inputs(tmp_path / "in")["grey"]
    rc, stdout, err = run(capsys, tmp_path / "ghost.png", img, "--bundle", bundle, "--json")
    assert_one_error(rc, err, "ghost.png", code=1)
    assert len(stdout.splitlines()) == 1
    rc, stdout, err = run(capsys, "--bundle", bundle)
    assert_one_error(rc, err, "no INPUT", code=2)
    rc, stdout, err = run(capsys, img, "--bundle", bundle, "--precision", "int8")
    assert_one_error(rc, err, "no int8 model", code=2)


def test_selftest_cli(bundle, tmp_path, capsys):
    rc, stdout, err = run(capsys, "--bundle", bundle, "--selftest")
    assert rc == 0, err
    assert "PASSED" in err and "score max |err|" in stdout
    rc, stdout, err = run(capsys, "--bundle", bundle, "--selftest", "--json", "--precision", "fp16")
    assert rc == 0, err
    doc = json.loads(stdout)["selftest"]
    assert doc["passed"] and doc["precision"] == "fp16" and doc["tolerance"]["score"] == 5e-2

    b = _copy(bundle, tmp_path)
    data = bytearray((b / "golden.npz").read_bytes())
    data[-30] ^= 0x01
    (b / "golden.npz").write_bytes(bytes(data))
    rc, stdout, err = run(capsys, "--bundle", b, "--selftest")
    assert_one_error(rc, err, "golden.npz", "sha256 mismatch", code=2)
    shutil.copy(bundle / "golden.npz", b / "golden.npz")
    meta = json.loads((b / "metadata.json").read_text())
    meta["schema_version"] = 3
    (b / "metadata.json").write_text(json.dumps(meta))
    rc, stdout, err = run(capsys, "--bundle", b, "--selftest")
    assert_one_error(rc, err, "schema_version 3", code=2)


def test_selftest_tolerance_failure_stops_inference(bundle, tmp_path, capsys):
    from madclip_runtime.bundles.bundle import write_metadata

    b = _copy(bundle, tmp_path)
    with np.load(b / "golden.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["anomaly_map"] = arrays["anomaly_map"] + 0.01
    np.savez(b / "golden.npz", **arrays)
    write_metadata(b, json.loads((b / "metadata.json").read_text()))
    img = write_inputs(tmp_path / "in")["grey"]
    rc, stdout, err = run(capsys, img, "--bundle", b, "--selftest", "--json")
    assert_one_error(rc, err, "self-test failed", code=1)
    assert len(stdout.splitlines()) == 1 and not json.loads(stdout)["selftest"]["passed"]  # no scan records


def test_cli_and_api_never_import_torch(bundle, tmp_path):
    img = write_inputs(tmp_path / "in")["grey"]
    code = f"""
import json, sys
from madclip_runtime.cli.infer import main
rc = main([{str(img)!r}, "--bundle", {str(bundle)!r}, "--json", "--out", {str(tmp_path / "out")!r}])
import madclip_runtime as mr
pred = mr.load({str(bundle)!r}).predict({str(img)!r})
from madclip_runtime.cli.bench import machine_description
machine_description()
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'madclip_train', 'madclip_export'))
print(json.dumps({{"rc": rc, "bad": bad, "score": pred.score}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["rc"] == 0 and doc["bad"] == [] and 1.5 < doc["score"] < 2.5


def test_console_script_runs(bundle, tmp_path):
    img = write_inputs(tmp_path / "in")["pal"]
    res = subprocess.run(
        [sys.executable, "-m", "madclip_runtime.cli.infer", str(img), "--bundle", str(bundle), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert JSON_KEYS <= set(json.loads(res.stdout))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    res = subprocess.run(
        [sys.executable, "-m", "madclip_runtime.cli.infer", str(bad), "--bundle", str(bundle)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert len([x for x in res.stderr.splitlines() if x.startswith("error:")]) == 1
