"""Shared fixtures: the tiny random CLIP (`madclip-tiny`) and paths to the shared real scans."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# ../shared beside the repository; MADCLIP_REALSCANS points elsewhere (e.g. from a git worktree).
REALSCANS = Path(os.environ.get("MADCLIP_REALSCANS")
                 or Path(__file__).resolve().parents[2] / "shared" / "data" / "realscans")


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
