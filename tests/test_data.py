"""Dataset listing, shot selection, shot lists and array loading (madclip_train.data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from madclip_runtime.errors import InputError, MadclipError
from madclip_runtime.preprocess import PreprocessSpec
from madclip_train.data import (
    Sample,
    load_arrays,
    load_split,
    parse_shot_list,
    sample_shots,
    shots_from_list,
    shots_record,
)

REALSCANS = Path(__file__).resolve().parents[2] / "shared" / "data" / "realscans"
SPEC = PreprocessSpec(image_size=32)


def _png(path: Path, size: tuple[int, int] = (40, 48), value: int | None = None, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if value is None:
        arr = np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)
    else:
        arr = np.full((h, w), value, dtype=np.uint8)
    Image.fromarray(arr, mode="L").save(path)


def _mask(path: Path, size: tuple[int, int] = (40, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = np.zeros((h, w), dtype=np.uint8)
    arr[h // 4 : h // 2, w // 4 : w // 2] = 255
    Image.fromarray(arr, mode="L").save(path)


def make_mvfa(
    root: Path, n_normal: int = 5, n_abnormal: int = 4, masks: bool = True, splits=("valid", "test")
) -> Path:
    for split in splits:
        for i in range(n_normal):
            _png(root / split / "good" / "img" / f"n{i:02d}.png", seed=i)
        for i in range(n_abnormal):
            _png(root / split / "Ungood" / "img" / f"a{i:02d}.png", seed=100 + i)
            if masks:
                _mask(root / split / "Ungood" / "anomaly_mask" / f"a{i:02d}.png")
    return root


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_load_split_mvfa(tmp_path):
    root = make_mvfa(tmp_path / "Brain_AD")
    split = load_split(root, "valid")
    assert split.name == "valid" and split.has_masks
    assert [Path(s.path).name for s in split.normal] == [f"n{i:02d}.png" for i in range(5)]
    assert [Path(s.path).name for s in split.abnormal] == [f"a{i:02d}.png" for i in range(4)]
    assert all(s.label == 0 and s.mask_path is None for s in split.normal)
    for s in split.abnormal:
        assert s.label == 1
        assert Path(s.mask_path) == root.resolve() / "valid" / "Ungood" / "anomaly_mask" / Path(s.path).name
    assert split.samples == split.normal + split.abnormal
    test = load_split(root, "test")
    assert all("/test/" in s.path for s in test.samples)


def test_mask_path_replaces_img_folder_only(tmp_path):
    # The root contains "img" several times; only the image folder component may be replaced.
    root = make_mvfa(tmp_path / "imgdata" / "img_Brain_AD", n_normal=2, n_abnormal=2)
    split = load_split(root, "valid")
    for s in split.abnormal:
        assert s.mask_path == str(Path(s.path).parent.parent / "anomaly_mask" / Path(s.path).name)
        assert "imgdata" in s.mask_path and "img_Brain_AD" in s.mask_path
        assert Path(s.mask_path).is_file()


def test_mask_with_other_extension(tmp_path):
    root = make_mvfa(tmp_path / "ds", n_normal=2, n_abnormal=2, masks=False)
    for i in range(2):
        _mask(root / "valid" / "Ungood" / "anomaly_mask" / f"a{i:02d}.tif")
    split = load_split(root, "valid")
    assert [Path(s.mask_path).name for s in split.abnormal] == ["a00.tif", "a01.tif"]


def test_dataset_without_masks(tmp_path):
    root = make_mvfa(tmp_path / "Chest_AD", masks=False)
    split = load_split(root, "valid")
    assert not split.has_masks
    assert all(s.mask_path is None for s in split.samples)
    images, masks, labels = load_arrays(split.samples, SPEC)
    assert not masks.any() and labels.sum() == 4


def test_plain_layout(tmp_path):
    root = tmp_path / "plain"
    for i in range(3):
        _png(root / "normal" / f"x{i}.png", seed=i)
        _png(root / "abnormal" / f"y{i}.jpg", seed=i)
        _mask(root / "masks" / f"y{i}.png")
    split = load_split(root)  # "valid" = the top-level folders
    assert shots_record(split.samples)["shots"][0]["path"] == "normal/x0.png"
    assert split.has_masks and len(split.normal) == 3 and len(split.abnormal) == 3
    assert all(Path(s.mask_path).name == Path(s.path).stem + ".png" for s in split.abnormal)
    with pytest.raises(MadclipError) as e:  # no ROOT/test: asking for test is an error, not the valid images
        load_split(root, "test")
    assert str(root / "test") in _one_line(e)
    for i in range(2):
        _png(root / "test" / "normal" / f"t{i}.png")
        _png(root / "test" / "abnormal" / f"u{i}.png")
    test = load_split(root, "test")
    assert not test.has_masks and len(test.samples) == 4
    assert all("/test/" in s.path for s in test.samples)


def test_errors_name_the_path(tmp_path):
    with pytest.raises(MadclipError) as e:
        load_split(tmp_path / "missing")
    assert str(tmp_path / "missing") in _one_line(e)

    root = make_mvfa(tmp_path / "only_valid", splits=("valid",))
    with pytest.raises(MadclipError) as e:
        load_split(root, "test")
    assert str(root / "test") in _one_line(e)

    empty = make_mvfa(tmp_path / "empty", n_abnormal=0, masks=False)
    (empty / "valid" / "Ungood" / "img").mkdir(parents=True)
    with pytest.raises(MadclipError) as e:
        load_split(empty, "valid")
    msg = _one_line(e)
    assert str(empty / "valid" / "Ungood" / "img") in msg and "empty split" in msg

    root = make_mvfa(tmp_path / "missing_mask", n_abnormal=3)
    (root / "valid" / "Ungood" / "anomaly_mask" / "a01.png").unlink()
    with pytest.raises(MadclipError) as e:
        load_split(root, "valid")
    msg = _one_line(e)
    assert "a01.png" in msg and str(root / "valid" / "Ungood" / "anomaly_mask") in msg

    with pytest.raises(MadclipError) as e:
        load_split(tmp_path / "missing_mask", "train")
    _one_line(e)

    notdata = tmp_path / "notdata"
    notdata.mkdir()
    with pytest.raises(MadclipError) as e:
        load_split(notdata)
    assert str(notdata) in _one_line(e)


def test_sample_shots_deterministic_and_disjoint(tmp_path):
    root = make_mvfa(tmp_path / "ds", n_normal=10, n_abnormal=8)
    split = load_split(root)
    a = sample_shots(split, 4, seed=111)
    b = sample_shots(split, 4, seed=111)
    c = sample_shots(split, 4, seed=7)
    assert a == b and a != c
    assert [s.label for s in a] == [0] * 4 + [1] * 4
    assert len(set(a)) == 8
    assert set(a[:4]) <= set(split.normal) and set(a[4:]) <= set(split.abnormal)
    assert sample_shots(load_split(root), 4, seed=111) == a  # a fresh listing gives the same shots
    assert len(sample_shots(split, 2, seed=111)) == 4


def test_sample_shots_too_few(tmp_path):
    root = make_mvfa(tmp_path / "ds", n_normal=10, n_abnormal=2)
    split = load_split(root)
    with pytest.raises(MadclipError) as e:
        sample_shots(split, 16, seed=0)
    # normal folder has 10 < 16 too; the first short class is reported
    assert _one_line(e) == f"{root.resolve() / 'valid' / 'good' / 'img'} has 10 images, fewer than --shots 16"
    with pytest.raises(MadclipError) as e:
        sample_shots(split, 4, seed=0)
    assert _one_line(e) == f"{root.resolve() / 'valid' / 'Ungood' / 'img'} has 2 images, fewer than --shots 4"


def test_parse_shot_list_and_resolve(tmp_path):
    root = make_mvfa(tmp_path / "ds", n_normal=6, n_abnormal=5)
    split = load_split(root)
    lst = tmp_path / "16-shot.txt"
    lst.write_text("# comment\na-0: a01.png a03\nn-0: n00, n05.png\na-1: a00\nn-1: n01\n\na-0: a04.png\n")
    parsed = parse_shot_list(lst)
    assert parsed == {"abnormal": ["a01.png", "a03", "a04.png"], "normal": ["n00", "n05.png"]}
    assert parse_shot_list(lst, index=1) == {"abnormal": ["a00"], "normal": ["n01"]}
    shots = shots_from_list(split, lst)
    assert [Path(s.path).name for s in shots] == ["n00.png", "n05.png", "a01.png", "a03.png", "a04.png"]
    assert [s.label for s in shots] == [0, 0, 1, 1, 1]
    assert all(s.mask_path for s in shots[2:])

    bad = tmp_path / "bad.txt"
    bad.write_text("a-0: a01 nope_17\nn-0: n00\n")
    with pytest.raises(MadclipError) as e:
        shots_from_list(split, bad)
    msg = _one_line(e)
    assert str(bad) in msg and "nope_17" in msg

    wrong_class = tmp_path / "wrong.txt"
    wrong_class.write_text("a-0: n00\nn-0: n01\n")
    with pytest.raises(MadclipError) as e:
        shots_from_list(split, wrong_class)
    assert "n00" in _one_line(e)

    garbage = tmp_path / "garbage.txt"
    garbage.write_text("hello world\n")
    with pytest.raises(MadclipError) as e:
        parse_shot_list(garbage)
    assert f"{garbage}:1" in _one_line(e)

    with pytest.raises(MadclipError) as e:
        parse_shot_list(lst, index=5)
    assert str(lst) in _one_line(e)

    with pytest.raises(MadclipError) as e:
        parse_shot_list(tmp_path / "nofile.txt")
    assert "nofile.txt" in _one_line(e)


def test_shots_record(tmp_path):
    root = make_mvfa(tmp_path / "ds", n_normal=4, n_abnormal=4)
    split = load_split(root)
    shots = sample_shots(split, 2, seed=1)
    rec = shots_record(shots, split.root)
    json.dumps(rec)
    assert rec["root"] == split.root and rec["n_normal"] == 2 and rec["n_abnormal"] == 2
    for entry, s in zip(rec["shots"], shots):
        assert (Path(split.root) / entry["path"]).resolve() == Path(s.path).resolve()
        assert entry["label"] == s.label
        if s.label:
            assert entry["mask"].startswith("valid/Ungood/anomaly_mask/")
        else:
            assert entry["mask"] is None
    assert shots_record(shots) == rec  # the dataset root is inferred from the layout
    loose = [Sample(str(tmp_path / "x" / "a.png"), 0), Sample(str(tmp_path / "y" / "b.png"), 1)]
    assert shots_record(loose)["root"] == str(tmp_path)
    assert [e["path"] for e in shots_record(loose)["shots"]] == ["x/a.png", "y/b.png"]


def test_load_arrays_shapes_and_masks(tmp_path):
    root = make_mvfa(tmp_path / "ds", n_normal=3, n_abnormal=2)
    split = load_split(root)
    images, masks, labels = load_arrays(split.samples, SPEC)
    assert images.shape == (5, 3, 32, 32) and images.dtype == np.float32
    assert masks.shape == (5, 32, 32) and masks.dtype == np.bool_
    assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 0, 1, 1]
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert not masks[:3].any()
    assert masks[3].any() and masks[4].any()
    ys, xs = np.nonzero(masks[3])
    assert ys.min() >= 6 and ys.max() <= 17 and xs.min() >= 6 and xs.max() <= 17  # the drawn box, resized


def test_load_arrays_mis_sized_mask(tmp_path):
    root = make_mvfa(tmp_path / "ds", n_normal=1, n_abnormal=1)
    mask = root / "valid" / "Ungood" / "anomaly_mask" / "a00.png"
    _mask(mask, size=(64, 64))
    split = load_split(root)
    with pytest.raises(InputError) as e:
        load_arrays(split.abnormal, SPEC)
    msg = _one_line(e)
    assert str(mask) in msg and "64x64" in msg and "40x48" in msg


def test_load_arrays_unreadable_image(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(InputError) as e:
        load_arrays([Sample(str(bad), 0, None)], SPEC)
    assert str(bad) in _one_line(e)


@pytest.mark.realdata
@pytest.mark.skipif(not (REALSCANS / "Brain_AD").is_dir(), reason=f"real scans not present at {REALSCANS}")
def test_realscans_brain():
    valid = load_split(REALSCANS / "Brain_AD", "valid")
    test = load_split(REALSCANS / "Brain_AD", "test")
    assert valid.has_masks and test.has_masks
    assert len(valid.normal) >= 1 and len(valid.abnormal) >= 1
    assert len(test.normal) >= 1 and len(test.abnormal) >= 1
    manifest = json.loads((REALSCANS / "manifest.json").read_text())
    expected = {(m["split"], m["label"], m["file"]) for m in manifest if m["dataset"] == "Brain_AD"}
    got = {(sp.name, s.label, Path(s.path).name) for sp in (valid, test) for s in sp.samples}
    assert got == expected
    shots = sample_shots(valid, len(valid.abnormal), seed=111)
    images, masks, labels = load_arrays(shots, PreprocessSpec())
    assert images.shape == (len(shots), 3, 240, 240)
    assert masks[labels == 1].reshape(int((labels == 1).sum()), -1).any(axis=1).all()
    assert not masks[labels == 0].any()
