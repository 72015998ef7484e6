"""Shared fixtures and helpers: the tiny random CLIP (`madclip-tiny`), the shared real scans, and a tiny
stand-in bundle built WITHOUT the exporter (an ONNX graph whose outputs are simple functions of the image, so
expected values can be computed in numpy):
    anomaly_map = 4 * sigmoid(mean over channels(image) - 0.5)   # [B, 1, S, S]
    score = mean(anomaly_map), score_map_max = max(anomaly_map)  # [B]
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from madclip_runtime.atomic import AtomicDirectory
from madclip_runtime.bundles.bundle import write_metadata
from madclip_runtime.bundles.selftest import golden_decisions
from madclip_runtime.contract import io_metadata
from madclip_runtime.preprocess import PreprocessSpec

# ../shared beside the repository; MADCLIP_REALSCANS overrides it (e.g. from a git worktree elsewhere).
REALSCANS = Path(
    os.environ.get("MADCLIP_REALSCANS")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "realscans"
)


def realscans_or_skip(name: str = "") -> Path:
    path = REALSCANS / name if name else REALSCANS
    if not path.exists():
        pytest.skip(
            f"real scans not available at {path} (CI and the dev machine have ../shared beside the repo)"
        )
    return path


@pytest.fixture(scope="session")
def tiny_cfg():
    from madclip_train.config import ModelConfig

    return ModelConfig(backbone="madclip-tiny", pretrained="none", objective="Brain")


@pytest.fixture()
def tiny_model(tiny_cfg):
    from madclip_train.model import build_model

    return build_model(tiny_cfg, seed=0)


@pytest.fixture(scope="session")
def trained_tiny_run(tmp_path_factory):
    """A real madclip-tiny run (2 epochs, 2 + 2 shots) on generated demo data. Returns the run directory."""
    from madclip_train.demo import generate_demo
    from madclip_train.run import TrainRequest, train_run

    base = tmp_path_factory.mktemp("tiny_run")
    root = generate_demo(base / "data", n_valid=3, n_test=3, seed=11)
    out = base / "run"
    train_run(
        TrainRequest(
            data=str(root),
            out=str(out),
            shots=2,
            epochs=2,
            backbone="madclip-tiny",
            pretrained="none",
            device="cpu",
        )
    )
    return out


@pytest.fixture(scope="session")
def exported_tiny_bundle(trained_tiny_run, tmp_path_factory):
    """The trained tiny run exported with FP16, INT8 and Triton (max batch 4). Returns the bundle directory."""
    from madclip_export.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("tiny_bundle") / "b"
    export_bundle(
        ExportOptions(run=str(trained_tiny_run), out=str(out), fp16=True, int8=True, triton=True, max_batch=4)
    )
    return out


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """The stand-in bundle below (map = 4 sigmoid(brightness - 0.5), threshold 2.0, map threshold 2.2), 64 px."""
    return build_tiny_bundle(tmp_path_factory.mktemp("standin") / "b", size=64)


def fake_reference_checkpoint(width=64, embed=32, ctx_dim=64) -> dict:
    """A synthetic checkpoint in the authors' key format for the madclip-tiny geometry (random tensors)."""
    import torch

    g = torch.Generator().manual_seed(0)
    ref = {}
    for branch in ("normal", "abnormal"):
        ref[f"{branch}_det_adapters"] = {
            f"{j}.fc{n}.0.weight": torch.randn(width if n == 1 else embed, width, generator=g)
            for j in range(4)
            for n in (1, 2, 3)
        }
        ref[f"prompt_maker_{branch}"] = {
            f"prompt_learner.ctx.{c}_{p}": torch.randn(7, 8, ctx_dim, generator=g)
            for c in ("normal", "abnormal")
            for p in ("end", "front", "middle")
        }
        ref[f"prompt_maker_{branch}"]["text_encoder.ln_final.weight"] = torch.ones(ctx_dim)
    return ref


def copy_tree(src, dst):
    """A private copy of a (session-scoped) bundle or run directory that a test may edit."""
    import shutil

    shutil.copytree(src, dst)
    return Path(dst)


