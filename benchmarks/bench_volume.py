"""Volume benchmark: bounded decoding, per-volume scoring and madclip-prepare, each as its own process.

1. A 7 MB gzip NIfTI whose header says 4000 x 4000 x 100 (1.6 G voxels of zeros): `madclip-infer` on it
   (refused from the header by the voxel budget) and with `--slice 0` (one 16 M-voxel plane decoded):
   wall time and the process's own peak RSS. Before the budget, the whole volume was decoded (3.2 GB).
2. A synthetic 256 x 256 x N CT volume as NIfTI and as a DICOM series: `madclip-infer --out` (map NIfTI,
   montage, JSON; for DICOM also `--dicom-seg`): wall time, time per slice, peak RSS.
3. The same CT as a DICOM series acquired with a 15 degree gantry tilt (a sheared stack): the map is resampled
   onto a regular grid (issue 19), with `--dicom-seg`.
4. `madclip-prepare` on V labelled volumes of 256 x 256 x N.

Memory (issue 19): each process's peak RSS minus that of a process that only imports the runtime (its
libraries, onnxruntime, nibabel, pydicom, highdicom), divided by one volume's float32 size: the working memory
as a multiple of the volume (the tracemalloc measure is in tests/test_volume_memory.py).

    python benchmarks/bench_volume.py                       # builds/reuses the madclip-tiny bundle
    python benchmarks/bench_volume.py --bundle B --slices 64

Writes benchmarks/results/volume.json and prints a table.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
from _common import WORK, print_machine, run, table, tool, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def huge_nifti(path: Path, shape=(4000, 4000, 100)) -> None:
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.uint8)
    hdr.set_sform(np.eye(4), code=1)
    hdr["vox_offset"] = 352
    with gzip.open(path, "wb", compresslevel=6) as f:
        f.write(hdr.binaryblock + b"\0" * (352 - len(hdr.binaryblock)))
        plane = b"\0" * (shape[0] * shape[1])
        for _ in range(shape[2]):
            f.write(plane)


def ct_volume(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """int16 HU [256, 256, n]: a body ellipse with noise and a 12 x 12 x 4 lesion; its label."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    body = ((x - 128) / 100.0) ** 2 + ((y - 128) / 80.0) ** 2 <= 1.0
    vol = np.full((256, 256, n), -1000, np.int16)
    for k in range(n):
        vol[:, :, k][body] = (40 + rng.normal(0, 10, int(body.sum()))).astype(np.int16)
    lab = np.zeros(vol.shape, np.uint8)
    z = n // 2
    vol[100:112, 120:132, z : z + 4] = 160
    lab[100:112, 120:132, z : z + 4] = 1
    return vol, lab


