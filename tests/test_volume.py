"""Volumes in, volumes out (issue 15): reading, ordering, geometry, per-volume outputs, DICOM SEG, voxel budget.

Geometry is checked with a "brightness model": a backend whose anomaly map is the preprocessed image's
brightness, so a bright planted lesion must come back as the top slice and as the hot voxels of the output
map, at the lesion's own voxel indices on the input grid (any orientation/ordering mistake moves it).
The CLI tests run the real exported madclip-tiny bundle.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from madclip_runtime.cli.infer import main as infer_main
from madclip_runtime.errors import InputError

from .conftest import build_tiny_bundle, lesion_volume, realscans_or_skip, write_dicom_series

nib = pytest.importorskip("nibabel", reason="nibabel (madclip[medical]) not installed")
pydicom = pytest.importorskip("pydicom", reason="pydicom (madclip[medical]) not installed")


class BrightnessBackend:
    """A stand-in model: anomaly map = 4 x mean channel of the preprocessed input; scores = its max."""

    name, provider, precision, max_batch, load_seconds = "brightness", "numpy", "fp32", 3, 0.0

    def __init__(self) -> None:
        self.batches: list[int] = []

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:  # batch [B, 3, S, S]
        self.batches.append(batch.shape[0])
        amap = 4.0 * batch.mean(axis=1, keepdims=True).astype(np.float32)  # [B, 1, S, S]
        top = amap.reshape(len(batch), -1).max(axis=1)
        return {"score": top, "anomaly_map": amap, "score_map_max": top}

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """The conftest stand-in ONNX bundle (map = 4 sigmoid(brightness - 0.5), map threshold 2.2), 64 px input."""
    return build_tiny_bundle(tmp_path_factory.mktemp("standin") / "b", size=64)


@pytest.fixture()
def brightness(standin):
    from madclip_runtime.bundles.bundle import load_bundle
    from madclip_runtime.predictor import Predictor

    backend = BrightnessBackend()
    return Predictor(load_bundle(standin), backend), backend


def _write_nifti(path: Path, vol: np.ndarray, affine: np.ndarray) -> Path:
    """NIfTI with a display window cal_min/cal_max = [0, 1600] (one intensity scale for every slice)."""
    img = nib.Nifti1Image(vol, affine)
    img.header["cal_min"], img.header["cal_max"] = 0, 1600
    nib.save(img, str(path))
    return path


def _run(capsys, *args) -> tuple[int, str, str]:
    rc = infer_main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ------------------------------------------------------------------------------------------ NIfTI geometry


@pytest.mark.parametrize(
    "affine",
    [
        np.diag([0.9, 0.8, 2.5, 1.0]),
        # stored as (S->I, R->L, P->A) axes: permuted and flipped storage, oblique-free
        np.array([[0, -0.8, 0, 10], [0, 0, 0.9, -5], [-2.5, 0, 0, 40], [0, 0, 0, 1]], float),
    ],
    ids=["ras", "permuted-flipped"],
)
def test_nifti_map_has_input_geometry_and_lesion_voxels(brightness, tmp_path, affine):
    from madclip_runtime.scans.volume import read_nifti_as_volume
    from madclip_runtime.scans.volume_output import (
        parse_volume_score,
        save_volume_outputs,
        score_volume,
        summarize,
        volume_record,
    )

    predictor, backend = brightness
    vol, mask = lesion_volume(lesion_slice=4)  # [X, Y, Z], lesion in z = 4
    if affine[0, 0] == 0:  # store the same anatomy on the permuted grid: storage axes (z, x, y)
        vol, mask = np.transpose(vol, (2, 0, 1))[::-1].copy(), np.transpose(mask, (2, 0, 1))[::-1].copy()
    p = _write_nifti(tmp_path / "case01.nii.gz", vol, affine)
    volume = read_nifti_as_volume(str(p))
    progress: list[int] = []
    preds = score_volume(predictor, volume, progress.append)
    assert backend.batches == [3, 3, 1] and progress == [3, 3, 1]  # batches of the max batch
    summary = summarize(volume, preds, parse_volume_score("max"), predictor.threshold, predictor.score_name)
    paths = save_volume_outputs(
        str(tmp_path / "out"),
        "case01",
        volume,
        preds,
        volume_record(volume, summary, predictor),
        predictor.bundle.map_scale,
        1.0,
        "test",
    )
    out = nib.load(paths["map"])
    assert out.shape == vol.shape and out.get_data_dtype() == np.float32
    np.testing.assert_allclose(out.affine, affine, atol=1e-6)
    amap = np.asarray(out.dataobj)
    assert mask[np.unravel_index(np.argmax(amap), amap.shape)]  # the hottest voxel is a lesion voxel
    assert amap[mask.astype(bool)].mean() > 3 * amap[~mask.astype(bool)].mean()
    lesion_ras = 4 if affine[0, 0] != 0 else None
    if lesion_ras is not None:
        assert summary["top_slices"][0] == lesion_ras
    assert summary["volume_score"] == pytest.approx(max(p.score for p in preds))
    doc = json.loads(Path(paths["json"]).read_text())
    assert doc["map_file"] == "case01_map.nii.gz" and len(doc["slices"]) == volume.n_slices


# ------------------------------------------------------------------------------------------ DICOM series


def _frames_from(vol: np.ndarray) -> np.ndarray:
    return np.transpose(vol, (2, 1, 0)).copy()  # [X, Y, Z] -> [N, R(=Y), C(=X)]


@pytest.mark.filterwarnings("ignore:The DICOM readers are highly experimental")
def test_dicom_series_shuffled_on_disk_is_ordered_and_mapped(brightness, tmp_path):
    from nibabel.nicom.dicomwrappers import wrapper_from_data

    from madclip_runtime.scans.volume import LPS_TO_RAS, plan_volumes
    from madclip_runtime.scans.volume_output import parse_volume_score, score_volume, summarize

    predictor, _ = brightness
    vol, mask = lesion_volume(lesion_slice=2)
    frames, fmask = _frames_from(vol), _frames_from(mask)  # [N, R, C]
    c, s = np.cos(0.3), np.sin(0.3)
    iop = (c, s, 0.0, -s, c, 0.0)  # rotated in-plane: row/column cosines both oblique to x/y
    shuffle = [5, 2, 0, 6, 3, 1, 4]
    paths, uid = write_dicom_series(tmp_path / "CT_series", frames, iop=iop, order=shuffle)
    files = sorted(str(p) for p in (tmp_path / "CT_series").iterdir())
    jobs, flat, errors = plan_volumes(files)
    assert len(jobs) == 1 and not flat and not errors
    volume = jobs[0].read()
    assert volume.kind == "dicom-series" and volume.series_uid == uid and volume.shape == (20, 24, 7)
    assert [volume.slices[k].source.split("#")[0] for k in range(7)] == [str(p) for p in paths]

    # the affine is nibabel's DICOM affine (LPS) turned into RAS, with the slice step between positions
    first = pydicom.dcmread(paths[0])
    ref = LPS_TO_RAS @ wrapper_from_data(first).affine
    np.testing.assert_allclose(volume.affine[:, [0, 1, 3]], ref[:, [0, 1, 3]], atol=1e-6)
    np.testing.assert_allclose(volume.affine[:3, 2], [0, 0, 2.5], atol=1e-6)
    r, col, k = 5, 7, 3  # any voxel: affine @ index == the DICOM position of that pixel, in RAS
    lps = (
        np.array(pydicom.dcmread(paths[k]).ImagePositionPatient)
        + r * 0.8 * np.array(iop[3:])
        + col * 0.7 * np.array(iop[:3])
    )
    np.testing.assert_allclose(volume.affine @ [r, col, k, 1], np.r_[lps * [-1, -1, 1], 1], atol=1e-6)

    preds = score_volume(predictor, volume)
    summary = summarize(volume, preds, parse_volume_score("max"), predictor.threshold, predictor.score_name)
    assert summary["top_slices"][0] == 2
    amap = volume.map_array([p.anomaly_map for p in preds])  # [R, C, N]
    assert np.transpose(fmask, (1, 2, 0))[np.unravel_index(np.argmax(amap), amap.shape)]


def test_enhanced_multiframe_ordered_by_per_frame_positions(brightness, tmp_path):
    """An enhanced multi-frame file whose frames are stored out of order: per-frame positions order them."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from madclip_runtime.scans.volume import plan_volumes
    from madclip_runtime.scans.volume_output import parse_volume_score, score_volume, summarize

    predictor, _ = brightness
    vol, mask = lesion_volume(lesion_slice=5)
    frames = _frames_from(vol)  # [7, R, C] in slice order
    stored_order = [3, 5, 0, 6, 1, 4, 2]  # file frame i holds slice stored_order[i]
    paths, _ = write_dicom_series(tmp_path / "one", frames[:1])
    ds = pydicom.dcmread(paths[0])
    ds.NumberOfFrames = 7
    ds.PixelData = np.ascontiguousarray(frames[stored_order].astype("<i2")).tobytes()
    shared, per_frame = Dataset(), []
    ori, pix = Dataset(), Dataset()
    ori.ImageOrientationPatient, pix.PixelSpacing, pix.SliceThickness = [1, 0, 0, 0, 1, 0], [0.8, 0.7], 2.5
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = Sequence([ori]), Sequence([pix])
    for k in stored_order:
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [-10.0, 20.0, -30.0 + 2.5 * k]
        item.PlanePositionSequence = Sequence([pos])
        per_frame.append(item)
    ds.SharedFunctionalGroupsSequence, ds.PerFrameFunctionalGroupsSequence = (
        Sequence([shared]),
        Sequence(per_frame),
    )
    del ds.ImagePositionPatient
    ds.save_as(str(tmp_path / "mf.dcm"))
    (job,), flat, _ = plan_volumes([str(tmp_path / "mf.dcm")])
    volume = job.read()
    assert volume.kind == "dicom-multiframe" and volume.frame_of_slice == [
        stored_order.index(k) for k in range(7)
    ]
    np.testing.assert_allclose(volume.affine[:3, 3], [10.0, -20.0, -30.0])  # LPS (-10, 20, -30) in RAS
    np.testing.assert_allclose(volume.affine[:3, 2], [0, 0, 2.5])
    preds = score_volume(predictor, volume)
    assert summarize(volume, preds, parse_volume_score("max"), None, "score")["top_slices"][0] == 5


