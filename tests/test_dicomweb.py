"""madclip-infer --dicomweb (issue 24) against a real Orthanc with its DICOMweb plugin.

A study holding the real-scan CT series, a highdicom enhanced multi-frame series and a DICOM SEG (not an
image)
is uploaded to Orthanc; `madclip-infer --dicomweb URL --study UID --stow` retrieves it with WADO-RS, scores it
and stores SEG + SR with STOW-RS; the test reads them back from Orthanc and checks them against the local
`madclip-infer` run on the same files. Authentication: Orthanc with a registered user; the credentials come
from --dicomweb-auth-file or the environment and never appear in the output.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("dicomweb_client", reason="dicomweb-client (madclip[pacs]) not installed")
pydicom = pytest.importorskip("pydicom", reason="pydicom (madclip[medical]) not installed")
pytest.importorskip("highdicom", reason="highdicom (madclip[medical]) not installed")

from .orthanc import OrthancServer, enhanced_multiframe, realscan_series, set_patient  # noqa: E402
from .test_dicom_node import check_results, local_infer, results_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study(tmp_path_factory, standin):
    """(folder, brain paths, multi-frame path, study UID, local records, local SEG folder)."""
    d = tmp_path_factory.mktemp("study")
    brain, _ = realscan_series(d / "brain", "brain1")
    study_uid = str(pydicom.dcmread(brain[0]).StudyInstanceUID)
    lung, _ = realscan_series(d / "lung_sf", "lung1", every=4, study_uid=study_uid, series_number=2)
    (d / "mf").mkdir()
    mf = enhanced_multiframe(d / "mf" / "lung_mf.dcm", lung)
    set_patient(brain + [mf])
    recs = {
        "brain": local_infer(standin, d / "brain", d / "local"),
        "mf": local_infer(standin, mf, d / "local"),
    }
    return d, brain, mf, study_uid, recs, d / "local"


def study_args(orthanc: OrthancServer, study_uid: str, bundle: Path) -> list:
    """The options every run here starts with: Orthanc's DICOMweb root, the study, the bundle on ORT CPU."""
    return ["--dicomweb", orthanc.dicomweb, "--study", study_uid, "--bundle", bundle, "--backend", "ort-cpu"]


