"""Real scanners' geometry (issue 19): the map lines up with its scan in SimpleITK (ITK-SNAP, 3D Slicer) AND
nibabel, for regular, oblique, tilted (sheared), unevenly spaced and enhanced multi-frame stacks; the SEG
frames sit on and reference the right source frames.

The check is voxel by voxel and independent of madclip's own geometry code: positions of source pixels come
from the DICOM attributes read here with pydicom (IPP + r * PixelSpacing[0] * IOP[3:] + c * PixelSpacing[1]
* IOP[:3]); positions of map voxels from the written NIfTI as SimpleITK and nibabel read it. To check
resampled grids too, each slice's "map" is a linear function of the DICOM position of its pixels,
f(P) = P . g with |g| = 1 per mm: linear interpolation reproduces it exactly, so a voxel whose value differs
from f(its reader-given position) by less than 0.1 sits within 0.1 mm (along g) of where the data came from;
three orthogonal g give the full position.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from madclip_runtime.errors import InputError

from .conftest import write_dicom_series

nib = pytest.importorskip("nibabel", reason="nibabel (madclip[medical]) not installed")
pydicom = pytest.importorskip("pydicom", reason="pydicom (madclip[medical]) not installed")
sitk = pytest.importorskip("SimpleITK", reason="SimpleITK (madclip[dev]) not installed")

TOL_MM = 0.1
PYDICOM_DATA = Path(pydicom.__file__).parent / "data" / "test_files"
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
CT2 = PYDICOM_DATA / "dicomdirtests" / "77654033" / "CT2"  # a real CT series with a 202 mm gap


# ------------------------------------------------------------------------------------------ helpers


def dicom_frames(
    files: list[Path],
) -> list[tuple[str, int | None, np.ndarray, np.ndarray, np.ndarray, int, int]]:
    """(SOPInstanceUID, frame number or None, IPP, IOP, PixelSpacing, rows, cols) of every source frame,
    read straight from the files with pydicom (single-frame files, or the per-frame groups of one file)."""
    out = []
    for f in files:
        ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        n = int(ds.get("NumberOfFrames", 1) or 1)
        if n == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
            out.append(
                (
                    ds.SOPInstanceUID,
                    None,
                    np.array(ds.ImagePositionPatient, float),
                    np.array(ds.ImageOrientationPatient, float),
                    np.array(ds.PixelSpacing, float),
                    int(ds.Rows),
                    int(ds.Columns),
                )
            )
            continue
        shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
        for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):

            def get(seq, kw, item=item, shared=shared):
                for src in (item, shared):
                    if src is not None and seq in src and kw in src[seq][0]:
                        return src[seq][0][kw].value
                raise KeyError(kw)

            out.append(
                (
                    ds.SOPInstanceUID,
                    i + 1,
                    np.array(get("PlanePositionSequence", "ImagePositionPatient"), float),
                    np.array(get("PlaneOrientationSequence", "ImageOrientationPatient"), float),
                    np.array(get("PixelMeasuresSequence", "PixelSpacing"), float),
                    int(ds.Rows),
                    int(ds.Columns),
                )
            )
    return out


def pixel_positions(ipp, iop, spacing, rows, cols) -> np.ndarray:
    """[R, C, 3] LPS position of every pixel centre (PS3.3 C.7.6.2.1.1)."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return ipp + r[..., None] * spacing[0] * iop[3:] + c[..., None] * spacing[1] * iop[:3]


