"""madclip-prepare (issue 15 item 4): labelled volumes -> MVFA layout, split by patient, deterministic."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from madclip_runtime.cli.prepare import main as prepare_main

from .conftest import realscans_or_skip

nib = pytest.importorskip("nibabel", reason="nibabel (madclip[medical]) not installed")


def _case(
    images: Path, labels: Path, name: str, lesion_slices: list[int], n: int = 16, seed: int = 0
) -> None:
    """A CT-like volume [32, 28, n] in HU: body ellipse (40 HU) in air, empty first/last slices, lesion 4x4."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(32), np.arange(28), indexing="ij")
    body = ((x - 16) / 13.0) ** 2 + ((y - 14) / 11.0) ** 2 <= 1.0  # [X, Y]
    vol = np.full((32, 28, n), -1000.0)
    lab = np.zeros((32, 28, n), np.uint8)
    for k in range(1, n - 1):  # slices 0 and n-1 are air only
        vol[:, :, k][body] = 40 + rng.normal(0, 5, body.sum())
    for k in lesion_slices:
        vol[12:18, 10:16, k] = 150
        lab[12:18, 10:16, k] = 2  # any label value > 0 is lesion
    if lesion_slices:  # a 1-voxel label edge on the next slice: below --min-lesion-voxels, but not "normal"
        lab[12, 10, max(lesion_slices) + 1] = 1
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(vol.astype(np.int16), affine), str(images / f"{name}_0000.nii.gz"))
    nib.save(nib.Nifti1Image(lab, affine), str(labels / f"{name}.nii.gz"))


@pytest.fixture()
def volumes(tmp_path):
    images, labels = tmp_path / "imagesTr", tmp_path / "labelsTr"
    for i, (name, lesions) in enumerate(
        [("p1_a", [6, 7, 8]), ("p1_b", [5]), ("p2_a", [9, 10]), ("p3_a", []), ("p4_a", [4, 5]), ("p5_a", [])]
    ):
        _case(images, labels, name, lesions, seed=i)
    return images, labels


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_prepare_splits_by_patient_and_picks_slices(volumes, tmp_path, capsys):
    images, labels = volumes
    out = tmp_path / "MyOrgan_AD"
    args = [
        "--images",
        images,
        "--labels",
        labels,
        "--out",
        out,
        "--window",
        "ct-abdomen",
        "--min-lesion-voxels",
        "20",
        "--normal-margin",
        "3",
        "--patient-regex",
        r"^(p\d+)_",
        "--valid-fraction",
        "0.4",
        "--seed",
        "3",
    ]
    assert prepare_main([str(a) for a in args]) == 0, capsys.readouterr().err
    man = json.loads((out / "manifest.json").read_text())
    sides: dict[str, set[str]] = {}
    for e in man["slices"]:
        sides.setdefault(e["patient"], set()).add(e["split"])
        assert (out / e["file"]).exists() and e["file"].startswith(f"{e['split']}/")
    assert all(len(s) == 1 for s in sides.values()), sides  # never one patient on both sides
    assert {e["case"] for e in man["slices"] if e["patient"] == "p1"} == {"p1_a", "p1_b"}
    assert set(man["splits"]["valid"]) and set(man["splits"]["test"])
    on_disk = {p.name.split("_z")[0][:2] for p in (out / "valid").rglob("*.png")} & {
        p.name.split("_z")[0][:2] for p in (out / "test").rglob("*.png")
    }
    assert not on_disk  # the files agree with the manifest

    by_case = {}
    for e in man["slices"]:
        by_case.setdefault(e["case"], []).append(e)
    lesions = {"p1_a": [6, 7, 8], "p1_b": [5], "p2_a": [9, 10], "p3_a": [], "p4_a": [4, 5], "p5_a": []}
    for case, es in by_case.items():
        abn = sorted(e["slice"] for e in es if e["label"] == 1)
        nor = sorted(e["slice"] for e in es if e["label"] == 0)
        assert abn == lesions[case]  # the 1-voxel edge slice is below --min-lesion-voxels
        touched = lesions[case] + ([max(lesions[case]) + 1] if lesions[case] else [])
        assert all(min((abs(k - t) for t in touched), default=99) >= 3 for k in nor)  # away from lesions
        assert 0 not in nor and 15 not in nor  # empty (air-only) slices are skipped
    assert any(e["label"] == 0 for e in by_case["p3_a"])  # lesion-free volumes give normal slices

    e = next(e for e in man["slices"] if e["label"] == 1)
    from PIL import Image

    img = np.asarray(Image.open(out / e["file"]))
    mask = np.asarray(Image.open(out / e["mask"]))
    assert img.dtype == np.uint8 and set(np.unique(mask)) == {0, 255} and (mask > 0).sum() == 36
    assert img[mask > 0].min() > img[mask == 0].max() - 1  # the lesion (150 HU) is the brightest in C40/W400
    assert e["source_image"].endswith(f"{e['case']}_0000.nii.gz") and e["window"] == [-160.0, 240.0]

    from madclip_train.data import load_split  # the training side reads the prepared set

    assert (
        len(load_split(str(out), "valid").samples)
        == man["counts"]["valid/good"] + man["counts"]["valid/Ungood"]
    )