def infer(*args, env_extra=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("MADCLIP_DICOMWEB_AUTH", None)
    env.pop("MADCLIP_DICOMWEB_TOKEN", None)
    env.update(env_extra or {})
    r = subprocess.run(
        [sys.executable, "-m", "madclip_runtime.cli.infer", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    return r.returncode, r.stdout, r.stderr


def test_wado_score_and_stow_seg_sr_into_orthanc(standin, study, tmp_path):
    d, brain, mf, study_uid, recs, local = study
    orthanc = OrthancServer(tmp_path / "orthanc")
    try:
        orthanc.upload(brain + [mf, local / "brain_seg.dcm"])  # the SEG: a non-image series in the study
        rc, out, err = infer(
            *study_args(orthanc, study_uid, standin),
            "--stow",
            "--json",
            "--out",
            tmp_path / "out",
            "--dicom-seg",
        )
        assert rc == 0, err
        rows = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        assert len(rows) == 2 and "not an image series: skipped" in err and "stored with STOW-RS" in err
        local_seg_uid = str(pydicom.dcmread(local / "brain_seg.dcm").SOPInstanceUID)
        segs = [s for s in orthanc.instances_with_modality("SEG") if str(s.SOPInstanceUID) != local_seg_uid]
        srs = orthanc.instances_with_modality("SR")
        assert len(segs) == 2 and len(srs) == 2
        for sources, rec, seg_file in (
            (brain, recs["brain"], "brain_seg.dcm"),
            ([mf], recs["mf"], "lung_mf_seg.dcm"),
        ):
            srcs, uid, seg, sr = results_for(sources, segs, srs)
            assert str(sr.StudyInstanceUID) == study_uid
            check_results(seg, sr, rec, local / seg_file, srcs)
            (row,) = [r for r in rows if r["series_uid"] == uid]
            assert row["volume_score"] == pytest.approx(rec["volume_score"], abs=1e-6) and row["stored"] == [
                "SEG",
                "SR",
            ]
        written = sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix in (".json", ".dcm"))
        assert written == ["series1.json", "series1_seg.dcm", "series7.json", "series7_seg.dcm"]
        stored = {str(s.SOPInstanceUID) for s in segs}  # the files written with --out are the objects stored
        assert {
            str(pydicom.dcmread(tmp_path / "out" / f).SOPInstanceUID)
            for f in ("series1_seg.dcm", "series7_seg.dcm")
        } == stored

        # --series: only that one; without --stow nothing new is stored
        rc, out, err = infer(
            *study_args(orthanc, study_uid, standin),
            "--series",
            pydicom.dcmread(mf).SeriesInstanceUID,
            "--json",
        )
        assert rc == 0, err
        (row,) = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        assert row["n_slices"] == recs["mf"]["n_slices"] and "stored" not in row
        assert len(orthanc.instances_with_modality("SR")) == 2
    finally:
        orthanc.stop()


def test_auth_from_file_or_environment_never_printed(standin, study, tmp_path):
    d, brain, mf, study_uid, recs, local = study
    password = "s3cr3t-Pa55word-never-logged"
    orthanc = OrthancServer(tmp_path / "orthanc", users={"madclip": password})
    try:
        orthanc.upload(brain[:3])
        base = [*study_args(orthanc, study_uid, standin), "-v"]
        rc, out, err = infer(*base)
        assert rc == 2 and "HTTP 401" in err and "--dicomweb-auth-file" in err and "Traceback" not in err
        header = "Basic " + base64.b64encode(f"madclip:{password}".encode()).decode()
        rc, out, err = infer(*base, "--json", env_extra={"MADCLIP_DICOMWEB_AUTH": header})
        assert rc == 0, err
        assert password not in out + err and header.split()[1] not in out + err
        auth_file = tmp_path / "auth.txt"
        auth_file.write_text(header + "\n")
        rc, out, err = infer(*base, "--json", "--dicomweb-auth-file", auth_file)
        assert rc == 0, err
        assert len([x for x in out.splitlines() if x.startswith("{")]) == 1
        assert password not in out + err and header.split()[1] not in out + err
        rc, out, err = infer(
            *base, env_extra={"MADCLIP_DICOMWEB_AUTH": "Basic " + base64.b64encode(b"madclip:wrong").decode()}
        )
        assert rc == 2 and "HTTP 401" in err
    finally:
        orthanc.stop()


def test_dicomweb_option_errors_are_one_line(standin, tmp_path):
    for args, needle in (
        ([tmp_path, "--study", "1.2.3", "--bundle", standin], "--study needs --dicomweb URL"),
        (["--dicomweb", "http://127.0.0.1:9/dicom-web", "--bundle", standin], "needs --study"),
        (
            ["--dicomweb", "http://127.0.0.1:9/dicom-web", "--study", "1.2", "--bundle", standin],
            "DICOMweb request failed (ConnectionError)",
        ),
    ):
        rc, out, err = infer(*args)
        assert rc == 2 and needle in err and "Traceback" not in err, err
        assert len([x for x in err.splitlines() if x.strip()]) == 1, err


def test_a_broken_series_is_one_line_and_the_others_are_scored(standin, tmp_path):
    import numpy as np

    from .conftest import lesion_volume, write_dicom_series

    vol, _ = lesion_volume(shape=(24, 20, 4), lesion_slice=1)
    frames = np.transpose(vol, (2, 1, 0)).copy()
    good, good_uid = write_dicom_series(tmp_path / "good", frames, series_number=1)
    study_uid = str(pydicom.dcmread(good[0]).StudyInstanceUID)
    bad, bad_uid = write_dicom_series(tmp_path / "bad", frames, series_number=2, study_uid=study_uid)
    ds = pydicom.dcmread(bad[2])
    ds.ImagePositionPatient = pydicom.dcmread(bad[1]).ImagePositionPatient  # two slices at one position
    ds.save_as(bad[2], enforce_file_format=True)
    orthanc = OrthancServer(tmp_path / "orthanc")
    try:
        orthanc.upload(good + bad)
        rc, out, err = infer(*study_args(orthanc, study_uid, standin), "--json", "--stow")
        assert rc == 1 and "Traceback" not in err
        (row,) = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        assert row["series_uid"] == good_uid and row["stored"] == ["SEG", "SR"]
        errors = [x for x in err.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and bad_uid in errors[0] and "share the position" in errors[0]
        assert "/tmp" not in errors[0] and "madclip-dicomweb-" not in errors[0]  # no private temporary paths
    finally:
        orthanc.stop()
