"""The torch-free Python API: load a bundle, predict on files/arrays, labels, batching, self-test.

The bundle is real (ONNX graph, golden.npz, metadata.json with checksums) but built here WITHOUT the exporter:
a tiny graph whose outputs are simple functions of the image, so expected values can be computed in numpy:
    anomaly_map = 4 * sigmoid(mean over channels(image) - 0.5)   # [B, 1, S, S]
    score = mean(anomaly_map), score_map_max = max(anomaly_map)  # [B]
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from madclip_runtime.bundles.bundle import load_bundle, write_metadata
from madclip_runtime.errors import BundleError, InputError
from madclip_runtime.preprocess import preprocess, resize_map

from .conftest import THRESHOLD, S, build_tiny_bundle, expected_outputs, write_inputs


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


def test_load_and_predict_png_kinds(tiny_bundle, tmp_path):
    import madclip_runtime as mr
    from madclip_runtime.scans.imageio import read_image

    files = write_inputs(tmp_path)
    with mr.load(tiny_bundle, backend="ort-cpu") as p:
        assert (p.backend_name, p.provider, p.precision) == ("ort-cpu", "CPUExecutionProvider", "fp32")
        assert p.threshold == THRESHOLD and p.score_name == "score"
        for kind, path in files.items():
            pred = p.predict(path)
            scan = read_image(path)
            x = preprocess(scan, p.bundle.spec)[None]  # [1, 3, S, S]
            ref = expected_outputs(x)
            assert pred.source == str(path)
            assert pred.model_map.shape == (S, S)
            assert pred.anomaly_map.shape == (scan.height, scan.width), kind  # native resolution
            assert pred.anomaly_map.dtype == np.float32
            np.testing.assert_allclose(pred.model_map, ref["anomaly_map"][0, 0], atol=1e-5)
            np.testing.assert_allclose(
                pred.anomaly_map, resize_map(pred.model_map, scan.height, scan.width), atol=1e-6
            )
            assert pred.score == pytest.approx(float(ref["score"][0]), abs=1e-5)
            assert pred.score_map_max == pytest.approx(float(ref["score_map_max"][0]), abs=1e-5)
            assert set(pred.timings) == {"decode", "preprocess", "inference", "postprocess"}
            assert pred.timings["decode"] > 0 and all(v >= 0 for v in pred.timings.values())
            assert pred.label == ("anomaly" if pred.score >= THRESHOLD else "normal")


def test_labels_threshold_override_and_arrays(tiny_bundle):
    import madclip_runtime as mr

    white, black = np.full((20, 20), 255, np.uint8), np.zeros((20, 20), np.uint8)
    with mr.load(tiny_bundle) as p:
        w, b = p.predict_batch([white, black])
        assert w.score == pytest.approx(4 / (1 + np.exp(-0.5)), abs=1e-5) and w.label == "anomaly"
        assert b.score == pytest.approx(4 / (1 + np.exp(0.5)), abs=1e-5) and b.label == "normal"
        assert w.threshold == THRESHOLD and w.decision_score == w.score
        # float arrays in [0, 1] and other integer depths are accepted; out-of-range floats are refused
        assert p.predict(np.full((20, 20, 3), 1.0, np.float32)).score == pytest.approx(w.score, abs=1e-5)
        assert p.predict(np.full((20, 20), 1000, np.uint16)).label in ("normal", "anomaly")
        with pytest.raises(InputError, match=r"\[0, 1\]"):
            p.predict(np.full((20, 20), 2.0, np.float32))
        with pytest.raises(InputError, match="at least"):
            p.predict(np.zeros((1, 1), np.uint8))
        with pytest.raises(InputError, match="NaN"):
            p.predict(np.full((20, 20), np.nan, np.float32))
    with mr.load(tiny_bundle, threshold=3.0) as p:
        assert p.predict(white).label == "normal" and p.predict(white).threshold == 3.0


def test_no_threshold_and_score_map_max_calibration(tmp_path):
    import madclip_runtime as mr

    b = build_tiny_bundle(tmp_path / "nothr", threshold=None)
    with mr.load(b) as p:
        pred = p.predict(np.full((16, 16), 255, np.uint8))
        assert pred.label is None and pred.threshold is None
    b2 = build_tiny_bundle(tmp_path / "smax", score_name="score_map_max", threshold=2.3)
    img = np.zeros((16, 16), np.uint8)
    img[:8] = 255  # half white: max 2.49 >= 2.3 but mean 2.0 < 2.3
    with mr.load(b2) as p:
        pred = p.predict(img)
        assert pred.score < 2.3 <= pred.score_map_max
        assert pred.score_name == "score_map_max" and pred.label == "anomaly"


def test_predict_batch_larger_than_max_batch(tiny_bundle):
    import madclip_runtime as mr

    imgs = [np.full((12, 10 + i), 20 * i, np.uint8) for i in range(10)]  # max_batch is 4 -> 3 chunks
    with mr.load(tiny_bundle) as p:
        preds = p.predict_batch(imgs)
        singles = [p.predict(im) for im in imgs]
    assert [x.anomaly_map.shape for x in preds] == [(12, 10 + i) for i in range(10)]
    np.testing.assert_allclose([x.score for x in preds], [x.score for x in singles], atol=1e-6)


def test_volume_slices(tiny_bundle, tmp_path):
    nib = pytest.importorskip("nibabel", reason="nibabel (madclip[medical]) not installed")
    import madclip_runtime as mr

    vol = np.stack([np.full((20, 24), 50.0 * k, np.float32) for k in range(3)], axis=2)  # [X, Y, Z]
    vol[0, 0, :] = 1.0
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))
    with mr.load(tiny_bundle) as p:
        with pytest.raises(InputError, match="3 slices"):
            p.predict(path)
        preds = p.predict_file(path)
        assert [x.source for x in preds] == [f"{path}#slice={k}" for k in range(3)]
        assert p.predict(path, slice_index=1).source == f"{path}#slice=1"


def test_fp16_on_cpu_runs_and_warns(tiny_bundle, caplog):
    import madclip_runtime as mr

    with caplog.at_level("WARNING"):
        with mr.load(tiny_bundle, backend="ort-cpu", precision="fp16") as p:
            pred = p.predict(np.full((16, 16), 255, np.uint8))
    assert "slower than FP32" in caplog.text
    assert p.precision == "fp16" and pred.score == pytest.approx(2.49, abs=1e-2)


def test_missing_precision_and_bad_backend(tiny_bundle):
    import madclip_runtime as mr
    from madclip_runtime.errors import MadclipError

    with pytest.raises(BundleError, match="no int8 model"):
        mr.load(tiny_bundle, precision="int8")
    with pytest.raises(MadclipError, match="unknown backend"):
        mr.load(tiny_bundle, backend="nope")
    with pytest.raises(InputError, match="finite"):
        mr.load(tiny_bundle, threshold=float("nan"))


def test_selftest_pass_and_tampered(tiny_bundle, tmp_path):
    from madclip_runtime.bundles.selftest import run_selftest

    res = run_selftest(tiny_bundle, "ort-cpu", "fp32")
    assert res["passed"] and res["n"] == 3 and res["provider"] == "CPUExecutionProvider"
    assert res["score_max_abs_err"] <= 1e-4 and res["label_agreement"] == 1.0
    json.dumps(res, allow_nan=False)
    res16 = run_selftest(tiny_bundle, "ort-cpu", "fp16")
    assert res16["passed"] and res16["precision"] == "fp16" and res16["map_max_abs_err"] < 5e-2

    bad = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, bad)
    data = bytearray((bad / "model_fp16.onnx").read_bytes())
    data[-5] ^= 0xFF
    (bad / "model_fp16.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        run_selftest(bad, "ort-cpu", "fp32")  # every file is verified, not only the one being tested


def test_selftest_fails_on_wrong_reference(tiny_bundle, tmp_path):
    """A bundle whose golden reference disagrees with its graph (checksums consistent) fails the tolerances."""
    from madclip_runtime.bundles.selftest import run_selftest

    bad = tmp_path / "wrong"
    shutil.copytree(tiny_bundle, bad)
    with np.load(bad / "golden.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["score"] = arrays["score"] + 1e-3
    np.savez(bad / "golden.npz", **arrays)
    write_metadata(bad, json.loads((bad / "metadata.json").read_text()))
    res = run_selftest(bad, "ort-cpu", "fp32")
    assert not res["passed"] and res["score_max_abs_err"] == pytest.approx(1e-3, rel=1e-2)


def test_load_bundle_object_and_verify_modes(tiny_bundle):
    import madclip_runtime as mr

    b = load_bundle(tiny_bundle, verify=True)
    with mr.load(b) as p:
        assert p.bundle is b and p.max_batch == 4
    assert "load" in mr.__all__ and mr.INTENDED_USE.startswith("research use")


def test_runtime_failure_is_one_line(tiny_bundle, tmp_path):
    """A graph that disagrees with its metadata (wrong input size) fails as a BundleError, not a traceback."""
    import madclip_runtime as mr

    b = tmp_path / "mismatch"
    shutil.copytree(tiny_bundle, b)
    meta = json.loads((b / "metadata.json").read_text())
    meta["preprocess"]["image_size"] = 24
    meta["input"]["shape"] = ["batch", 3, 24, 24]
    write_metadata(b, meta)
    with mr.load(b) as p:
        with pytest.raises(BundleError, match="inference failed on ort-cpu") as info:
            p.predict(np.zeros((16, 16), np.uint8))
    assert "\n" not in str(info.value)
