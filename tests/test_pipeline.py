"""Train -> export -> serve: the runtime sees exactly the arrays training saw and reproduces PyTorch's outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from madclip_runtime import load
from madclip_runtime.preprocess import preprocess
from madclip_train.data import Sample, load_arrays
from madclip_train.rundir import load_run

from .conftest import REALSCANS


def _files(tmp_path):
    rng = np.random.default_rng(0)
    grey = (rng.random((97, 131)) * 255).astype(np.uint8)
    files = {
        "grey8": tmp_path / "grey8.png",
        "rgb": tmp_path / "rgb.png",
        "palette": tmp_path / "pal.png",
        "grey16": tmp_path / "grey16.png",
        "rgba": tmp_path / "rgba.png",
        "jpeg": tmp_path / "x.jpg",
    }
    Image.fromarray(grey).save(files["grey8"])
    Image.fromarray(np.stack([grey, grey[::-1], grey[:, ::-1]], -1)).save(files["rgb"])
    Image.fromarray(grey).convert("P").save(files["palette"])
    Image.fromarray((rng.random((64, 80)) * 4000).astype(np.uint16)).save(files["grey16"])
    Image.fromarray(np.dstack([grey, grey, grey, grey])).save(files["rgba"])
    Image.fromarray(grey).save(files["jpeg"], quality=90)
    out = list(files.values())
    for sub in ("Brain_AD/test/Ungood/img", "raw16"):
        folder = REALSCANS / sub
        if folder.is_dir():
            out.append(sorted(folder.glob("*.png"))[0])
    return out


def test_training_dataloader_and_runtime_see_the_same_arrays(exported_tiny_bundle, tmp_path):
    predictor = load(exported_tiny_bundle, backend="ort-cpu")
    spec = predictor.bundle.spec
    for path in _files(tmp_path):
        train_side = load_arrays([Sample(str(path), 0, None)], spec)[0][
            0
        ]  # what madclip-train feeds the model
        runtime_side = preprocess(predictor.read(path)[0], spec)  # what madclip-infer feeds the backend
        assert train_side.dtype == runtime_side.dtype == np.float32
        np.testing.assert_array_equal(train_side, runtime_side, err_msg=str(path))


def test_runtime_reproduces_pytorch_on_real_files(trained_tiny_run, exported_tiny_bundle, tmp_path):
    model, _ = load_run(trained_tiny_run)
    files = _files(tmp_path)[:4]
    images = load_arrays([Sample(str(p), 0, None) for p in files], model.cfg.preprocess)[0]
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in model(torch.from_numpy(images)).items()}
    predictor = load(exported_tiny_bundle, backend="ort-cpu", precision="fp32")
    preds = predictor.predict_batch([str(p) for p in files])
    for i, (p, pred) in enumerate(zip(files, preds)):
        assert abs(pred.score - ref["score"][i]) < 1e-4
        assert np.abs(pred.model_map - ref["anomaly_map"][i, 0]).max() < 1e-4
        h, w = np.asarray(Image.open(p)).shape[:2]
        assert pred.anomaly_map.shape == (h, w)  # native resolution
    meta = json.loads((exported_tiny_bundle / "metadata.json").read_text())
    assert preds[0].threshold == pytest.approx(meta["calibration"]["threshold"])
