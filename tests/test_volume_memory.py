"""Working memory of the volume path (issue 19): a small multiple of ONE volume's float32 size.

Measured with tracemalloc (numpy reports its buffers to it), in process, after the imports are warm: the
peak of traced allocations while madclip-infer scores a NIfTI volume and writes its outputs, and while
madclip-prepare cuts a labelled volume into a training set, divided by the volume's float32 size. Before
issue 19 the ratios were 4.1 (infer) and 4.0 (prepare) on this volume; the bounds stated in docs/volumes.md
are 3 and 2.5.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from .conftest import build_tiny_bundle

nib = pytest.importorskip("nibabel", reason="nibabel (madclip[medical]) not installed")

SHAPE = (256, 256, 96)  # 25 MB of float32: large against the fixed costs (bundle, model buffers)
FLOAT32_BYTES = int(np.prod(SHAPE)) * 4


def _phantom() -> np.ndarray:
    x, y, z = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij", sparse=True)
    vol = (((x - 128) ** 2 + (y - 128) ** 2 < 90**2) * 1000 + z // 8).astype(np.int16)
    return np.ascontiguousarray(vol)


def _peak(fn) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / FLOAT32_BYTES
    finally:
        tracemalloc.stop()


def test_infer_and_prepare_memory_is_a_small_multiple_of_the_volume(tmp_path):
    import madclip_runtime.predictor  # noqa: F401  (warm every import the runs make)
    import madclip_runtime.scans.volume_output  # noqa: F401
    from madclip_runtime.cli.infer import main as infer_main
    from madclip_runtime.cli.prepare import main as prepare_main

    bundle = build_tiny_bundle(tmp_path / "b", size=64)
    vol = _phantom()
    nii = tmp_path / "phantom.nii.gz"
    img = nib.Nifti1Image(vol, np.diag([0.8, 0.8, 2.0, 1.0]))
    img.header.set_slope_inter(1.0, -1024.0)  # CT-style rescale: nibabel alone would decode it as float64
    nib.save(img, str(nii))
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "img" / "c1_0000.nii.gz"))
    lab = np.zeros(SHAPE, np.uint8)
    lab[100:120, 100:120, 40:44] = 1
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / "lab" / "c1.nii.gz"))
    del vol, lab

    assert infer_main([str(nii), "--bundle", str(bundle), "--out", str(tmp_path / "warm"), "--json"]) == 0
    infer = _peak(
        lambda: infer_main([str(nii), "--bundle", str(bundle), "--out", str(tmp_path / "o"), "--json"])
    )
    prep = _peak(
        lambda: prepare_main(
            [
                "--images",
                str(tmp_path / "img"),
                "--labels",
                str(tmp_path / "lab"),
                "--out",
                str(tmp_path / "p"),
                "--force",
            ]
        )
    )
    print(f"\npeak traced memory / float32 volume: infer {infer:.2f}, prepare {prep:.2f}")
    assert infer <= 3.0, infer
    assert prep <= 2.5, prep