def test_two_series_in_one_folder_are_kept_apart(standin, tmp_path, capsys):
    from madclip_runtime.scans.volume import plan_volumes

    vol, _ = lesion_volume(shape=(16, 16, 3))
    study = pydicom.uid.generate_uid()
    _, uid1 = write_dicom_series(tmp_path / "mixed", _frames_from(vol), series_number=1, study_uid=study)
    for i, p in enumerate(sorted((tmp_path / "mixed").iterdir())):
        p.rename(tmp_path / "mixed" / f"A{i}.dcm")
    _, uid2 = write_dicom_series(
        tmp_path / "mixed", _frames_from(vol)[:2], series_number=2, study_uid=study, thickness=5.0
    )
    files = sorted(str(p) for p in (tmp_path / "mixed").iterdir())
    jobs, flat, errors = plan_volumes(files)
    assert sorted((j.series.uid, len(j.series.files)) for j in jobs) == sorted([(uid1, 3), (uid2, 2)])
    assert {j.name for j in jobs} == {"mixed_series1", "mixed_series2"}

    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, tmp_path / "mixed", "--bundle", standin, "--out", out, "--json")
    assert rc == 0, err
    records = [json.loads(line) for line in stdout.splitlines()]
    assert sorted((r["series_uid"], r["n_slices"]) for r in records) == sorted([(uid1, 3), (uid2, 2)])
    assert {"mixed_series1.json", "mixed_series2.json"} <= {p.name for p in out.iterdir()}

    rc, stdout, err = _run(capsys, tmp_path / "mixed", "--bundle", standin, "--series", uid2, "--json")
    assert rc == 0 and [json.loads(x)["series_uid"] for x in stdout.splitlines()] == [uid2]
    rc, stdout, err = _run(capsys, tmp_path / "mixed", "--bundle", standin, "--series", "1.2.3")
    assert rc == 2 and "no such series" in err and uid1 in err