def reader_transforms(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{reader: (data [I, J, K], M [3, 3], origin [3])}: voxel (i, j, k) lies at M @ (i, j, k) + origin (LPS),
    as SimpleITK and nibabel read the file."""
    out = {}
    img = sitk.ReadImage(str(path))
    arr = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))  # sitk [K, J, I] -> [I, J, K]
    m = np.array(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    out["SimpleITK"] = (arr, m, np.array(img.GetOrigin()))
    for probe in ((0, 0, 0), tuple(s - 1 for s in arr.shape)):  # the matrix above is what ITK computes
        np.testing.assert_allclose(
            img.TransformIndexToPhysicalPoint([int(v) for v in probe]),
            m @ probe + np.array(img.GetOrigin()),
            atol=1e-4,
        )
    n = nib.load(str(path))
    flip = np.array([-1.0, -1.0, 1.0])  # RAS -> LPS
    out["nibabel"] = (
        np.asarray(n.dataobj, dtype=np.float32),
        flip[:, None] * n.affine[:3, :3],
        flip * n.affine[:3, 3],
    )
    q, s = n.header.get_qform(), n.header.get_sform()
    np.testing.assert_allclose(q, s, atol=1e-6)  # one geometry for every family of readers (float32 storage)
    return out


def plane_positions(m: np.ndarray, origin: np.ndarray, shape: tuple[int, ...], k: int) -> np.ndarray:
    """[I, J, 3] LPS positions of plane k's voxels."""
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    return i[..., None] * m[:, 0] + j[..., None] * m[:, 1] + k * m[:, 2] + origin


def reader_positions(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{reader: (data [I, J, K], LPS position [I, J, K, 3] of every voxel)} (small maps only)."""
    return {
        r: (data, np.stack([plane_positions(m, o, data.shape, k) for k in range(data.shape[2])], axis=2))
        for r, (data, m, o) in reader_transforms(path).items()
    }


GRADIENTS = (np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0]))


def write_linear_map(volume, out: Path, g: np.ndarray, seg: bool = False) -> dict:
    """Write `volume`'s outputs with per-slice maps f(P) = P . g (P: the DICOM position of each pixel, from
    the madclip-independent `dicom_frames`) through the real writer; -> the paths and the JSON."""
    from madclip_runtime.scans.volume_output import (
        VolumeScoreMethod,
        save_volume_outputs,
        summarize,
        volume_record,
    )

    frames = volume._test_frames
    planes = []
    for src in volume.frame_of_slice:
        _, _, ipp, iop, sp, r, c = frames[src]
        planes.append((pixel_positions(ipp, iop, sp, r, c) @ g + 1000.0).astype(np.float32))
    preds = [
        SimpleNamespace(
            anomaly_map=p,
            decision_score=float(p.max()),
            score=float(p.max()),
            score_map_max=None,
            label=None,
            source=f"s{k}",
        )
        for k, p in enumerate(planes)
    ]
    predictor = SimpleNamespace(score_name="score", backend_name="test", provider="numpy", precision="fp32")
    record = volume_record(
        volume, summarize(volume, preds, VolumeScoreMethod("max", 1), None, "score"), predictor
    )
    build = None
    if seg:
        from madclip_runtime.scans.dicom_seg import dicom_seg_bytes

        build = lambda pl: dicom_seg_bytes(volume, pl, 1000.0, "test", "madclip test")  # noqa: E731
    paths = save_volume_outputs(
        str(out), volume.name, volume, preds, record, (0.0, 2000.0), 1000.0, "test", build
    )
    return {"paths": paths, "json": json.loads(Path(paths["json"]).read_text())}


def read_volume(files: list[Path]):
    from madclip_runtime.scans.volume import plan_volumes

    (job,), flat, errors = plan_volumes([str(f) for f in files])
    assert not flat and not errors
    vol = job.read()
    vol._test_frames = dicom_frames(
        [Path(d.filename) for d in vol.datasets]
    )  # the source order of frame_of_slice
    return vol


def max_position_error(volume, tmp: Path, gradients=GRADIENTS, min_data: float = 0.3) -> dict[str, float]:
    """The largest |f(reader position) - map value| over every voxel with data, per reader (mm)."""
    worst: dict[str, float] = {}
    for i, g in enumerate(gradients):
        res = write_linear_map(volume, tmp / f"g{i}", g)
        for reader, (data, m, o) in reader_transforms(Path(res["paths"]["map"])).items():
            assert (data != 0).mean() >= min_data, "most of the map must hold data"
            for k in range(data.shape[2]):  # every voxel, one plane at a time (bounded memory)
                has = data[:, :, k] != 0
                if has.any():
                    err = np.abs(
                        data[:, :, k][has] - (plane_positions(m, o, data.shape, k)[has] @ g + 1000.0)
                    )
                    worst[reader] = max(worst.get(reader, 0.0), float(err.max()))
    return worst


def write_stack(
    folder: Path,
    positions: np.ndarray,
    iop=(1, 0, 0, 0, 1, 0),
    shape=(12, 10),
    spacing=(0.8, 0.7),
    tilt: float | None = None,
) -> list[Path]:
    """A CT series with slice k at `positions[k]` (LPS), written with the conftest writer then repositioned."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 1000, size=(len(positions),) + shape).astype(np.int16)
    paths, _ = write_dicom_series(folder, frames, spacing=spacing, iop=iop)
    for p, pos in zip(paths, positions):
        ds = pydicom.dcmread(str(p))
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        if tilt is not None:
            ds.GantryDetectorTilt = tilt
        ds.save_as(str(p))
    return paths


def _rot(ax: float, ay: float) -> np.ndarray:
    cx, sx, cy, sy = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay)
    return np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])