def test_prepare_is_deterministic_and_16_bit(volumes, tmp_path):
    images, labels = volumes
    base = ["--images", str(images), "--labels", str(labels), "--seed", "5", "--window", "mr", "--bits", "16"]
    assert prepare_main(base + ["--out", str(tmp_path / "a")]) == 0
    assert prepare_main(base + ["--out", str(tmp_path / "b")]) == 0
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert {k: v for k, v in a.items() if k != "manifest.json"} == {
        k: v for k, v in b.items() if k != "manifest.json"
    }
    from PIL import Image

    some = next(p for p in (tmp_path / "a").rglob("img/*.png"))
    assert Image.open(some).mode.startswith("I")  # 16-bit


def test_prepare_bad_inputs(volumes, tmp_path, capsys):
    images, labels = volumes
    (labels / "p5_a.nii.gz").unlink()
    rc = prepare_main(["--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "p5_a" in err and err.count("\n") == 1 and not (tmp_path / "o").exists()
    rc = prepare_main(
        ["--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "o"), "--window", "bone"]
    )
    assert rc == 2 and "--window" in capsys.readouterr().err


def test_prepare_real_slices_roundtrip(tmp_path):
    """The real brain slices stacked into a volume with their masks: the abnormal slices come back out."""
    from PIL import Image

    root = realscans_or_skip("Brain_AD")
    imgs = sorted(root.rglob("img/brain1_z*.png"), key=lambda q: int(q.stem.split("_z")[1]))
    if len(imgs) < 5:
        pytest.skip("fewer than 5 brain1 slices")
    planes, masks = [], []
    for f in imgs:
        planes.append(np.asarray(Image.open(f).convert("L")))
        m = f.parent.parent / "anomaly_mask" / f.name
        masks.append(
            (np.asarray(Image.open(m).convert("L")) > 127) if m.exists() else np.zeros(planes[-1].shape, bool)
        )
    vol = np.stack([p[::-1, ::-1].T for p in planes], axis=2).astype(
        np.int16
    )  # so slice k shows plane k as stored
    lab = np.stack([m[::-1, ::-1].T for m in masks], axis=2).astype(np.uint8)
    (tmp_path / "im").mkdir()
    (tmp_path / "lb").mkdir()
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "im" / "brain1.nii.gz"))
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / "lb" / "brain1.nii.gz"))
    out = tmp_path / "Brain_AD"
    assert (
        prepare_main(
            [
                "--images",
                str(tmp_path / "im"),
                "--labels",
                str(tmp_path / "lb"),
                "--out",
                str(out),
                "--window",
                "127.5,256",
                "--max-per-volume",
                "50",
                "--min-lesion-voxels",
                "1",
                "--valid-fraction",
                "0.5",
            ]
        )
        == 0
    )
    man = json.loads((out / "manifest.json").read_text())
    expected = [k for k, m in enumerate(masks) if m.sum() >= 1]
    assert sorted(e["slice"] for e in man["slices"] if e["label"] == 1) == expected
    e = next(e for e in man["slices"] if e["label"] == 1)
    got = np.asarray(Image.open(out / e["file"])).astype(int)
    np.testing.assert_allclose(got, planes[e["slice"]].astype(int), atol=1)  # same pixels as the source slice