def test_series_checks_duplicates_gaps_uneven(tmp_path, caplog):
    from madclip_runtime.scans.volume import plan_volumes

    vol, _ = lesion_volume(shape=(16, 16, 5))
    frames = _frames_from(vol)
    paths, _ = write_dicom_series(tmp_path / "dup", frames)
    ds = pydicom.dcmread(paths[3])
    ds.ImagePositionPatient = pydicom.dcmread(paths[2]).ImagePositionPatient
    ds.save_as(str(paths[3]))
    (job,), _, _ = plan_volumes([str(p) for p in paths])
    with pytest.raises(InputError, match="share the position"):
        job.read()

    paths, _ = write_dicom_series(tmp_path / "gap", frames)
    paths[2].unlink()  # a missing slice
    (job,), _, _ = plan_volumes([str(p) for p in paths if p.exists()])
    assert any("missing slices" in w for w in job.read().warnings)

    paths, _ = write_dicom_series(tmp_path / "uneven", frames)
    ds = pydicom.dcmread(paths[4])
    ds.ImagePositionPatient = [
        ds.ImagePositionPatient[0],
        ds.ImagePositionPatient[1],
        ds.ImagePositionPatient[2] - 0.6,
    ]
    ds.save_as(str(paths[4]))
    (job,), _, _ = plan_volumes([str(p) for p in paths])
    assert any("uneven slice spacing" in w for w in job.read().warnings)