def _cases(tmp: Path) -> dict[str, list[Path]]:
    origin = np.array([-10.0, 20.0, -30.0])
    z = np.arange(6) * 2.5
    out = {"regular": write_stack(tmp / "regular", origin + np.outer(z, [0, 0, 1]))}
    rot = _rot(np.radians(20), np.radians(-12))
    row, col = rot @ [1, 0, 0], rot @ [0, 1, 0]
    normal = np.cross(row, col)
    out["oblique"] = write_stack(tmp / "oblique", origin + np.outer(z, normal), iop=(*row, *col))
    for deg in (15.0, 0.3):  # gantry tilt: each slice origin moves along the column direction (y) with z
        shift = np.tan(np.radians(deg)) * z
        out[f"tilt {deg:g} deg"] = write_stack(
            tmp / f"tilt{deg:g}", origin + np.outer(z, [0, 0, 1]) + np.outer(shift, [0, 1, 0]), tilt=deg
        )
    zu = np.array([0.0, 2.5, 5.0, 10.0, 11.25, 13.75])  # a missing slice and a half step
    out["uneven"] = write_stack(tmp / "uneven", origin + np.outer(zu, [0, 0, 1]))
    shift = np.tan(np.radians(10.0)) * zu
    out["tilted + uneven oblique"] = write_stack(
        tmp / "tu", origin + np.outer(zu, normal) + np.outer(shift, col), iop=(*row, *col)
    )
    return out


# ------------------------------------------------------------------------------------------ tests


def test_map_voxels_sit_on_their_dicom_pixels_in_both_readers(tmp_path):
    """Every case, both readers: the map's voxels are where the DICOM pixels they came from are (< 0.1 mm)."""
    report = {}
    for name, files in _cases(tmp_path / "in").items():
        vol = read_volume(files)
        worst = max_position_error(vol, tmp_path / "out" / name.replace(" ", "_"))
        report[name] = (vol.grid.resampled, worst)
        assert all(v < TOL_MM for v in worst.values()), (name, worst)
    assert {k for k, (resampled, _) in report.items() if resampled} == {
        "tilt 15 deg",
        "tilt 0.3 deg",
        "uneven",
        "tilted + uneven oblique",
    }
    print(
        "\nposition error (mm):", {k: {r: round(e, 5) for r, e in v.items()} for k, (_, v) in report.items()}
    )


def test_regular_stack_is_written_as_acquired_voxel_for_voxel(tmp_path):
    """A regular (oblique) stack: map voxel [r, c, k] is pixel (r, c) of slice k, at its DICOM position."""
    files = _cases(tmp_path / "in")["oblique"]
    vol = read_volume(files)
    res = write_linear_map(vol, tmp_path / "out", GRADIENTS[0])
    assert res["json"]["map_geometry"]["grid"] == "source"
    frames = vol._test_frames
    for reader, (data, pos) in reader_positions(Path(res["paths"]["map"])).items():
        assert data.shape == (12, 10, 6)
        for k, src in enumerate(vol.frame_of_slice):
            _, _, ipp, iop, sp, r, c = frames[src]
            np.testing.assert_allclose(
                pos[:, :, k], pixel_positions(ipp, iop, sp, r, c), atol=TOL_MM, err_msg=reader
            )


