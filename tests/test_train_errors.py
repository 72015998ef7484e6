"""Every bad input of madclip-train / madclip-eval: one line naming the problem, exit 2, no traceback, no run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from madclip_train.cli import eval_main, train_main
from madclip_train.demo import generate_demo

TINY = ["--backbone", "madclip-tiny", "--pretrained", "none", "--epochs", "1", "--shots", "2"]


@pytest.fixture()
def root(tmp_path) -> Path:
    return generate_demo(tmp_path / "data", n_valid=3, n_test=2, seed=5)


def _fails(capsys, argv, *needles, main=train_main):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    text = " ".join(line.strip() for line in lines)
    assert text.startswith("error:"), err
    for n in needles:
        assert n in text, (n, err)
    return text


def _train(root, out, capsys, *needles, extra=()):
    _fails(capsys, ["--data", str(root), "--out", str(out), *TINY, *extra], *needles)
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())  # no temp leftovers


def test_missing_dataset_folder(tmp_path, capsys):
    _train(tmp_path / "nope", tmp_path / "run", capsys, "nope")


def test_missing_split_folder(root, tmp_path, capsys):
    shutil.rmtree(root / "valid")
    _train(root, tmp_path / "run", capsys, "valid")


def test_empty_split(root, tmp_path, capsys):
    for p in (root / "valid" / "good" / "img").iterdir():
        p.unlink()
    _train(root, tmp_path / "run", capsys, str(root / "valid" / "good" / "img"))


def test_fewer_images_than_shots(root, tmp_path, capsys):
    _train(root, tmp_path / "run", capsys, "fewer than --shots 5", extra=["--shots", "5"])


def test_missing_mask(root, tmp_path, capsys):
    mask = sorted((root / "valid" / "Ungood" / "anomaly_mask").iterdir())[0]
    mask.unlink()
    _train(root, tmp_path / "run", capsys, mask.stem, extra=["--shots", "3"])


def test_mis_sized_mask(root, tmp_path, capsys):
    mask = sorted((root / "valid" / "Ungood" / "anomaly_mask").iterdir())[0]
    Image.fromarray(np.zeros((100, 90), np.uint8)).save(mask)
    _train(root, tmp_path / "run", capsys, mask.name, extra=["--shots", "3"])


def test_unreadable_image(root, tmp_path, capsys):
    bad = sorted((root / "valid" / "good" / "img").iterdir())[0]
    bad.write_text("not a png")
    _train(root, tmp_path / "run", capsys, bad.name, extra=["--shots", "3"])


def test_missing_weights_file_gives_the_help_paragraph(root, tmp_path, capsys):
    text = _fails(
        capsys,
        [
            "--data",
            str(root),
            "--out",
            str(tmp_path / "run"),
            "--backbone",
            "madclip-tiny",
            "--pretrained",
            str(tmp_path / "missing.safetensors"),
            "--epochs",
            "1",
            "--shots",
            "2",
        ],
        "could not be loaded",
        "--pretrained /path/to/weights.safetensors",
        "madclip-tiny",
    )
    assert "random" in text


def test_unknown_backbone(root, tmp_path, capsys):
    _train(root, tmp_path / "run", capsys, "unknown backbone", extra=["--backbone", "ViT-Q-99"])


def test_bad_shot_list_name(root, tmp_path, capsys):
    shot_list = tmp_path / "shots.txt"
    shot_list.write_text("a-0: nothere.png\nn-0: alsonot.png\n")
    _train(root, tmp_path / "run", capsys, str(shot_list), extra=["--shot-list", str(shot_list)])


def test_eval_missing_run(root, tmp_path, capsys):
    _fails(capsys, [str(tmp_path / "norun"), "--data", str(root)], "norun", main=eval_main)


def test_weights_check_is_fast_and_truthful(tmp_path):
    from madclip_train.weights import weights_available

    assert weights_available("madclip-tiny", "none")[0] is True
    ok, reason = weights_available("ViT-L-14-336", str(tmp_path / "w.safetensors"))
    assert not ok and "no such file" in reason
    (tmp_path / "w.safetensors").write_bytes(b"x")
    assert weights_available("ViT-L-14-336", str(tmp_path / "w.safetensors"))[0] is True
    ok, reason = weights_available("madclip-tiny", "openai")
    assert not ok and "no 'openai' weights" in reason


def test_sigterm_during_training_leaves_nothing(root, tmp_path):
    """A killed job (SIGTERM from a scheduler or `kill`) exits 143 with one line and leaves no run and no temp dir."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "runs" / "killed"
    out.parent.mkdir()
    cmd = [
        sys.executable,
        "-c",
        "import sys; from madclip_train.cli import train_main; sys.exit(train_main())",
        "--data",
        str(root),
        "--out",
        str(out),
        "--backbone",
        "madclip-tiny",
        "--pretrained",
        "none",
        "--shots",
        "2",
        "--epochs",
        "1000",
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(out.parent.iterdir()) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)  # wait until training has started writing into its temporary directory
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    assert any(out.parent.iterdir()), "training never created its temporary run directory"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "error: terminated (SIGTERM)" in err and "Traceback" not in err
    assert list(out.parent.iterdir()) == []
