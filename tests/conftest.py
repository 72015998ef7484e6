"""Shared fixtures: the tiny random CLIP (`madclip-tiny`) and paths to the shared real scans."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# ../shared beside the repository; MADCLIP_REALSCANS overrides it (e.g. from a git worktree elsewhere).
REALSCANS = Path(os.environ.get("MADCLIP_REALSCANS") or Path(__file__).resolve().parents[2] / "shared" / "data" / "realscans")


def realscans_or_skip(name: str = "") -> Path:
    path = REALSCANS / name if name else REALSCANS
    if not path.exists():
        pytest.skip(f"real scans not available at {path} (CI and the dev machine have ../shared beside the repo)")
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
    train_run(TrainRequest(data=str(root), out=str(out), shots=2, epochs=2, backbone="madclip-tiny",
                           pretrained="none", device="cpu"))
    return out


@pytest.fixture(scope="session")
def exported_tiny_bundle(trained_tiny_run, tmp_path_factory):
    """The trained tiny run exported with FP16, INT8 and Triton (max batch 4). Returns the bundle directory."""
    from madclip_export.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("tiny_bundle") / "b"
    export_bundle(ExportOptions(run=str(trained_tiny_run), out=str(out), fp16=True, int8=True, triton=True,
                                max_batch=4))
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


def write_dicom_series(folder: Path, frames: np.ndarray, *, spacing=(0.8, 0.7), thickness=2.5,
                       origin=(-10.0, 20.0, -30.0), iop=(1, 0, 0, 0, 1, 0), series_uid=None, study_uid=None,
                       series_number=1, order=None, patient="P1") -> tuple[list[Path], str]:
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
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient, "Test^Patient", "19700101", "O"
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
