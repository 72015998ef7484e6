"""Anomaly synthesis (MediCLIP's tasks): per-task invariants, labels, determinism, mixture, madclip-synth."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from madclip_runtime.errors import MadclipError
from madclip_train.synthesis import DEFAULT_MIX, TASKS, Synthesizer, parse_mix, sample_rng
from madclip_train.synthesis.labelling import cutpaste_label, flipped_gaussian
from madclip_train.synthesis.perlin import perlin_shape, perlin_single_cell
from madclip_train.synthesis.shapes import deformed_shape

from .conftest import realscans_or_skip


def _scan(seed: int, size: int = 64) -> np.ndarray:
    """A textured grey uint8 image: a bright disc with noise, so every task changes something."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.4 * size) ** 2) * 120.0
    return np.clip(40 + disc + rng.normal(0, 25, (size, size)), 0, 255).astype(np.uint8)


SHOTS = [_scan(s) for s in range(3)]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_changes_only_inside_its_mask(name):
    task = TASKS[name]()
    for seed in range(6):
        res = task(SHOTS[0], np.random.default_rng(seed), SHOTS)
        assert res.image.dtype == np.uint8 and res.image.shape == SHOTS[0].shape
        assert res.label.shape == SHOTS[0].shape
        assert res.label.min() >= 0.0 and res.label.max() <= 1.0
        outside = res.label == 0
        np.testing.assert_array_equal(res.image[outside], SHOTS[0][outside])
        if name == "identity":
            assert res.rounds == 0 and not res.label.any()
        else:
            assert res.rounds in (1, 2)
            assert res.label.any(), f"{name}: empty mask"
            assert (res.image != SHOTS[0]).any(), f"{name}: image unchanged"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_is_deterministic_under_a_seed(name):
    task = TASKS[name]()
    a = task(SHOTS[1], np.random.default_rng(5), SHOTS)
    b = task(SHOTS[1], np.random.default_rng(5), SHOTS)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    if name != "identity":
        c = task(SHOTS[1], np.random.default_rng(6), SHOTS)
        assert not np.array_equal(a.label, c.label)


def test_task_size_bounds_follow_the_reference_at_224():
    # round(p * 224): cutpaste/gauss Perlin boxes in [lo, hi), deformed shapes clipped to [45, 134]
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = perlin_shape([(22, 134), (22, 134)], rng)
        assert 22 <= m.shape[0] < 134 and 22 <= m.shape[1] < 134 and m.mean() >= 0.2
        d, _, kind = deformed_shape([(45, 134), (45, 134)], np.array([224, 224]), rng)
        assert kind in ("rectangle", "ellipse") and max(d.shape) <= 135 and d.any()  # ub + 1: floor/ceil


def test_perlin_matches_perlin_numpy():
    pn = pytest.importorskip("perlin_numpy")
    compared = 0
    for h, w in [(22, 40), (64, 64), (100, 133), (178, 67), (30, 31)]:
        try:
            ref = pn.generate_perlin_noise_2d((h, w), (1, 1), rng=np.random.default_rng(h * w))
        except ValueError:  # perlin-numpy's float-step grid breaks on some sizes (why ours is hand-written)
            continue
        ours = perlin_single_cell((h, w), np.random.default_rng(h * w))
        np.testing.assert_allclose(ours, ref, atol=1e-12)
        compared += 1
    assert compared >= 4


def test_cutpaste_labels_hand_computed():
    orig = np.full((8, 8), 100, np.uint8)
    aug = orig.copy()
    aug[1, 1], aug[1, 5], aug[5, 5] = 101, 99, 150  # +1, -1 (wraps to 255 in uint8), +50; separate regions
    mask = np.zeros((8, 8), bool)
    mask[1, 1] = mask[1, 5] = mask[5, 5] = True
    lab = cutpaste_label(aug, orig, mask)
    assert lab[1, 1] == pytest.approx(1 - np.exp(-1 / 0.08), abs=1e-12)  # 0.9999963
    assert lab[1, 5] == 1.0 and lab[5, 5] == 1.0
    assert lab[~mask].max() == 0.0
    assert flipped_gaussian(np.array(0.0)) == 0.0


def test_cutpaste_label_fills_holes():
    orig = np.zeros((12, 12), np.uint8)
    aug = orig.copy()
    aug[2:9, 2:9] = 200
    aug[5, 5] = 0  # an unchanged pixel inside the pasted blob
    mask = np.zeros((12, 12), bool)
    mask[2:9, 2:9] = True
    lab = cutpaste_label(aug, orig, mask)
    assert lab[5, 5] == 1.0 and lab[2:9, 2:9].min() == 1.0 and lab.sum() == 49