# ------------------------------------------------------------------------------------------ CLI end to end


def test_cli_nifti_volume_outputs(standin, tmp_path, capsys):
    vol, _ = lesion_volume()
    affine = np.array([[0.9, 0.1, 0, -20], [-0.1, 0.9, 0, 15], [0, 0, 2.5, -40], [0, 0, 0, 1]])
    p = _write_nifti(tmp_path / "case01.nii.gz", vol, affine)
    out = tmp_path / "results"
    rc, stdout, err = _run(capsys, p, "--bundle", standin, "--out", out, "--json")
    assert rc == 0, err
    (rec,) = [json.loads(x) for x in stdout.splitlines()]
    assert sorted(x.name for x in out.iterdir() if not x.name.startswith(".")) == [
        "case01.json",
        "case01_map.nii.gz",
        "case01_montage.png",
    ]
    m = nib.load(out / "case01_map.nii.gz")
    assert m.shape == vol.shape and np.allclose(m.affine, affine) and m.get_data_dtype() == np.float32
    assert rec["n_slices"] == 7 and len(rec["slices"]) == 7 and rec["volume_score_method"] == "max"
    scores = [s["score"] for s in rec["slices"]]
    assert rec["volume_score"] == pytest.approx(max(scores)) and rec["top_slices"][0] == int(
        np.argmax(scores)
    )
    assert rec["top_slices"][0] == 4  # the planted lesion's slice
    doc = json.loads((out / "case01.json").read_text())
    assert (
        doc["map_threshold_method"].startswith("bundle calibration")
        and doc["montage_file"] == "case01_montage.png"
    )

    rc, stdout, err = _run(capsys, p, "--bundle", standin, "--volume-score", "mean-top-2", "--json")
    (rec2,) = [json.loads(x) for x in stdout.splitlines()]
    assert rc == 0 and rec2["volume_score"] == pytest.approx(np.mean(sorted(scores)[-2:]), rel=1e-5)
    rc, _, err = _run(capsys, p, "--bundle", standin, "--volume-score", "median")
    assert rc == 2 and err.count("\n") == 1 and "--volume-score" in err

    four = _write_nifti(tmp_path / "dyn.nii.gz", np.stack([vol, vol], axis=3), affine)
    rc, _, err = _run(capsys, four, "--bundle", standin, "--out", out)
    assert rc == 2 and "--volume-index" in err and str(four) in err
    rc, _, err = _run(capsys, four, "--bundle", standin, "--out", out, "--volume-index", "1")
    assert rc == 0, err
    assert nib.load(out / "dyn_map.nii.gz").shape == vol.shape


