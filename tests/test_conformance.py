"""Conformance of every registered method (`registry.all_methods()`) to the method interface (issue 22.3).

Each method, on the tiny random CLIP (`madclip-tiny`) and generated data, must pass, in order:
build -> loss finite and backward (finite gradients, some non-zero) -> outputs' names, shapes and declared
ranges -> checkpoint round trip (write_run / load_run: outputs equal) -> export FP32 parity (ONNX vs PyTorch)
-> runtime predict parity (`madclip_runtime.load` on the bundle vs the PyTorch model) -> reference conversion
round trip (the method's reference-format weights, converted by madclip-convert-reference: outputs equal).

A new method gets these tests by registering (`methods/registry.py`). The trained run, the bundle and the
converted run of each method are made once per module (`artefacts`) and shared by the tests that need them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from madclip_runtime.contract import (
    ANOMALY_MAP,
    FP32,
    GOLDEN_FILE,
    GOLDEN_INPUT,
    MODEL_FILES,
    ORT_CPU,
    OUTPUT_NAMES,
    SCORE,
    SCORE_MAP_MAX,
)
from madclip_train.methods.registry import method_names

METHODS = method_names()
SHOTS, EPOCHS, SEED = 2, 1, 3
TOLERANCE = 1e-4  # the exporter's FP32 parity gate (ONNX vs PyTorch)


class Artefacts:
    """Per method, made on first use: the trained run, its bundle, and the run converted from its reference
    checkpoint. A failure is remembered: the later checks of that method fail at once instead of retrying."""

    def __init__(self, base: Path):
        self.base = base
        self.data = None
        self.cache: dict[tuple[str, str], object] = {}

    def _once(self, key: tuple[str, str], make):
        if key not in self.cache:
            try:
                self.cache[key] = make()
            except Exception as exc:  # noqa: BLE001 (remembered and re-raised for each dependent test)
                self.cache[key] = exc
        got = self.cache[key]
        if isinstance(got, Exception):
            raise got
        return got

    def data_root(self) -> Path:
        from madclip_train.demo import generate_demo

        return self._once(
            ("", "data"), lambda: Path(generate_demo(self.base / "data", n_valid=3, n_test=2, seed=5))
        )

    def run(self, method: str) -> Path:
        from madclip_train.run import TrainRequest, train_run

        def make() -> Path:
            out = self.base / f"run-{method}"
            train_run(
                TrainRequest(
                    data=str(self.data_root()),
                    out=str(out),
                    method=method,
                    shots=SHOTS,
                    epochs=EPOCHS,
                    seed=SEED,
                    backbone="madclip-tiny",
                    pretrained="none",
                    device="cpu",
                    precision="fp32",
                )
            )
            return out

        return self._once((method, "run"), make)

    def bundle(self, method: str) -> Path:
        from madclip_export.export import ExportOptions, export_bundle

        def make() -> Path:
            out = self.base / f"bundle-{method}"
            export_bundle(ExportOptions(run=str(self.run(method)), out=str(out), max_batch=4))
            return out

        return self._once((method, "bundle"), make)


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory) -> Artefacts:
    return Artefacts(tmp_path_factory.mktemp("conformance"))


def _tiny_config(method: str):
    from madclip_train.config import ModelConfig
    from madclip_train.methods import get_method

    cls = get_method(method)
    return ModelConfig(
        method=method,
        backbone="madclip-tiny",
        pretrained="none",
        objective="Brain",
        options=cls.default_options(),
    )


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def _load(run: Path):
    from madclip_train.rundir import load_run

    model, config = load_run(run)
    model.eval()
    return model, config


def _golden(bundle: Path) -> np.ndarray:
    return np.load(bundle / GOLDEN_FILE)[GOLDEN_INPUT].astype(np.float32)


@torch.no_grad()
def _outputs(model, images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
    x = torch.as_tensor(images)
    return {k: v.float().numpy() for k, v in model(x).items()}


def _assert_equal_outputs(a: dict, b: dict, what: str) -> None:
    for name in OUTPUT_NAMES:
        assert np.array_equal(a[name], b[name]), (
            f"{what}: {name} differs (max |diff| {np.abs(a[name].astype(np.float64) - b[name]).max():.3g})"
        )


# ---- the checks, one test each per method ------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_build_loss_backward(method):
    from madclip_train.model import build_model

    model = build_model(_tiny_config(method), seed=0)
    model.set_training(True)
    size, n = model.image_size, 4
    images = _images(n, size)
    labels = torch.tensor([0, 1, 0, 1])
    masks = torch.zeros(n, size, size)
    masks[1, size // 4 : size // 2, size // 4 : size // 2] = 1
    masks[3, size // 2 :, size // 2 :] = 1
    with torch.no_grad():
        feats = model.cacheable(images)
    params = model.trainable_parameters(True)
    assert params, f"{method}: no trainable parameters"
    parts = model.loss(feats, labels, masks)
    assert "total" in parts and parts["total"].dim() == 0
    assert all(torch.isfinite(v).all() for v in parts.values()), f"{method}: non-finite loss {parts}"
    parts["total"].backward()
    grads = [p.grad for p in params if p.grad is not None]
    assert grads, f"{method}: backward reached no trainable parameter"
    assert all(torch.isfinite(g).all() for g in grads), f"{method}: non-finite gradient"
    assert any(g.abs().sum() > 0 for g in grads), f"{method}: every gradient is zero"
    frozen = [p for p in model.parameters() if all(p is not q for q in params)]
    assert all(p.grad is None or not p.grad.any() for p in frozen), (
        f"{method}: a frozen weight got a gradient"
    )


@pytest.mark.parametrize("method", METHODS)
def test_outputs_names_shapes_and_ranges(method, artefacts):
    from madclip_train.data import load_arrays
    from madclip_train.rundir import read_shots

    model, config = _load(artefacts.run(method))
    shots = read_shots(artefacts.run(method), config)
    images, _, _ = load_arrays(shots, model.cfg.preprocess)  # the run's own shots: inside the fitted ranges
    out = _outputs(model, images)
    n, size = len(images), model.image_size
    assert tuple(out) == OUTPUT_NAMES or set(out) == set(OUTPUT_NAMES), f"{method}: outputs {sorted(out)}"
    assert out[SCORE].shape == (n,) and out[SCORE_MAP_MAX].shape == (n,)
    assert out[ANOMALY_MAP].shape == (n, 1, size, size)
    assert all(np.isfinite(v).all() for v in out.values())
    np.testing.assert_allclose(
        out[SCORE_MAP_MAX], out[ANOMALY_MAP].reshape(n, -1).max(axis=1), rtol=0, atol=1e-6
    )
    ranges = model.output_ranges()
    assert set(ranges) >= {SCORE, ANOMALY_MAP}
    for name, key in ((SCORE, SCORE), (ANOMALY_MAP, ANOMALY_MAP), (SCORE_MAP_MAX, ANOMALY_MAP)):
        lo, hi = ranges[key]
        assert math.isfinite(lo) and math.isfinite(hi) and lo < hi
        eps = 1e-5 * (hi - lo)
        assert out[name].min() >= lo - eps and out[name].max() <= hi + eps, (
            f"{method}: {name} in [{out[name].min():.4g}, {out[name].max():.4g}], declared [{lo}, {hi}]"
        )


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_round_trip(method, artefacts, tmp_path):
    import json

    from madclip_train.rundir import SHOTS, write_run

    run = artefacts.run(method)
    model, config = _load(run)
    images = _images(3, model.image_size, seed=1)
    before = _outputs(model, images)
    (tmp_path / "copy").mkdir()
    write_run(tmp_path / "copy", model, config, json.loads((run / SHOTS).read_text()))
    again, _ = _load(tmp_path / "copy")
    _assert_equal_outputs(before, _outputs(again, images), f"{method} checkpoint round trip")


@pytest.mark.parametrize("method", METHODS)
def test_export_fp32_parity(method, artefacts):
    import onnxruntime as ort

    bundle = artefacts.bundle(method)
    model, _ = _load(artefacts.run(method))
    images = _golden(bundle)
    ref = _outputs(model, images)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(bundle / MODEL_FILES[FP32]), opts, providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == list(OUTPUT_NAMES)
    got = dict(zip(OUTPUT_NAMES, sess.run(list(OUTPUT_NAMES), {sess.get_inputs()[0].name: images})))
    for name in OUTPUT_NAMES:
        assert got[name].shape == ref[name].shape
        err = np.abs(got[name].astype(np.float64) - ref[name]).max()
        assert err <= TOLERANCE, f"{method}: ONNX {name} differs from PyTorch by {err:.3g}"


@pytest.mark.parametrize("method", METHODS)
def test_runtime_predict_parity(method, artefacts):
    import madclip_runtime
    from madclip_train.data import load_arrays, load_split

    bundle = artefacts.bundle(method)
    model, _ = _load(artefacts.run(method))
    split = load_split(artefacts.data_root(), "test")
    samples = [split.normal[0], split.abnormal[0]]
    images, _, _ = load_arrays(
        samples, model.cfg.preprocess
    )  # madclip_train preprocesses with the runtime's code
    ref = _outputs(model, images)
    with madclip_runtime.load(str(bundle), backend=ORT_CPU, precision=FP32) as predictor:
        preds = predictor.predict_batch([s.path for s in samples])
    for i, p in enumerate(preds):
        assert abs(p.score - ref[SCORE][i]) <= TOLERANCE, f"{method}: score {p.score} vs {ref[SCORE][i]}"
        assert abs(p.score_map_max - ref[SCORE_MAP_MAX][i]) <= TOLERANCE
        assert np.abs(p.model_map - ref[ANOMALY_MAP][i, 0]).max() <= TOLERANCE
        assert np.isfinite(p.anomaly_map).all()


@pytest.mark.parametrize("method", METHODS)
def test_reference_conversion_round_trip(method, artefacts, tmp_path):
    from madclip_train.cli import convert_main
    from madclip_train.methods import get_method

    cls = get_method(method)
    run = artefacts.run(method)
    model, config = _load(run)
    ref_path = tmp_path / "reference.pth"
    torch.save(model.reference_checkpoint(), ref_path)
    argv = [
        str(ref_path),
        "--out",
        str(tmp_path / "converted"),
        "--method",
        method,
        "--backbone",
        "madclip-tiny",
        "--pretrained",
        "none",
    ]
    if cls.uses_objective:
        argv += ["--objective", model.cfg.objective]
    if cls.reference_needs_shots:  # the run's own shots rebuild what the release lacks
        names = {0: [], 1: []}
        from madclip_train.rundir import read_shots

        for s in read_shots(run, config):
            names[s.label].append(Path(s.path).name)
        shot_list = tmp_path / "shots.txt"
        shot_list.write_text(f"n-0: {' '.join(names[0])}\na-0: {' '.join(names[1])}\n")
        argv += ["--data", str(artefacts.data_root()), "--shot-list", str(shot_list), "--seed", str(SEED)]
    assert convert_main(argv) == 0
    converted, _ = _load(tmp_path / "converted")
    images = _images(3, model.image_size, seed=2)
    _assert_equal_outputs(
        _outputs(model, images), _outputs(converted, images), f"{method} reference round trip"
    )


def test_every_registered_method_is_covered():
    """The matrix is the registry: a method registered in methods/registry.py is a parameter of each check."""
    from madclip_train.methods import all_methods

    assert [m.name for m in all_methods()] == METHODS and len(METHODS) >= 3