def cli_error_lines(err: str) -> list[str]:
    """The non-empty lines of a CLI's stderr."""
    return [line for line in err.splitlines() if line.strip()]


def eval_fixed_and_transductive(run: Path, data: Path, tmp_path: Path) -> tuple[dict, dict]:
    """madclip-eval on a run twice (fixed, then --transductive normalisation) on CPU; both JSON reports."""
    import json

    from madclip_train.cli import eval_main

    reports = []
    for name, extra in (("fixed", []), ("trans", ["--transductive"])):
        out = tmp_path / f"{name}.json"
        assert eval_main([str(run), "--data", str(data), "--json", str(out), "--device", "cpu", *extra]) == 0
        reports.append(json.loads(out.read_text()))
    return reports[0], reports[1]


def write_multiframe_dicom(path: Path, frames: "np.ndarray") -> Path:
    """A minimal uint16 CT DICOM with frames [F, R, C] (pydicom, madclip[medical]); skips without pydicom."""
    import numpy as np

    pytest.importorskip("pydicom", reason="pydicom (madclip[medical]) not installed")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    stored = np.asarray(frames, dtype=np.uint16)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.NumberOfFrames = stored.shape[0]
    ds.PixelData = stored.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


# ---- a tiny stand-in bundle (no exporter, no torch) ------------------------------------------------------

S = 32
THRESHOLD = (
    2.0  # uniform grey v: score = 4*sigmoid(v/255 - 0.5); white -> 2.49 (anomaly), black -> 1.51 (normal)
)