def test_tilt_is_resampled_and_said_in_the_json(tmp_path):
    vol = read_volume(_cases(tmp_path / "in")["tilt 15 deg"])
    res = write_linear_map(vol, tmp_path / "out", GRADIENTS[1])
    geo = res["json"]["map_geometry"]
    assert geo["grid"] == "resampled" and "gantry tilt" in geo["reason"] and "15.00 degrees" in geo["reason"]
    assert geo["qform_equals_sform"] is True and geo["voxels_without_data"] > 0
    assert any("gantry tilt" in w for w in res["json"]["warnings"])
    # ITK and nibabel see one grid: same direction, spacing and origin
    img, n = sitk.ReadImage(res["paths"]["map"]), nib.load(res["paths"]["map"])
    np.testing.assert_allclose(np.array(img.GetOrigin()) * [-1, -1, 1], n.affine[:3, 3], atol=1e-4)


def test_seg_frames_sit_on_and_reference_their_source_frames(tmp_path):
    """Tilted + uneven + oblique series, shuffled on disk: SEG frame i has the IPP of, and derives from, the
    source image it was computed on; the SEG reads back with highdicom."""
    hd = pytest.importorskip("highdicom")
    vol = read_volume(_cases(tmp_path / "in")["tilted + uneven oblique"])
    res = write_linear_map(vol, tmp_path / "out", GRADIENTS[2], seg=True)
    seg = pydicom.dcmread(res["paths"]["seg"])
    by_uid = {uid: (ipp, frame) for uid, frame, ipp, *_ in vol._test_frames}
    assert int(seg.NumberOfFrames) == len(by_uid)
    for item in seg.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(
            np.array(item.PlanePositionSequence[0].ImagePositionPatient, float), by_uid[ref][0], atol=1e-3
        )
    assert set(hd.seg.segread(res["paths"]["seg"]).get_source_image_uids()[0][:1])  # highdicom parses it


def test_enhanced_multiframe_philips_mprage(tmp_path):
    """nibabel's Philips Enhanced MR: map in both readers on the frames' DICOM positions; SEG (which failed
    with "no attribute 'PixelMeasuresSequence'") built, one frame per source frame, each referencing it."""
    src = tmp_path / "philips_mprage.dcm"
    src.write_bytes(
        gzip.decompress(
            (Path(nib.__file__).parent / "nicom" / "tests" / "data" / "philips_mprage.dcm.gz").read_bytes()
        )
    )
    vol = read_volume([src])
    assert vol.kind == "dicom-multiframe"
    worst = max_position_error(
        vol, tmp_path / "out", [np.array([0.48, 0.6, 0.64])]
    )  # one oblique g: 11M voxels
    assert all(v < TOL_MM for v in worst.values()), worst
    res = write_linear_map(vol, tmp_path / "seg", GRADIENTS[2], seg=True)
    seg = pydicom.dcmread(res["paths"]["seg"])
    assert int(seg.NumberOfFrames) == int(pydicom.dcmread(str(src), stop_before_pixels=True).NumberOfFrames)
    positions = {frame: ipp for _, frame, ipp, *_ in vol._test_frames}
    for item in seg.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        np.testing.assert_allclose(
            np.array(item.PlanePositionSequence[0].ImagePositionPatient, float),
            positions[
                int(
                    ref.ReferencedFrameNumber[0]
                    if isinstance(ref.ReferencedFrameNumber, pydicom.multival.MultiValue)
                    else ref.ReferencedFrameNumber
                )
            ],
            atol=1e-3,
        )


def test_pydicom_ct2_with_a_202_mm_gap(tmp_path):
    """pydicom's CT2 series: the map (resampled, no data in the gap) and the SEG put each slice at its true
    position in both readers (the old map put the middle slices 134 mm off)."""
    vol = read_volume(sorted(CT2.iterdir()))
    assert vol.grid.resampled and any("missing slices" in w for w in vol.warnings)
    worst = max_position_error(vol, tmp_path / "out", min_data=4 / 165)
    assert all(v < TOL_MM for v in worst.values()), worst
    doc = write_linear_map(vol, tmp_path / "json", GRADIENTS[2])["json"]["map_geometry"]
    assert doc["shape"] == [16, 16, 165] and doc["slice_spacing_mm"] == pytest.approx(1.25, abs=1e-3)
    assert doc["source_slices_in_map"] == 4 and doc["voxels_without_data"] == 161 * 16 * 16


