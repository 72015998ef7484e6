"""Procedural demo dataset (madclip_train.demo)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from madclip_runtime.errors import MadclipError
from madclip_runtime.preprocess import PreprocessSpec
from madclip_train.data import load_arrays, load_split, sample_shots
from madclip_train.demo import generate_demo, main


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("demo"), n_valid=4, n_test=5, seed=3)


def _files(folder: Path) -> list[Path]:
    return sorted(folder.iterdir())


def test_layout_and_counts(demo_root):
    assert demo_root.name == "Brain_AD"
    for split, n in (("valid", 4), ("test", 5)):
        good = _files(demo_root / split / "good" / "img")
        bad = _files(demo_root / split / "Ungood" / "img")
        masks = _files(demo_root / split / "Ungood" / "anomaly_mask")
        assert len(good) == n and len(bad) == n
        assert [p.name for p in masks] == [p.name for p in bad]
    assert not [p for p in demo_root.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_images_and_masks(demo_root):
    for p in _files(demo_root / "valid" / "good" / "img") + _files(demo_root / "test" / "Ungood" / "img"):
        with Image.open(p) as im:
            assert im.mode == "L" and im.size == (240, 240)
            arr = np.asarray(im)
        assert arr.std() > 10 and arr[0, 0] < 10  # structured content, dark background corner
    for p in _files(demo_root / "test" / "Ungood" / "anomaly_mask"):
        with Image.open(p) as im:
            m = np.asarray(im)
        assert im.mode == "L" and set(np.unique(m).tolist()) == {0, 255}
        assert 20 < (m == 255).sum() < 0.2 * m.size


def test_lesions_change_the_image_under_the_mask(demo_root):
    # The lesion region differs from the surrounding brain: mean |intensity - local brain level| is large.
    for p in _files(demo_root / "valid" / "Ungood" / "img"):
        img = np.asarray(Image.open(p)).astype(np.float32)
        m = np.asarray(Image.open(demo_root / "valid" / "Ungood" / "anomaly_mask" / p.name)) > 0
        ys, xs = np.nonzero(m)
        ring = np.zeros_like(m)
        ring[max(ys.min() - 12, 0) : ys.max() + 13, max(xs.min() - 12, 0) : xs.max() + 13] = True
        ring &= ~m
        assert abs(img[m].mean() - np.median(img[ring])) > 12, p.name


def test_deterministic(tmp_path, demo_root):
    again = generate_demo(tmp_path, n_valid=4, n_test=5, seed=3)
    for a in sorted(demo_root.rglob("*.png")):
        b = again / a.relative_to(demo_root)
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    other = generate_demo(tmp_path / "other", n_valid=4, n_test=5, seed=4)
    a = demo_root / "valid" / "good" / "img" / "valid_normal_000.png"
    assert not np.array_equal(
        np.asarray(Image.open(a)), np.asarray(Image.open(other / a.relative_to(demo_root)))
    )


def test_refuse_overwrite_and_force(tmp_path):
    root = generate_demo(tmp_path, n_valid=1, n_test=1)
    (root / "marker.txt").write_text("x")
    with pytest.raises(MadclipError) as e:
        generate_demo(tmp_path, n_valid=1, n_test=1)
    assert str(root) in str(e.value) and "\n" not in str(e.value)
    assert (root / "marker.txt").exists()
    generate_demo(tmp_path, n_valid=2, n_test=1, force=True)
    assert not (root / "marker.txt").exists()
    assert len(_files(root / "valid" / "good" / "img")) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Brain_AD"]


def test_load_split_on_demo(demo_root):
    valid = load_split(demo_root, "valid")
    test = load_split(demo_root, "test")
    assert valid.has_masks and test.has_masks
    assert (len(valid.normal), len(valid.abnormal), len(test.normal), len(test.abnormal)) == (4, 4, 5, 5)
    shots = sample_shots(valid, 2, seed=111)
    images, masks, labels = load_arrays(shots, PreprocessSpec())
    assert images.shape == (4, 3, 240, 240)
    assert masks[2:].any(axis=(1, 2)).all() and not masks[:2].any()


def test_cli(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["--out", str(out), "--n-valid", "1", "--n-test", "2", "--seed", "1"]) == 0
    assert str(out / "Brain_AD") in capsys.readouterr().out.replace("\n", "")
    assert len(_files(out / "Brain_AD" / "test" / "Ungood" / "img")) == 2
    code = main(["--out", str(out), "--n-valid", "1", "--n-test", "1"])
    assert code != 0
    err = capsys.readouterr().err
    assert "already exists" in err and "Traceback" not in err
    assert main(["--out", str(out), "--n-valid", "1", "--n-test", "1", "--force"]) == 0
    assert len(_files(out / "Brain_AD" / "test" / "Ungood" / "img")) == 1
    with pytest.raises(SystemExit) as ei:  # a bad number is refused by the argument parser: one line, exit 2
        main(["--out", str(out), "--n-valid", "0", "--force"])
    assert ei.value.code == 2 and "--n-valid" in capsys.readouterr().err