def _graph(fp16: bool, size: int = S):
    """The tiny stand-in for the exported MadCLIP graph; `fp16` computes the map in half precision."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dt = np.float16 if fp16 else np.float32
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT16)
        if fp16
        else helper.make_node("Identity", ["image"], ["x"])
    ]
    nodes += [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=1),  # [B, 1, S, S]
        helper.make_node("Sub", ["m", "half"], ["c"]),
        helper.make_node("Sigmoid", ["c"], ["p"]),
        helper.make_node("Mul", ["p", "four"], ["amap_h"]),
        helper.make_node("Cast", ["amap_h"], ["anomaly_map"], to=TensorProto.FLOAT)
        if fp16
        else helper.make_node("Identity", ["amap_h"], ["anomaly_map"]),
        helper.make_node("ReduceMean", ["anomaly_map"], ["score"], axes=[1, 2, 3], keepdims=0),  # [B]
        helper.make_node("ReduceMax", ["anomaly_map"], ["score_map_max"], axes=[1, 2, 3], keepdims=0),  # [B]
    ]
    inits = [
        numpy_helper.from_array(np.array(0.5, dt), "half"),
        numpy_helper.from_array(np.array(4.0, dt), "four"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_madclip",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", 1, size, size]),
            helper.make_tensor_value_info("score_map_max", TensorProto.FLOAT, ["batch"]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# ---- a tiny ONNX model of the bundle's interface (image -> score, anomaly_map, score_map_max) -------------
# Shared by the backend tests (CPU) and the TensorRT tests (GPU). onnx is imported inside: collecting the
# suite must not need it.

SIZE = 16  # image H = W
PATCH = 4


def make_tiny_model(seed: int = 0):
    """image [B,3,16,16] -> Conv 4x4/4 -> channel mean [B,1,4,4] -> nearest x4 -> sigmoid = anomaly_map;
    score = mean of the map, score_map_max = max of the map (the bundle's output contract)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.2, (4, 3, PATCH, PATCH)).astype(np.float32)
    bias = rng.normal(0, 0.1, (4,)).astype(np.float32)
    inits = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(bias, "b"),
        numpy_helper.from_array(np.array([1], np.int64), "ax_c"),
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), "ax_all"),
        numpy_helper.from_array(np.array([1, 1, PATCH, PATCH], np.float32), "scales"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w", "b"], ["feat"], strides=[PATCH, PATCH], name="patch_embed"),
        helper.make_node("ReduceMean", ["feat", "ax_c"], ["logit"], keepdims=1, name="channel_mean"),
        helper.make_node("Resize", ["logit", "", "scales"], ["up"], mode="nearest", name="upsample"),
        helper.make_node("Sigmoid", ["up"], ["prob"], name="sigmoid"),
        # A graph output that other nodes also consume trips onnxconverter-common's keep_io_types casts.
        helper.make_node("Identity", ["prob"], ["anomaly_map"], name="map_out"),
        helper.make_node("ReduceMean", ["prob", "ax_all"], ["score"], keepdims=0, name="score_mean"),
        helper.make_node("ReduceMax", ["prob", "ax_all"], ["score_map_max"], keepdims=0, name="map_max"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_madclip",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", 1, SIZE, SIZE]),
            helper.make_tensor_value_info("score_map_max", TensorProto.FLOAT, ["batch"]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def reference_outputs(images: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """The tiny model computed in numpy."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.2, (4, 3, PATCH, PATCH)).astype(np.float64)
    bias = rng.normal(0, 0.1, (4,)).astype(np.float64)
    b, g = images.shape[0], SIZE // PATCH
    patches = images.astype(np.float64).reshape(b, 3, g, PATCH, g, PATCH)  # [B, C, i, p, j, q]
    feat = np.einsum("bcipjq,ocpq->boij", patches, weight) + bias[None, :, None, None]  # [B, 4, g, g]
    logit = feat.mean(axis=1, keepdims=True)  # [B, 1, g, g]
    up = logit.repeat(PATCH, axis=2).repeat(PATCH, axis=3)  # [B, 1, 16, 16]
    amap = 1.0 / (1.0 + np.exp(-up))
    return {
        "score": amap.mean(axis=(1, 2, 3)),
        "anomaly_map": amap,
        "score_map_max": amap.max(axis=(1, 2, 3)),
    }


def images(batch: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (batch, 3, SIZE, SIZE)).astype(np.float32)


def expected_outputs(images: np.ndarray) -> dict[str, np.ndarray]:
    """numpy reference of the tiny graph: images [B, 3, S, S] -> outputs."""
    amap = 4.0 / (1.0 + np.exp(-(images.mean(axis=1, keepdims=True) - 0.5)))  # [B, 1, S, S]
    return {
        "anomaly_map": amap,
        "score": amap.mean(axis=(1, 2, 3)),
        "score_map_max": amap.max(axis=(1, 2, 3)),
    }


def build_tiny_bundle(
    path: Path, score_name: str = "score", threshold: float | None = THRESHOLD, size: int = S
) -> Path:
    """Write a complete schema-2 bundle (fp32 + fp16 graphs, golden.npz, metadata.json) at `path`."""
    import onnx
    import onnxruntime as ort

    with AtomicDirectory(path) as tmp:
        onnx.save(_graph(False, size), os.path.join(tmp, "model.onnx"))
        onnx.save(_graph(True, size), os.path.join(tmp, "model_fp16.onnx"))
        rng = np.random.default_rng(0)
        images = np.stack(
            [
                np.full((3, size, size), 0.1, np.float32),
                np.full((3, size, size), 0.9, np.float32),
                rng.random((3, size, size), dtype=np.float32),
            ]
        )  # [3, 3, S, S]
        sess = ort.InferenceSession(os.path.join(tmp, "model.onnx"), providers=["CPUExecutionProvider"])
        score, amap, smax = sess.run(["score", "anomaly_map", "score_map_max"], {"image": images})
        calibration = {
            "threshold": threshold,
            "score_name": score_name,
            "method": "fixed for tests",
            "map_threshold": 2.2,
            "map_scale": [0.0, 4.0],
        }
        outputs = {"score": score, "anomaly_map": amap, "score_map_max": smax}
        np.savez(
            os.path.join(tmp, "golden.npz"),
            image=images,
            **outputs,
            **golden_decisions(outputs, calibration),
            labels=np.array([-1, 1, -1]),
            sources=np.array(["dark", "bright", "noise"]),
        )
        meta = {
            "preprocess": PreprocessSpec(image_size=size).to_dict(),
            **io_metadata(size, {"score": (0.0, 4.0), "anomaly_map": (0.0, 4.0)}),
            "max_batch": 4,
            "opset": 17,
            "calibration": calibration,
            "provenance": {"backbone": "test-graph", "pretrained": "none"},
            "models": {"fp32": "model.onnx", "fp16": "model_fp16.onnx"},
        }
        write_metadata(tmp, meta)
    return path


def _grad(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((x * 7 + y * 3) % 256).astype(np.uint8)  # [H, W]


def write_inputs(d: Path) -> dict[str, Path]:
    """PNG inputs of several kinds and sizes: 8-bit grey, 16-bit grey, RGB, palette."""
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    out["grey"] = d / "grey.png"
    Image.fromarray(_grad(40, 56)).save(out["grey"])
    out["g16"] = d / "g16.png"
    Image.fromarray((_grad(33, 20).astype(np.uint16) * 257)).save(out["g16"])
    assert Image.open(out["g16"]).mode.startswith("I")
    out["rgb"] = d / "rgb.png"
    Image.fromarray(
        np.stack([_grad(24, 30), _grad(24, 30)[::-1], np.full((24, 30), 99, np.uint8)], axis=2)
    ).save(out["rgb"])
    out["pal"] = d / "pal.png"
    Image.fromarray(np.stack([_grad(50, 45)] * 3, axis=2)).convert("P").save(out["pal"])
    assert Image.open(out["pal"]).mode == "P"
    return out


# ------------------------------------------------------------------ synthetic volumes (issue 15 tests)


def lesion_volume(shape=(24, 20, 7), lesion_slice=4, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """int16 volume [X, Y, Z] of smooth "tissue" with a bright 4x4 lesion in z = `lesion_slice`; and its mask."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    base = (200 + 40 * np.sin(x / 3.0) + 30 * np.cos(y / 4.0)).astype(np.float64)  # [X, Y]
    vol = np.stack([base + rng.normal(0, 3, base.shape) for _ in range(shape[2])], axis=2)
    mask = np.zeros(shape, np.uint8)
    mask[9:13, 5:9, min(lesion_slice, shape[2] - 1)] = 1
    vol[mask.astype(bool)] = 1500
    return vol.astype(np.int16), mask


def write_dicom_series(
    folder: Path,
    frames: np.ndarray,
    *,
    spacing=(0.8, 0.7),
    thickness=2.5,
    origin=(-10.0, 20.0, -30.0),
    iop=(1, 0, 0, 0, 1, 0),
    series_uid=None,
    study_uid=None,
    series_number=1,
    order=None,
    patient="P1",
) -> tuple[list[Path], str]:
    """Write `frames` [N, R, C] (int16) as N single-frame CT files along the normal of `iop`.

    Slice k sits at origin + k * thickness * normal. Files are named by `order` (a permutation: file i holds
    slice order[i]), so the on-disk order can be shuffled. Returns (paths in slice order, series UID).
    """
    pytest.importorskip("pydicom", reason="pydicom (madclip[medical]) not installed")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    n = frames.shape[0]
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    normal = np.cross(np.array(iop[:3], float), np.array(iop[3:], float))
    order = list(range(n)) if order is None else list(order)
    paths: list[Path | None] = [None] * n
    for i, k in enumerate(order):
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"IM{i:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = (
            patient,
            "Test^Patient",
            "19700101",
            "O",
        )
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyID, ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "1", "20240101", "120000", "A1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", series_number, k + 1
        ds.Manufacturer = "test"
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * thickness * normal]
        ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
        ds.SliceThickness = thickness
        ds.Rows, ds.Columns = frames.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "HU"
        ds.WindowCenter, ds.WindowWidth = 800, 1600  # one intensity scale for every slice
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PixelData = np.ascontiguousarray(frames[k].astype("<i2")).tobytes()
        ds.save_as(str(path), enforce_file_format=True)
        paths[k] = path
    return [p for p in paths if p is not None], series_uid