@pytest.mark.parametrize("converter", ["dcm2niix", "dicom2nifti"])
def test_regular_grid_matches_the_converters(tmp_path, converter):
    """dcm2niix (Debian package) and dicom2nifti (pip) convert the oblique regular series: the same grid as the
    map (every corner voxel within 0.1 mm; a converter may flip or swap axes), read with SimpleITK."""
    files = _cases(tmp_path / "in")["oblique"]
    vol = read_volume(files)
    res = write_linear_map(vol, tmp_path / "out", GRADIENTS[0])
    ref_path = tmp_path / "ref.nii.gz"
    if converter == "dcm2niix":
        exe = shutil.which("dcm2niix")
        if exe is None:
            pytest.skip("dcm2niix not installed (apt-get install dcm2niix)")
        subprocess.run(
            [exe, "-z", "y", "-f", "ref", "-o", str(tmp_path), str(files[0].parent)],
            check=True,
            capture_output=True,
        )
    else:
        d2n = pytest.importorskip("dicom2nifti")
        d2n.dicom_series_to_nifti(str(files[0].parent), str(ref_path), reorient_nifti=False)
    ours, ref = sitk.ReadImage(res["paths"]["map"]), sitk.ReadImage(str(ref_path))
    assert sorted(ours.GetSize()) == sorted(ref.GetSize())

    def corners(img):
        size = img.GetSize()
        return np.array(
            [
                img.TransformIndexToPhysicalPoint([i, j, k])
                for i in (0, size[0] - 1)
                for j in (0, size[1] - 1)
                for k in (0, size[2] - 1)
            ]
        )

    mine, theirs = corners(ours), corners(ref)
    for p in theirs:
        assert np.abs(mine - p).max(axis=1).min() < TOL_MM, (converter, p)


# ------------------------------------------------------------------------------------------ refusals, NIfTI


@pytest.mark.parametrize(
    "name,words",
    [
        ("rtdose.dcm", "RT Dose Storage"),
        ("rtplan.dcm", "RT Plan Storage"),
        ("rtstruct.dcm", "RT Structure Set"),
        ("liver_1frame.dcm", "Segmentation Storage"),
        ("test-SR.dcm", "Comprehensive SR"),
    ],
)
def test_non_image_dicom_refused_naming_the_sop_class(name, words):
    from madclip_runtime.scans.medical import read_dicom

    with pytest.raises(InputError, match=words) as exc:
        read_dicom(str(PYDICOM_DATA / name))
    assert "\n" not in str(exc.value) and name in str(exc.value)


def test_cifti_and_bad_affines_refused_in_one_line(tmp_path):
    from nibabel.gifti import GiftiDataArray, GiftiImage

    from madclip_runtime.scans.imageio import read_scans
    from madclip_runtime.scans.medical import nifti_header

    surf = tmp_path / "lh.surf.gii"
    nib.save(
        GiftiImage(darrays=[GiftiDataArray(np.zeros((10, 3), np.float32), intent="NIFTI_INTENT_POINTSET")]),
        str(surf),
    )
    with pytest.raises(InputError, match="GIFTI surface file, not an image"):
        read_scans(str(surf))

    with pytest.raises(InputError, match="CIFTI-2"):
        nifti_header(str(NIBABEL_DATA / "row_major.dconn.nii"))
    for bad in (np.nan, 0.0):  # an sform of NaN, or all zero (nibabel will not write either: patch the bytes)
        raw = nib.Nifti1Image(np.ones((10, 10, 3), np.float32), np.eye(4)).to_bytes()
        hdr = nib.Nifti1Header(raw[:348])
        for row in ("srow_x", "srow_y", "srow_z"):
            hdr[row] = [bad] * 4
        p = tmp_path / "bad.nii"
        p.write_bytes(hdr.binaryblock + raw[348:])
        with pytest.raises(InputError, match="qform/sform"):
            nifti_header(str(p))


