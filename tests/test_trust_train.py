"""Training and export trust: no non-finite run is ever written or exported, masks of any bit depth, an empty
abnormal mask is reported, converted reference checkpoints deploy (--calib). Regression tests for issue 10."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from madclip_runtime.errors import MadclipError
from madclip_runtime.scans.imageio import mask_to_unit, read_mask

from .conftest import cli_error_lines, copy_tree, fake_reference_checkpoint

TINY = ["--backbone", "madclip-tiny", "--pretrained", "none"]


def _error_lines(err: str) -> list[str]:
    return [line for line in cli_error_lines(err) if line.startswith("error:")]


# ------------------------------------------------------------------------------------------ non-finite runs


def test_check_finite_step_names_epoch_and_step(tiny_model):
    from madclip_train.train import check_finite_step

    check_finite_step({"total": torch.tensor(1.0)}, 1, 1, tiny_model)
    with pytest.raises(MadclipError, match="loss total is nan at epoch 3 step 2"):
        check_finite_step({"total": torch.tensor(float("nan"))}, 3, 2)
    with torch.no_grad():
        next(iter(tiny_model.adapters.parameters())).fill_(float("inf"))
    with pytest.raises(MadclipError, match=r"parameter adapters\..* became NaN/inf at epoch 1 step 4"):
        check_finite_step({"total": torch.tensor(0.5)}, 1, 4, tiny_model)


def test_diverging_training_writes_nothing(tmp_path, monkeypatch, capsys):
    from madclip_train.cli import train_main
    from madclip_train.demo import generate_demo
    from madclip_train.methods.madclip import MadCLIP

    root = generate_demo(tmp_path / "data", n_valid=2, n_test=1, seed=3)
    real_loss = MadCLIP.loss
    calls = {"n": 0}

    def nan_on_third_step(self, *args, **kwargs):
        parts = real_loss(self, *args, **kwargs)
        if torch.is_grad_enabled():  # training steps, not the held-out evaluation
            calls["n"] += 1
            if calls["n"] == 3:
                parts["total"] = parts["total"] * float("nan")
        return parts

    monkeypatch.setattr(MadCLIP, "loss", nan_on_third_step)
    out = tmp_path / "run"
    rc = train_main(
        [
            "--data",
            str(root),
            "--out",
            str(out),
            "--shots",
            "2",
            "--epochs",
            "3",
            "--batch-size",
            "16",
            "--device",
            "cpu",
            *TINY,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = _error_lines(err)
    assert (
        len(lines) == 1
        and "loss total is nan at epoch 1 step 3" in lines[0]
        and "nothing written" in lines[0]
    )
    assert not out.exists() and not list(tmp_path.glob(".run*"))  # no run, no temporary left behind


def test_non_finite_lr_refused_by_the_api_too(tmp_path):
    from madclip_train.run import TrainRequest, train_run

    for lr in (float("nan"), float("inf"), -1.0):
        with pytest.raises(MadclipError, match="--lr must be a finite number > 0"):
            train_run(TrainRequest(data=str(tmp_path), out=str(tmp_path / "r"), lr=lr))


def test_exporter_refuses_a_run_with_non_finite_tensors(trained_tiny_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from madclip_export.cli import main

    run = copy_tree(trained_tiny_run, tmp_path / "run")
    state = load_file(str(run / "checkpoint.safetensors"))
    state = {k: v * float("nan") if k.startswith("adapters.") else v for k, v in state.items()}
    save_file(state, str(run / "checkpoint.safetensors"))
    assert main([str(run), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1 and "hold NaN or infinite values" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize(
    "dtype, on",
    [
        (np.uint8, 1),
        (np.uint8, 255),
        (np.uint8, 7),
        (np.uint16, 1),
        (np.uint16, 255),
        (np.uint16, 65535),
        (np.uint16, 1000),
    ],
)
def test_masks_of_any_bit_depth(tmp_path, dtype, on):
    m = np.zeros((40, 40), dtype)
    m[10:20, 5:15] = on
    path = tmp_path / "m.png"
    Image.fromarray(m).save(path)
    got = read_mask(path)
    assert got.dtype == np.float32 and set(np.unique(got).tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(got > 0.5, m > 0)


def test_mask_label_maps_soft_masks_and_rgb():
    labels = np.array([[0, 1], [2, 3]], np.uint8)  # a label map: any nonzero label is lesion
    np.testing.assert_array_equal(mask_to_unit(labels), [[0, 1], [1, 1]])
    soft = np.linspace(0, 255, 64).astype(np.uint8).reshape(8, 8)  # anti-aliased: scaled, thresholded later
    np.testing.assert_allclose(mask_to_unit(soft), soft / 255.0, atol=1e-6)
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[1, 1, 2] = 200
    assert mask_to_unit(rgb)[1, 1] == 1.0 and mask_to_unit(rgb).sum() == 1.0
    assert mask_to_unit(np.zeros((4, 4), np.uint16)).sum() == 0
    fl = np.array([[0.0, 0.25], [0.0, 0.25]], np.float32)  # {0, k} float
    np.testing.assert_array_equal(mask_to_unit(fl), [[0, 1], [0, 1]])


def test_16bit_label_mask_trains_as_lesion_and_empty_mask_warns(tmp_path, caplog):
    from madclip_train.data import Sample, load_arrays

    img = tmp_path / "x.png"
    Image.fromarray((np.arange(64 * 64) % 200).astype(np.uint8).reshape(64, 64)).save(img)
    m16 = np.zeros((64, 64), np.uint16)
    m16[20:40, 20:40] = 1
    Image.fromarray(m16).save(tmp_path / "m16.png")
    Image.fromarray(np.zeros((64, 64), np.uint16)).save(tmp_path / "empty.png")
    with caplog.at_level(logging.WARNING):
        _, masks, _ = load_arrays(
            [Sample(str(img), 1, str(tmp_path / "m16.png")), Sample(str(img), 1, str(tmp_path / "empty.png"))]
        )
    assert masks[0].mean() == pytest.approx((20 / 64) ** 2, rel=0.05)  # not silently empty
    assert not masks[1].any()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "empty.png" in warned[0] and "is empty" in warned[0]


# ------------------------------------------------------------------------------------------ converted checkpoints


@pytest.fixture(scope="module")
def converted_run(tmp_path_factory):
    from madclip_train.cli import convert_main

    d = tmp_path_factory.mktemp("converted")
    torch.save(fake_reference_checkpoint(), d / "brain.pth")
    assert convert_main([str(d / "brain.pth"), "--out", str(d / "run"), "--objective", "Brain", *TINY]) == 0
    return d / "run"


@pytest.fixture(scope="module")
def calib_root(tmp_path_factory):
    from madclip_train.demo import generate_demo

    return generate_demo(tmp_path_factory.mktemp("calib") / "data", n_valid=3, n_test=2, seed=5)


def test_converted_run_without_calib_says_which_option(converted_run, tmp_path, capsys):
    from madclip_export.cli import main

    assert main([str(converted_run), "--out", str(tmp_path / "b")]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "lists no shot images" in lines[0] and "--calib DIR" in lines[0]
    assert not (tmp_path / "b").exists()


def test_convert_export_sign_infer_end_to_end(converted_run, calib_root, tmp_path, capsys):
    from madclip_export.cli import keygen_main, main
    from madclip_runtime.cli.infer import main as infer

    assert keygen_main([str(tmp_path / "k")]) == 0
    b = tmp_path / "bundle"
    assert (
        main(
            [
                str(converted_run),
                "--out",
                str(b),
                "--calib",
                str(calib_root),
                "--calib-split",
                "valid",
                "--sign",
                str(tmp_path / "k.key"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    meta = json.loads((b / "metadata.json").read_text())
    assert meta["calibration"]["threshold"] is not None and "--calib images" in meta["calibration"]["method"]
    assert meta["provenance"]["calibration_images"] == str(calib_root)
    assert infer(["--bundle", str(b), "--selftest", "--trusted-key", str(tmp_path / "k.pub")]) == 0
    scans = calib_root / "test" / "Ungood" / "img"
    assert infer([str(scans), "--bundle", str(b), "--trusted-key", str(tmp_path / "k.pub"), "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(records) == 2 and all(r["label"] in ("normal", "anomaly") for r in records)


def test_calib_folder_of_unlabelled_images_gives_scores_without_threshold(
    converted_run, calib_root, tmp_path, capsys
):
    from madclip_export.cli import main
    from madclip_runtime.cli.infer import main as infer

    folder = calib_root / "valid" / "good" / "img"
    b = tmp_path / "bundle"
    assert main([str(converted_run), "--out", str(b), "--calib", str(folder)]) == 0
    assert "no decision threshold" in capsys.readouterr().err
    meta = json.loads((b / "metadata.json").read_text())
    assert meta["calibration"]["threshold"] is None
    assert infer(["--bundle", str(b), "--selftest"]) == 0
    capsys.readouterr()
    assert infer([str(folder), "--bundle", str(b), "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert records and all(r["label"] is None and r["score"] is not None for r in records)