def test_mixture_probabilities_and_rounds():
    synth = Synthesizer(SHOTS)
    draws = [synth.seeded(i % 3, seed=1, epoch=i // 3) for i in range(400)]
    counts = {n: sum(d.task == n for d in draws) for n, _ in DEFAULT_MIX}
    assert set(d.task for d in draws) == {
        "cutpaste",
        "gauss",
        "source",
        "identity",
    }  # smooth/sink off by default
    for c in counts.values():
        assert 70 <= c <= 130, counts  # 100 expected each (p = 0.25)
    rounds = [d.rounds for d in draws if d.task != "identity"]
    assert 0.38 <= np.mean(np.array(rounds) == 2) <= 0.62  # one or two anomalies, 50/50


def test_seeded_samples_do_not_depend_on_order():
    synth = Synthesizer(SHOTS)
    a = synth.seeded(2, seed=7, epoch=3)
    for i in range(5):
        synth.seeded(i % 3, seed=7, epoch=i)
    b = synth.seeded(2, seed=7, epoch=3)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert sample_rng(7, 3, 2).random() == sample_rng(7, 3, 2).random() != sample_rng(7, 3, 1).random()


def test_parse_mix():
    assert parse_mix(None) == DEFAULT_MIX
    assert parse_mix("cutpaste gauss") == (("cutpaste", 0.5), ("gauss", 0.5))
    assert parse_mix(["cutpaste=0.5", "sink"]) == (("cutpaste", 0.5), ("sink", 0.5))
    assert parse_mix("smooth=2,identity=2") == (("smooth", 0.5), ("identity", 0.5))
    for bad in ("blur", "cutpaste=x", "cutpaste=-1", "cutpaste=1,gauss", "gauss gauss", ""):
        with pytest.raises(MadclipError):
            parse_mix(bad)


def _run_synth(argv):
    from madclip_train.synthesis.cli import main

    return main(argv)


def test_madclip_synth_on_real_scans(tmp_path):
    root = realscans_or_skip("Brain_AD")
    out = tmp_path / "synth"
    assert _run_synth(["--data", str(root), "--out", str(out), "-n", "6", "--seed", "4", "--tile", "64"]) == 0
    doc = json.loads((out / "samples.json").read_text())
    assert len(doc["samples"]) == 6 and all("valid/good/img" in s for s in doc["shots"])
    for rec in doc["samples"]:
        img = np.asarray(Image.open(out / rec["image"]))
        mask = np.asarray(Image.open(out / rec["mask"]))
        assert img.shape == mask.shape == (224, 224) and img.dtype == np.uint8
        assert (mask.any()) == (rec["task"] != "identity")
    with Image.open(out / "preview.png") as grid:
        assert grid.size[0] > 4 * 64 and grid.mode == "RGB"
    # same seed -> same samples
    out2 = tmp_path / "synth2"
    assert (
        _run_synth(["--data", str(root), "--out", str(out2), "-n", "6", "--seed", "4", "--tile", "64"]) == 0
    )
    for rec in doc["samples"]:
        assert (out / rec["image"]).read_bytes() == (out2 / rec["image"]).read_bytes()


def test_madclip_synth_plain_folder_and_errors(tmp_path, capsys):
    folder = tmp_path / "normals"
    folder.mkdir()
    for i, s in enumerate(SHOTS):
        Image.fromarray(s).save(folder / f"n{i}.png")
    out = tmp_path / "o"
    assert (
        _run_synth(
            [
                "--data",
                str(folder),
                "--out",
                str(out),
                "-n",
                "3",
                "--tasks",
                "smooth",
                "sink",
                "--image-size",
                "64",
                "--tile",
                "64",
            ]
        )
        == 0
    )
    doc = json.loads((out / "samples.json").read_text())
    assert {r["task"] for r in doc["samples"]} <= {"smooth", "sink"} and doc["tasks"] == "smooth=0.5,sink=0.5"
    assert _run_synth(["--data", str(folder), "--out", str(out), "-n", "3"]) == 2  # exists, no --force
    assert _run_synth(["--data", str(folder), "--out", str(tmp_path / "x"), "--tasks", "blur"]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run_synth(["--data", str(empty), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'blur'" in err and "no normal images" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