def save_map_of_ones(vol, out: Path) -> dict[str, str]:
    """Save `vol`'s outputs under `out` as if every slice scored 1 with a map of ones (a numpy stand-in
    predictor): the map's geometry and the JSON are then the volume writer's alone."""
    from madclip_runtime.scans.volume_output import (
        VolumeScoreMethod,
        save_volume_outputs,
        summarize,
        volume_record,
    )

    predictor = SimpleNamespace(score_name="score", backend_name="test", provider="numpy", precision="fp32")
    preds = [
        SimpleNamespace(
            anomaly_map=np.ones((s.height, s.width), np.float32),
            decision_score=1.0,
            score=1.0,
            score_map_max=1.0,
            label=None,
            source=s.source,
        )
        for s in vol.slices
    ]
    rec = volume_record(vol, summarize(vol, preds, VolumeScoreMethod("max", 1), None, "score"), predictor)
    return save_volume_outputs(str(out), vol.name, vol, preds, rec, (0.0, 4.0), None, None)


def test_nifti2_map_header_stays_valid_and_nan_background(tmp_path):
    """nibabel's NIfTI-2 example keeps a readable qform; nibabel's resampled_anat_moved.nii (NaN outside the
    field of view) is scored with NaN as background, masked (0) in the map, and counted in the JSON."""
    from madclip_runtime.scans.volume import read_nifti_as_volume

    for name, idx in (("example_nifti2.nii.gz", 0), ("resampled_anat_moved.nii", None)):
        vol = read_nifti_as_volume(str(NIBABEL_DATA / name), volume_index=idx)
        paths = save_map_of_ones(vol, tmp_path / name)
        out = nib.load(paths["map"])
        src = nib.load(str(NIBABEL_DATA / name))
        np.testing.assert_allclose(
            out.get_qform(), src.get_qform(), atol=1e-5
        )  # does not raise, same geometry
        np.testing.assert_allclose(out.affine, src.affine, atol=1e-5)
        doc = json.loads(Path(paths["json"]).read_text())
        if name.startswith("resampled"):
            nan = ~np.isfinite(np.asarray(src.dataobj))
            assert doc["nonfinite_voxels"] == int(nan.sum()) > 0
            assert doc["map_geometry"]["masked_voxels"] == int(nan.sum())
            data = np.asarray(out.dataobj)
            assert (data[nan] == 0).all() and (data[~nan] == 1).all()
            assert all(np.isfinite(s.pixels).all() for s in vol.slices)


# ------------------------------------------------------------------------------------------ the CLI, end to end


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from .conftest import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.mktemp("geo") / "b", size=64)


def _cli(capsys, *args) -> tuple[int, str, list[str]]:
    from madclip_runtime.cli.infer import main

    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, [line for line in cap.err.splitlines() if line.startswith("error:")]


def test_cli_tilted_series_map_and_seg_agree(bundle, tmp_path, capsys):
    """The real CLI on a 15 degree tilted series with --dicom-seg: the map is resampled (said in the JSON), both
    readers read one grid, and the SEG's frames lie on the source slices."""
    files = _cases(tmp_path / "in")["tilt 15 deg"]
    rc, out, errors = _cli(
        capsys,
        files[0].parent,
        "--bundle",
        bundle,
        "--out",
        tmp_path / "o",
        "--dicom-seg",
        "--json",
        "--map-threshold",
        "0.5",
    )
    assert rc == 0 and not errors, errors
    (rec,) = [json.loads(x) for x in out.splitlines()]
    doc = json.loads((tmp_path / "o" / f"{rec['outputs']['json']}").read_text())
    assert doc["map_geometry"]["grid"] == "resampled" and doc["seg_file"]
    assert [s["position_mm"] for s in doc["slices"]] == pytest.approx(
        list(np.arange(6) * 2.5 - 30.0), abs=1e-3
    )
    maps = reader_positions(tmp_path / "o" / doc["map_file"])
    np.testing.assert_allclose(maps["SimpleITK"][1], maps["nibabel"][1], atol=1e-4)
    seg = pydicom.dcmread(str(tmp_path / "o" / doc["seg_file"]))
    ipp = {uid: pos for uid, _, pos, *_ in dicom_frames(files)}
    for item in seg.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(
            np.array(item.PlanePositionSequence[0].ImagePositionPatient, float), ipp[ref], atol=1e-3
        )