def tilt_series(folder: Path, frames: np.ndarray, degrees: float) -> None:
    """`frames` [N, R, C] as a CT series whose slice origins drift along the columns by tan(tilt) per mm."""
    import pydicom

    from tests.conftest import write_dicom_series

    paths, _ = write_dicom_series(folder, frames)
    for p in paths:
        ds = pydicom.dcmread(str(p))
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + np.tan(np.radians(degrees)) * (z + 30.0), z]
        ds.GantryDetectorTilt = degrees
        ds.save_as(str(p))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--bundle", default=None, help="bundle to score with (default: the madclip-tiny bench bundle)"
    )
    ap.add_argument("--slices", type=int, default=64, help="slices of the synthetic volumes (default 64)")
    ap.add_argument("--volumes", type=int, default=4, help="labelled volumes for madclip-prepare (default 4)")
    a = ap.parse_args()
    import nibabel as nib

    print_machine()
    if a.bundle is None:
        from bench_runtime import bundle_for

        bundle, _ = bundle_for("madclip-tiny", 240)
    else:
        bundle = Path(a.bundle)
    work = WORK / "volume"
    work.mkdir(parents=True, exist_ok=True)
    rows, results = [], {}

    huge = work / "huge.nii.gz"
    if not huge.exists():
        huge_nifti(huge)
    for name, extra in (
        ("huge 4000x4000x100: whole volume (refused)", []),
        ("huge: --slice 0", ["--slice", "0"]),
    ):
        m = run([tool("madclip-infer"), str(huge), "--bundle", str(bundle), "--json", *extra], check=False)
        results[name] = {
            "seconds": round(m.seconds, 2),
            "peak_rss_mb": round(m.peak_rss_mb, 1),
            "file_mb": round(huge.stat().st_size / 1e6, 1),
            "refused": "over the budget" in m.stderr,
        }
        rows.append(
            [
                name,
                f"{m.seconds:.2f}",
                "",
                f"{m.peak_rss_mb:.0f}",
                "",
                "refused" if results[name]["refused"] else "ok",
            ]
        )

    vol, lab = ct_volume(a.slices, 0)
    nii = work / f"ct{a.slices}.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([0.7, 0.7, 2.5, 1.0])), str(nii))
    series = work / f"ct{a.slices}_dicom"
    if not series.is_dir():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.conftest import write_dicom_series

        write_dicom_series(series, np.transpose(vol, (2, 1, 0)).copy())
    tilted = work / f"ct{a.slices}_dicom_tilt15"
    if not tilted.is_dir():
        tilt_series(tilted, np.transpose(vol, (2, 1, 0)).copy(), 15.0)
    base = run(
        [
            sys.executable,
            "-c",
            "import madclip_runtime.cli.infer, madclip_runtime.predictor, nibabel, "
            "onnxruntime, highdicom, madclip_runtime.scans.volume_output",
        ]
    ).peak_rss_mb
    f32_mb = vol.size * 4 / 2**20
    results["imports_only_peak_rss_mb"] = round(base, 1)
    results["volume_float32_mb"] = round(f32_mb, 1)
    for name, src, extra in (
        (f"NIfTI 256x256x{a.slices} --out", nii, []),
        (f"DICOM series 256x256x{a.slices} --out --dicom-seg", series, ["--dicom-seg"]),
        ("DICOM series, 15 deg gantry tilt, --out --dicom-seg", tilted, ["--dicom-seg"]),
    ):
        out = work / "out"
        m = run(
            [tool("madclip-infer"), str(src), "--bundle", str(bundle), "--out", str(out), "--json", *extra]
        )
        ratio = (m.peak_rss_mb - base) / f32_mb
        results[name] = {
            "seconds": round(m.seconds, 2),
            "ms_per_slice": round(m.seconds * 1e3 / a.slices, 1),
            "peak_rss_mb": round(m.peak_rss_mb, 1),
            "working_memory_x_float32_volume": round(ratio, 2),
        }
        rows.append(
            [
                name,
                f"{m.seconds:.2f}",
                f"{m.seconds * 1e3 / a.slices:.0f}",
                f"{m.peak_rss_mb:.0f}",
                f"{ratio:.1f}",
                "ok",
            ]
        )

    images, labels = work / "imagesTr", work / "labelsTr"
    images.mkdir(exist_ok=True)
    labels.mkdir(exist_ok=True)
    for i in range(a.volumes):
        v, lb = ct_volume(a.slices, i + 1)
        nib.save(nib.Nifti1Image(v, np.eye(4)), str(images / f"case{i:02d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(lb, np.eye(4)), str(labels / f"case{i:02d}.nii.gz"))
    name = f"madclip-prepare {a.volumes} x 256x256x{a.slices}"
    m = run(
        [
            tool("madclip-prepare"),
            "--images",
            str(images),
            "--labels",
            str(labels),
            "--out",
            str(work / "prepared"),
            "--force",
            "--min-lesion-voxels",
            "20",
        ]
    )
    ratio = (m.peak_rss_mb - base) / f32_mb
    results[name] = {
        "seconds": round(m.seconds, 2),
        "peak_rss_mb": round(m.peak_rss_mb, 1),
        "working_memory_x_float32_volume": round(ratio, 2),
    }
    rows.append([name, f"{m.seconds:.2f}", "", f"{m.peak_rss_mb:.0f}", f"{ratio:.1f}", "ok"])

    table(
        "volumes",
        ["step", "wall s", "ms/slice", "peak RSS MB", "(RSS - imports) / float32 vol", "result"],
        rows,
    )
    write_json("volume.json", {"bundle": str(bundle), "slices": a.slices, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