def test_cli_dicom_seg_reads_back(standin, tmp_path, capsys):
    hd = pytest.importorskip("highdicom", reason="highdicom (madclip[medical]) not installed")
    vol, _ = lesion_volume(shape=(24, 20, 5), lesion_slice=1)
    paths, uid = write_dicom_series(tmp_path / "ct", _frames_from(vol), order=[3, 1, 4, 0, 2])
    out = tmp_path / "out"
    rc, stdout, err = _run(
        capsys,
        tmp_path / "ct",
        "--bundle",
        standin,
        "--out",
        out,
        "--dicom-seg",
        "--map-threshold",
        "2.1",
        "--json",
    )
    assert rc == 0, err
    (rec,) = [json.loads(x) for x in stdout.splitlines()]
    seg = hd.seg.segread(out / "ct_seg.dcm")
    assert seg.Modality == "SEG" and int(seg.NumberOfFrames) == 5
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    refs = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == {str(pydicom.dcmread(p).SOPInstanceUID) for p in paths}
    params = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert "--map-threshold" in seg.ContentDescription or "--map-threshold" in str(params)
    amap = np.asarray(nib.load(out / "ct_map.nii.gz").dataobj)  # [R, C, N], N in slice order
    assert 0 < (amap >= 2.1).sum() < amap.size  # the stand-in's bright lesion, not everything
    for k, p in enumerate(paths):  # the SEG's frame for each source image is that slice's map >= 2.1
        sop = str(pydicom.dcmread(p).SOPInstanceUID)
        frame = seg.get_pixels_by_source_instance([sop], segment_numbers=[1])[0, :, :, 0]
        np.testing.assert_array_equal(frame, (amap[:, :, k] >= 2.1).astype(frame.dtype))
    assert rec["seg_file"] if "seg_file" in rec else rec["outputs"]["seg"] == "ct_seg.dcm"

    nii = _write_nifti(tmp_path / "v.nii.gz", vol, np.eye(4))
    rc, _, err = _run(capsys, nii, "--bundle", standin, "--out", out, "--dicom-seg", "--map-threshold", "1")
    assert rc == 0 and "not DICOM" in err and not (out / "v_seg.dcm").exists()


# ------------------------------------------------------------------------------------------ voxel budget


def _huge_gzip_nifti(path: Path, shape=(4000, 4000, 100)) -> None:
    """A gzip NIfTI of `shape` uint8 zeros (1.6 G voxels) written in chunks: small on disk, nothing allocated."""
    import gzip

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.uint8)
    hdr.set_sform(np.eye(4), code=1)
    hdr["vox_offset"] = 352
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(hdr.binaryblock)
        f.write(b"\0" * (352 - len(hdr.binaryblock)))
        chunk = b"\0" * (shape[0] * shape[1])
        for _ in range(shape[2]):
            f.write(chunk)