def test_cli_dicom_seg_for_one_2d_dicom(bundle, tmp_path, capsys):
    """--dicom-seg on one 2-D DICOM (pydicom's CT_small.dcm) writes a one-frame SEG referencing it."""
    hd = pytest.importorskip("highdicom")
    src = tmp_path / "CT_small.dcm"
    shutil.copy(PYDICOM_DATA / "CT_small.dcm", src)
    rc, out, errors = _cli(
        capsys,
        src,
        "--bundle",
        bundle,
        "--out",
        tmp_path / "o",
        "--dicom-seg",
        "--map-threshold",
        "1.0",
        "--json",
    )
    assert rc == 0 and not errors, errors
    seg = hd.seg.segread(str(tmp_path / "o" / "CT_small_seg.dcm"))
    assert int(seg.NumberOfFrames) == 1
    uid = pydicom.dcmread(str(src), stop_before_pixels=True).SOPInstanceUID
    assert uid in [u[2] for u in seg.get_source_image_uids()]
    assert (tmp_path / "o" / "CT_small.json").is_file() and (
        tmp_path / "o" / "CT_small_overlay.png"
    ).is_file()


def test_cli_bad_inputs_are_error_rows_and_the_rest_is_scored(bundle, tmp_path, capsys):
    """A NaN-affine NIfTI, an all-zero-affine NIfTI, an RT Dose, a DICOM SEG, a CIFTI-2 file and a real
    scan with NaN background next to a good PNG: one error line per bad input, naming it; the rest scored."""
    from PIL import Image

    d = tmp_path / "in"
    d.mkdir()
    for name, value in (("nan_affine.nii", np.nan), ("zero_affine.nii", 0.0)):
        raw = nib.Nifti1Image(np.ones((10, 10, 3), np.float32), np.eye(4)).to_bytes()
        hdr = nib.Nifti1Header(raw[:348])
        for row in ("srow_x", "srow_y", "srow_z"):
            hdr[row] = [value] * 4
        (d / name).write_bytes(hdr.binaryblock + raw[348:])
    for name in ("rtdose.dcm", "liver_1frame.dcm"):
        shutil.copy(PYDICOM_DATA / name, d / name)
    shutil.copy(NIBABEL_DATA / "row_major.dconn.nii", d / "cifti.dconn.nii")
    shutil.copy(NIBABEL_DATA / "resampled_anat_moved.nii", d / "resampled_anat_moved.nii")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)).save(d / "good.png")
    rc, out, errors = _cli(capsys, d, "--bundle", bundle, "--out", tmp_path / "o", "--json")
    assert rc == 1
    assert len(errors) == 5, errors
    for name, words in (
        ("nan_affine.nii", "NaN"),
        ("zero_affine.nii", "singular"),
        ("rtdose.dcm", "RT Dose"),
        ("liver_1frame.dcm", "Segmentation"),
        ("cifti.dconn.nii", "CIFTI-2"),
    ):
        assert any(name in e and words in e for e in errors), (name, errors)
    assert not any("unexpected" in e or "Traceback" in e for e in errors)
    recs = [json.loads(x) for x in out.splitlines()]
    assert {Path(r["file"]).name for r in recs} == {"good.png", "resampled_anat_moved.nii"}
    vol = next(r for r in recs if r["file"].endswith("moved.nii"))
    assert vol["nonfinite_voxels"] > 0


def test_cli_failed_seg_leaves_no_file_of_that_volume(bundle, tmp_path, capsys, monkeypatch):
    """A SEG that cannot be built: that volume gets an error row and no file at all (no map, no montage, no
    JSON); the next volume is written completely."""
    import madclip_runtime.scans.dicom_seg as dicom_seg

    cases = _cases(tmp_path / "in")
    calls = []

    def failing(volume, *a, **k):
        calls.append(volume.source)
        if len(calls) == 1:
            raise InputError(f"{volume.source}: cannot build a DICOM SEG for this input (test)")
        return real(volume, *a, **k)

    real = dicom_seg.dicom_seg_bytes
    monkeypatch.setattr(dicom_seg, "dicom_seg_bytes", failing)
    out = tmp_path / "o"
    rc, _, errors = _cli(
        capsys,
        cases["regular"][0].parent,
        cases["oblique"][0].parent,
        "--bundle",
        bundle,
        "--out",
        out,
        "--dicom-seg",
        "--map-threshold",
        "0.5",
        "--json",
    )
    assert rc == 1 and len(errors) == 1 and "cannot build a DICOM SEG" in errors[0]
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == ["oblique.json", "oblique_map.nii.gz", "oblique_montage.png", "oblique_seg.dcm"], names
    assert not [p for p in out.iterdir() if p.name.startswith(".madclip-stage")]


def test_mixed_orientations_named_once(tmp_path, capsys, bundle):
    files = _cases(tmp_path / "in")["regular"]
    ds = pydicom.dcmread(str(files[2]))
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # a sagittal localizer inside the axial series
    ds.save_as(str(files[2]))
    rc, _, errors = _cli(capsys, files[0].parent, "--bundle", bundle, "--json")
    assert rc == 1 and len(errors) == 1
    assert ds.SeriesInstanceUID in errors[0] and "2 orientations" in errors[0] and "--series" not in errors[0]


def test_montage_is_readable_for_tiny_slices(bundle, tmp_path, capsys):
    """pydicom's 16 x 16 CT2 slices are enlarged by a whole factor to at least 240 px; the slices, not the
    legend, fill most of the picture; every slice's position is written on it (checked via the JSON)."""
    from PIL import Image

    rc, out, errors = _cli(capsys, CT2, "--bundle", bundle, "--out", tmp_path / "o", "--json")
    assert rc == 0 and not errors
    (rec,) = [json.loads(x) for x in out.splitlines()]
    img = Image.open(tmp_path / "o" / rec["outputs"]["montage"])
    rgb = np.asarray(img.convert("RGB"))
    assert img.width >= 3 * 240 and img.height >= 2 * 240
    assert (rgb[:240, :240] != (24, 24, 24)).any(axis=2).mean() > 0.9  # the first tile is the scan, not text
    assert [s["position_mm"] for s in rec["slices"]] == pytest.approx(
        [-99.48, 103.02, 104.27, 105.52], abs=1e-3
    )
    assert img.height - 2 * 240 < 0.4 * img.height  # captions and legend take less than 40 %


def test_nifti_input_with_sheared_sform_map_copies_both_transforms(tmp_path):
    """A NIfTI input whose sform holds a shear its qform cannot: the map copies both, so each reader places
    the map's voxels exactly where it places the scan's (SimpleITK by the qform, nibabel by the sform), and
    the JSON says the input's two transforms disagree."""
    from madclip_runtime.scans.volume import read_nifti_as_volume

    shear = np.array([[0.9, 0.0, 0.0, -20], [0.0, 0.9, 0.6, 15], [0.0, 0.0, 2.5, -40], [0, 0, 0, 1]])
    img = nib.Nifti1Image(np.random.default_rng(0).random((20, 18, 6)).astype(np.float32), None)
    img.set_qform(np.array([[0.9, 0, 0, -20], [0, 0.9, 0, 15], [0, 0, 2.5, -40], [0, 0, 0, 1]]), code=1)
    img.set_sform(shear, code=1)
    src = tmp_path / "sheared.nii.gz"
    nib.save(img, str(src))
    vol = read_nifti_as_volume(str(src))
    paths = save_map_of_ones(vol, tmp_path / "o")
    doc = json.loads(Path(paths["json"]).read_text())
    assert doc["map_geometry"]["qform_equals_sform"] is False
    assert doc["map_geometry"]["qform_sform_max_difference_mm"] > 1.0
    for reader in ("SimpleITK", "nibabel"):
        a, b = reader_positions_any(src)[reader], reader_positions_any(Path(paths["map"]))[reader]
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=reader)


def reader_positions_any(path: Path) -> dict[str, np.ndarray]:
    """LPS position of every voxel per reader, without requiring qform == sform."""
    img = sitk.ReadImage(str(path))
    size = img.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij"), axis=-1).astype(float)
    m = np.array(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    n = nib.load(str(path))
    return {
        "SimpleITK": idx @ m.T + np.array(img.GetOrigin()),
        "nibabel": (idx @ n.affine[:3, :3].T + n.affine[:3, 3]) * [-1, -1, 1],
    }