def test_huge_nifti_refused_before_decoding_and_one_slice_decodes_alone(tmp_path):
    p = tmp_path / "huge.nii.gz"
    _huge_gzip_nifti(p)
    assert p.stat().st_size < 10_000_000
    code = textwrap.dedent(f"""
        import sys, tracemalloc
        from madclip_runtime.errors import InputError
        from madclip_runtime.scans.imageio import read_scans
        from madclip_runtime.scans.medical import read_nifti
        mode = sys.argv[1]
        tracemalloc.start()  # numpy's buffers are traced too
        if mode == "all":
            try:
                read_scans({str(p)!r})
                print("decoded")
            except InputError as exc:
                print("refused:", exc)
        else:
            (s,) = read_nifti({str(p)!r}, slice_index=0)
            print("slice", s.pixels.shape)
        print("peak_kb", tracemalloc.get_traced_memory()[1] // 1024)
    """)
    peaks = {}
    for mode in ("all", "slice"):
        res = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.strip().splitlines()
        peaks[mode] = int(lines[-1].split()[1]) * 1024
        if mode == "all":
            assert lines[0].startswith("refused:") and "budget" in lines[0] and "--max-voxels" in lines[0]
        else:
            assert lines[0] == "slice (4000, 4000)"
    assert peaks["all"] < 50e6  # refused from the header: no volume-sized allocation (1.6 GB of voxels)
    assert peaks["slice"] < 400e6  # one 16 M-voxel plane and its float copies, not the 1.6 G-voxel volume


def test_budget_option_env_and_dicom_header(tmp_path, capsys, monkeypatch, standin):
    from madclip_runtime.scans.medical import read_dicom

    vol, _ = lesion_volume(shape=(24, 20, 7))
    p = _write_nifti(tmp_path / "v.nii.gz", vol, np.eye(4))
    rc, _, err = _run(capsys, p, "--bundle", standin, "--max-voxels", "1000")
    assert rc == 1 and "over the budget of 1000" in err and str(p) in err
    monkeypatch.setenv("MADCLIP_MAX_VOXELS", "1000")
    rc, _, err = _run(capsys, p, "--bundle", standin, "--slice", "3", "--json")
    assert rc == 0, err  # one 480-voxel slice fits the budget
    monkeypatch.delenv("MADCLIP_MAX_VOXELS")

    # a multi-frame header claiming 4000 x 4000 x 100 with a few bytes of pixel data: refused from the header
    paths, _ = write_dicom_series(tmp_path / "mf", _frames_from(vol)[:1])
    ds = pydicom.dcmread(paths[0])
    ds.Rows, ds.Columns, ds.NumberOfFrames = 4000, 4000, 100
    ds.save_as(str(paths[0]))
    with pytest.raises(InputError, match="over the budget"):
        read_dicom(paths[0])


# ------------------------------------------------------------------------------------------ real data


def test_real_slices_stacked_into_a_volume(exported_tiny_bundle, tmp_path, capsys):
    from PIL import Image

    root = realscans_or_skip("Brain_AD")
    files = sorted(root.rglob("img/brain1_z*.png"), key=lambda q: int(q.stem.split("_z")[1]))
    if len(files) < 5:
        pytest.skip("fewer than 5 brain1 slices in the real scans")
    planes = [np.asarray(Image.open(f).convert("L")) for f in files]  # each [H, W]
    vol = np.stack(
        [pl[::-1, ::-1].T for pl in planes], axis=2
    )  # [X, Y, Z] so slice k shows plane k as stored
    p = tmp_path / "brain1.nii.gz"
    nib.save(
        nib.Nifti1Image(vol.astype(np.uint8), np.diag([1.0, 1.0, 3.0, 1.0])), str(p)
    )  # no display window
    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, p, "--bundle", exported_tiny_bundle, "--out", out, "--json")
    assert rc == 0, err
    (rec,) = [json.loads(x) for x in stdout.splitlines()]
    assert rec["n_slices"] == len(files) and rec["shape"] == list(vol.shape)
    m = nib.load(out / "brain1_map.nii.gz")
    assert m.shape == vol.shape and np.isfinite(np.asarray(m.dataobj)).all()
    # each volume slice is scored exactly like the 2-D file it came from
    rc, stdout, err = _run(capsys, files[0], "--bundle", exported_tiny_bundle, "--json")
    (flat,) = [json.loads(x) for x in stdout.splitlines()]
    assert rec["slices"][0]["score"] == pytest.approx(flat["score"], abs=1e-5)
